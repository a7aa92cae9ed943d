"""Is sampled `sd` lossless in the sweeps' records? Across runs, its BLEU against `verifier_only`'s at T > 0.

Speculative decoding samples exactly the verifier's law (Leviathan et al. 2023; the paper's Algorithm 4
with the verifier's distribution as the target), which the law tests prove on small vocabularies
(``tests/test_loop_law.py``, ``tests/test_gpu.py``). A sweep checks it on the real pair only through
quality: at T > 0 one sweep's `sd` cell lands above or below `verifier_only`'s BLEU by chance (±1 BLEU on
500 verses), so one run says little. Many runs of independent pairs say more: this script takes, from
each run, the first sweep file (in the order given) holding both cells at the temperature and gamma
asked, the paired difference Δ = BLEU(sd) − BLEU(verifier_only) with its bootstrap standard error (the
95% interval's width / 3.92, :func:`speccascade.eval.metrics.paired_bootstrap`), and pools the runs
with inverse-variance weights (a fixed-effect mean): z = mean / its standard error. A lossless `sd`
gives |z| < 2 about 95% of the time; a biased one drifts further with every run. Beside it, the sign
test (how many runs fall below). Each seed of a cell counts as its own comparison (against the baseline
of its seed). One JSON record.

    python benchmarks/sd_lossless_check.py results/deep_pair/*/sweep*.jsonl.gz results/deep_pair/sweep.jsonl.gz \
        --out results/deep_pair/sd_lossless_T1.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from speccascade.eval.metrics import paired_bootstrap
from speccascade.eval.sweep import read_records


def comparisons(path: Path, temperature: float, gamma: int) -> list[dict]:
    """Each seed's (sd, verifier_only) pair of cells at batch 1 in one sweep file."""
    cells = [r for r in read_records(path) if r.get("type") == "cell" and r["temperature"] == temperature
             and r["batch_size"] == 1 and (r["method"] == "verifier_only" or r["gamma"] == gamma)]
    base = {r["seed"]: r for r in cells if r["method"] == "verifier_only"}
    out = []
    for r in cells:
        ref = base.get(r["seed"])
        if r["method"] != "sd" or ref is None:
            continue
        stats, ref_stats = (r.get("quality_stats") or {}).get("bleu"), (ref.get("quality_stats") or {}).get("bleu")
        if stats is None or ref_stats is None or len(stats) != len(ref_stats):
            continue
        test = paired_bootstrap("bleu", stats, ref_stats)
        se = (test["ci95"][1] - test["ci95"][0]) / 3.92
        out.append({"seed": r["seed"], "examples": len(stats), "sd_bleu": r["quality"]["bleu"],
                    "verifier_bleu": ref["quality"]["bleu"], "delta": test["delta"], "se": se,
                    "hypothesis_tokens_ratio": sum(s[0] for s in stats) / max(sum(s[0] for s in ref_stats), 1)})
    return out


def pooled(rows: list[dict]) -> dict:
    """Inverse-variance (fixed-effect) mean of the differences, its standard error and z."""
    rows = [r for r in rows if r["se"] > 0]
    if not rows:
        return {"comparisons": 0, "mean_delta": None, "se": None, "z": None}
    w = [1 / r["se"] ** 2 for r in rows]
    mean = sum(wi * r["delta"] for wi, r in zip(w, rows)) / sum(w)
    se = 1 / math.sqrt(sum(w))
    n, neg = len(rows), sum(r["delta"] < 0 for r in rows)
    # the sign test: two-sided binomial p of a split at least this uneven, were each side equally likely
    k = max(neg, n - neg)
    sign_p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n)
    return {"comparisons": n, "mean_delta": mean, "se": se, "z": mean / se, "negative": neg, "sign_test_p": sign_p}


def check(paths: list[Path], temperature: float = 1.0, gamma: int = 5) -> dict:
    """One run per folder: the first of its files that holds the comparison."""
    runs, seen = [], set()
    for path in paths:
        run = str(Path(path).parent)
        if run in seen:
            continue
        rows = comparisons(Path(path), temperature, gamma)
        if rows:
            seen.add(run)
            runs += [{"run": run, "file": Path(path).name} | r for r in rows]
    return {"benchmark": "sd_lossless_check", "temperature": temperature, "gamma": gamma, "runs": runs,
            "pooled": pooled(runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="sweep files (.jsonl or .jsonl.gz); one run per folder")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--gamma", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rec = check(sorted(args.files, key=str), args.temperature, args.gamma)
    text = json.dumps(rec, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    p = rec["pooled"]
    for r in rec["runs"]:
        print(f"{r['run']:32s} seed {r['seed']}: delta {r['delta']:+.2f} (se {r['se']:.2f})")
    if p["comparisons"]:
        print(f"{p['comparisons']} comparisons, {p['negative']} below the verifier (sign test p "
              f"{p['sign_test_p']:.3f}): pooled delta {p['mean_delta']:+.3f} BLEU (se {p['se']:.3f}, z {p['z']:+.2f})")


if __name__ == "__main__":
    main()
