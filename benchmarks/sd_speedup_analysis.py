"""What a sweep's `sd` cells say about reaching a speed-up target: the numbers behind the deep
pair's and the T5 pair's notes, from their committed records only.

    python benchmarks/sd_speedup_analysis.py results/deep_pair/sweep.jsonl.gz --out results/deep_pair/analysis.json

For each `sd` cell (γ of the cell, batch 1):
* at T = 0, on how many examples its per-example BLEU statistics differ from the same worker's
  `verifier_only` (greedy `sd` is the verifier's own output in exact arithmetic: a difference is
  a rounding near-tie; identical statistics with different outputs are not counted, so this is a
  lower bound);
* the per-position acceptance a (drafts accepted at position i+1 over those reaching it, pooled),
  the measured speed-up (1 / relative latency) and the one the i.i.d. model of Leviathan et al.
  predicts from a and the sweep's measured per-call costs: tokens per block
  (1 - a^(γ+1)) / (1 - a) over the block's cost γ·c + b in verifier steps (c = drafter step /
  verifier step, b = verifier block / verifier step); their ratio is the share of the modelled
  speed-up the loop realises (host work, pre-fills, truncation at the end);
* the acceptance a that the model, scaled by that realised share, needs for each target speed-up.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from speccascade.eval.sweep import read_records

TARGETS = (1.5, 1.8)


def tokens_per_block(a: float, gamma: int) -> float:
    return float(gamma + 1) if a >= 1 else (1 - a ** (gamma + 1)) / (1 - a)


def modelled_speedup(a: float, gamma: int, c: float, b: float) -> float:
    return tokens_per_block(a, gamma) / (gamma * c + b)


def needed_acceptance(target: float, gamma: int, c: float, b: float, realised: float) -> float | None:
    """The smallest a (bisection) whose modelled speed-up times ``realised`` reaches ``target``."""
    if modelled_speedup(1.0, gamma, c, b) * realised < target:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if modelled_speedup(mid, gamma, c, b) * realised < target else (lo, mid)
    return hi


def analyse(records: list[dict]) -> dict:
    cells = [r for r in records if r.get("type") == "cell" and r["batch_size"] == 1]
    costs = {r["gamma"]: r for r in records if r.get("type") == "costs"}
    base = {(r["temperature"], r.get("worker", 0)): r for r in cells if r["method"] == "verifier_only"}
    out = []
    for r in cells:
        if r["method"] != "sd":
            continue
        cost = costs.get(r["gamma"]) or next(iter(costs.values()))
        c = cost["drafter_step_s"] / cost["verifier_step_s"]
        b = cost["verifier_block_s"] / cost["verifier_step_s"]
        per_pos = r["stats"]["accepted_per_position"]
        reached = [r["stats"]["blocks"]] + per_pos[:-1]     # drafts examined at each position
        a = sum(per_pos) / sum(reached)
        measured = 1 / r["relative_latency"]
        modelled = modelled_speedup(a, r["gamma"], c, b)
        realised = measured / modelled
        row = {"temperature": r["temperature"], "gamma": r["gamma"], "worker": r.get("worker", 0),
               "per_position_acceptance": a, "accepted": r["stats"]["accepted"], "drafted": r["stats"]["drafted"],
               "tokens_per_verifier_call": r["stats"]["tokens_per_verifier_call"],
               "cost_ratio_c": c, "block_over_step_b": b, "measured_speedup": measured,
               "modelled_speedup": modelled, "realised_share": realised,
               "acceptance_needed": {f"{t:g}x": needed_acceptance(t, r["gamma"], c, b, realised) for t in TARGETS}}
        ref = base.get((r["temperature"], r.get("worker", 0)))
        if r["temperature"] == 0 and ref is not None:
            a_stats, v_stats = r["quality_stats"]["bleu"], ref["quality_stats"]["bleu"]
            row["examples_differing_from_verifier_only"] = sum(x != y for x, y in zip(a_stats, v_stats))
            row["examples"] = len(v_stats)
            row["bleu"], row["verifier_only_bleu"] = r["quality"]["bleu"], ref["quality"]["bleu"]
        out.append(row)
    return {"sd": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result = analyse(read_records(args.sweep))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
