"""Compare two GPU runs of the base pair (the numbers the README quotes about run 1 vs run 2).

Run from the repository root (default paths are relative to it), with the package installed:
``pip install -e .`` (or ``scripts/setup.sh``). For example:

    python benchmarks/compare_runs.py sweeps "results/archive/sweep_base_gpu_run1/worker*.jsonl" \
        "results/sweep_base_gpu_b/worker*.jsonl" --out results/sweep_base_gpu_b/compare_run1.json
    python benchmarks/compare_runs.py pairs NEW_PAIR_JSON results/pairs/base_test_hypotheses.json.gz \
        --out results/sweep_base_gpu_b/pair_reproduction.json

``sweeps``: for every cell key both file sets hold (same worker file name; with ``--by-key`` the
key alone, for runs whose workers held other methods, where a key held by several files of a run,
such as each worker's verifier-only baseline, is taken from the first file), the BLEU difference,
the wall-clock ratio (second / first) and the change of relative latency. ``pairs``: a pair
evaluation written by ``benchmarks/train_pair.py`` (with hypotheses) against the hypotheses of an
earlier training: test scores, agreement, and whether every output is identical.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import statistics
from pathlib import Path

from speccascade.eval.sweep import read_records


def cells(pattern: str, by_key: bool = False) -> dict:
    out = {}
    for path in sorted(glob.glob(pattern)):
        for r in read_records(Path(path)):
            if r.get("type") == "cell":
                out.setdefault(("*" if by_key else Path(path).name, r["key"]), r)
    return out


def compare_sweeps(first: str, second: str, by_key: bool = False) -> dict:
    a, b = cells(first, by_key), cells(second, by_key)
    shared = sorted(set(a) & set(b))
    rows = [{"file": f, "key": k, "method": a[(f, k)]["method"],
             "bleu": [a[(f, k)]["quality"]["bleu"], b[(f, k)]["quality"]["bleu"]],
             "latency_ratio": b[(f, k)]["latency_s"] / a[(f, k)]["latency_s"],
             "relative_latency": [a[(f, k)]["relative_latency"], b[(f, k)]["relative_latency"]]}
            for f, k in shared]

    def spread(values):
        return [min(values), max(values)] if values else None
    base = [r for r in rows if r["method"] == "verifier_only"]
    spec = [r for r in rows if r["method"] not in ("verifier_only", "drafter_only", "seq_cascade", "oracle_diff",
                                                    "token_cascade", "bild")]
    return {"first": first, "second": second, "matched_by": "key" if by_key else "file and key",
            "shared_cells": len(rows),
            "max_abs_bleu_difference": max(abs(r["bleu"][1] - r["bleu"][0]) for r in rows) if rows else None,
            "verifier_only_latency_ratio_by_T": {
                f"T={T:g}": spread([r["latency_ratio"] for r in base if a[(r["file"], r["key"])]["temperature"] == T])
                for T in sorted({a[(r["file"], r["key"])]["temperature"] for r in base})},
            "speculative_latency_ratio": spread([r["latency_ratio"] for r in spec]),
            "speculative_relative_latency_change": spread([r["relative_latency"][1] - r["relative_latency"][0]
                                                           for r in spec]),
            "speculative_latency_ratio_median": statistics.median(r["latency_ratio"] for r in spec) if spec else None,
            "cells": rows}


def compare_pairs(new_pair: Path, old_hypotheses: Path) -> dict:
    new = json.loads(new_pair.read_text())
    old = json.load(gzip.open(old_hypotheses))
    return {"new": str(new_pair), "old_hypotheses": str(old_hypotheses), "card": new.get("card"),
            "torch": new.get("torch"),
            "validation_bleu": {role: t.get("validation_bleu") for role, t in new.get("training", {}).items()},
            "test": {k: {m: v[m] for m in ("bleu", "chrf", "tokens") if m in v} for k, v in new["test"].items()},
            "agreement": new.get("agreement"),
            "test_hypotheses_identical_to_first_pair": {k: new["test"][k].get("hypotheses") == old[k] for k in old},
            "test_outputs_compared": {k: len(old[k]) for k in old}}


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("sweeps")
    s.add_argument("first")
    s.add_argument("second")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--by-key", action="store_true", help="match cells by key alone (other worker layouts)")
    p = sub.add_parser("pairs")
    p.add_argument("new_pair", type=Path)
    p.add_argument("old_hypotheses", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rec = compare_sweeps(args.first, args.second, args.by_key) if args.what == "sweeps" else \
        compare_pairs(args.new_pair, args.old_hypotheses)
    args.out.write_text(json.dumps(rec, indent=2))
    print(json.dumps({k: v for k, v in rec.items() if k not in ("cells", "test")}, indent=1))


if __name__ == "__main__":
    main()
