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
* the acceptance a that the model, scaled by that realised share, needs for each target speed-up;
* where the unrealised share goes (``speedup_steps``): the modelled speed-up, then the same with the
  loop's drafter calls a block (gamma + 1 in records made before sd fed its last draft with the next
  block; the last gives q at the bonus position), then with the
  measured blocks instead of the i.i.d. model's, then with the block (and the baseline's step) run
  past the end of each example (the host read a block's flags one block late; records made since it
  waits near the end count these steps, ``steps_past_end``), then with both
  models' pre-fills, all at the sweep's measured per-call costs; what is left between that and the
  measured speed-up is the work between the model calls (sampling, verification, bookkeeping) and
  the host (``unmodelled_share``: each cell's measured wall over its modelled wall, minus 1), also per
  step (``per_step_s``: an `sd` block's and a `verifier_only` step's wall, pre-fills taken out, against
  their model calls) with the host's waits near the end (``end_waits``, in records made since they are
  counted).

And for every other speculative cell (``blocks``): its wall over its blocks beside the same run's `sd`
cell's (same temperature, gamma, worker and seed), the difference being what a block of that method
costs more than `sd`'s (run 19 of the deep pair: the cascades' extra drafter call beside the verifier's).
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


def speedup_steps(r: dict, ref: dict, cost: dict, modelled: float, measured: float) -> dict:
    """The modelled speed-up of an ``sd`` cell ``r`` over its worker's ``verifier_only`` cell ``ref``,
    taken step by step to the measured one (see the module's docstring); times in seconds."""
    gamma, st, vt = r["gamma"], r["stats"], ref["stats"]
    n = vt["prefill_calls"]                                      # examples (one pre-fill each)
    s_d, s_v, blk = cost["drafter_step_s"], cost["verifier_step_s"], cost["verifier_block_s"]
    # the loop's block: its drafter calls (gamma + 1; gamma for sd since it feeds the last draft with the
    # next block) and one verifier call
    per_block = st["drafter_calls"] / st["verifier_calls"] if st.get("verifier_calls") else gamma + 1
    # (a feature drafter's first call of a block, a ragged feed of up to gamma + 1 tokens, is timed apart)
    block = per_block * s_d + blk + cost.get("drafter_first_call_s", s_d) - s_d
    base_steps, sd_blocks = vt["verifier_calls"] * s_v, st["blocks"] * block
    # steps run past the end: counted in records made since the host waits near the end (else one
    # per example and model loop: the flags were always read one step late)
    past_v, past_sd = vt.get("steps_past_end", n), st.get("steps_past_end", n)
    base_past, sd_past = base_steps + past_v * s_v, sd_blocks + past_sd * block
    # sd's pre-fills: a feature drafter's verifier pre-fill returns its states (timed apart where the sweep did)
    sd_prefill = cost.get("verifier_prefill_states_s", cost["verifier_prefill_s"]) + cost["drafter_prefill_s"]
    base_all = base_past + n * cost["verifier_prefill_s"]
    sd_all = sd_past + n * sd_prefill
    return {"modelled": modelled,
            "drafter_calls_per_block": per_block,
            "with_the_loops_drafter_calls": modelled * (gamma * s_d + blk) / block,
            "with_measured_blocks": base_steps / sd_blocks,
            "with_the_step_past_the_end": base_past / sd_past,
            "with_prefills": base_all / sd_all,
            "measured": measured,
            "unmodelled_share": {"sd": r["latency_s"] / sd_all - 1, "verifier_only": ref["latency_s"] / base_all - 1},
            "steps_past_the_end": {"sd": past_sd, "verifier_only": past_v},
            # each step's wall (pre-fills taken out, steps past the end counted) against its model calls:
            # what is left is the work between the calls and the host's (waits near the end included)
            "per_step_s": {
                "sd": _per_step(r["latency_s"] - n * sd_prefill,
                                st["blocks"] + past_sd, block),
                "verifier_only": _per_step(ref["latency_s"] - n * cost["verifier_prefill_s"],
                                           vt["verifier_calls"] + past_v, s_v)},
            "end_waits": {"sd": st.get("end_waits"), "verifier_only": vt.get("end_waits")},
            "past_the_end_share_of_wall": {"sd": past_sd * block / r["latency_s"],
                                           "verifier_only": past_v * s_v / ref["latency_s"]}}


def _per_step(wall: float, steps: int, calls: float) -> dict:
    measured = wall / steps
    return {"measured": measured, "model_calls": calls, "outside_the_calls": measured - calls}


def analyse(records: list[dict]) -> dict:
    cells = [r for r in records if r.get("type") == "cell" and r["batch_size"] == 1]
    costs = {r["gamma"]: r for r in records if r.get("type") == "costs"}
    # each sweep run times its own verifier_only (per worker, temperature and seed; its key carries the run's gamma)
    base = {(r["temperature"], r.get("worker", 0), r.get("seed", 0), r["gamma"]): r
            for r in cells if r["method"] == "verifier_only"}
    base_any = {k[:3]: v for k, v in base.items()}
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
        run = (r["temperature"], r.get("worker", 0), r.get("seed", 0))
        ref = base.get(run + (r["gamma"],)) or base_any.get(run)
        # against the baseline its own sweep run timed (the sweep's rule since run 10; a file written before
        # it may hold a ratio against an earlier run's baseline, as run 10's gamma = 3 cell does)
        measured = ref["latency_s"] / r["latency_s"] if ref is not None else 1 / r["relative_latency"]
        modelled = modelled_speedup(a, r["gamma"], c, b)
        realised = measured / modelled
        row = {"temperature": r["temperature"], "gamma": r["gamma"], "worker": r.get("worker", 0),
               "seed": r.get("seed", 0),
               "per_position_acceptance": a, "accepted": r["stats"]["accepted"], "drafted": r["stats"]["drafted"],
               "tokens_per_verifier_call": r["stats"]["tokens_per_verifier_call"],
               "cost_ratio_c": c, "block_over_step_b": b, "measured_speedup": measured,
               "modelled_speedup": modelled, "realised_share": realised,
               "acceptance_needed": {f"{t:g}x": needed_acceptance(t, r["gamma"], c, b, realised) for t in TARGETS}}
        if ref is not None:
            row["speedup_steps"] = speedup_steps(r, ref, cost, modelled, measured)
        if r["temperature"] == 0 and ref is not None:
            a_stats, v_stats = r["quality_stats"]["bleu"], ref["quality_stats"]["bleu"]
            row["examples_differing_from_verifier_only"] = sum(x != y for x, y in zip(a_stats, v_stats))
            row["examples"] = len(v_stats)
            row["bleu"], row["verifier_only_bleu"] = r["quality"]["bleu"], ref["quality"]["bleu"]
        out.append(row)
    return {"sd": out, "blocks": block_costs(cells)}


def block_costs(cells: list[dict]) -> list[dict]:
    """Each speculative cell's wall a block (pre-fills and all, as a sweep times it) and its excess over
    the `sd` cell of the same temperature, gamma, worker and seed."""
    def where(r):
        return r["temperature"], r["gamma"], r.get("worker", 0), r.get("seed", 0)

    per_block = {id(r): r["latency_s"] / r["stats"]["blocks"] for r in cells if r["stats"].get("blocks")}
    sd = {where(r): per_block[id(r)] for r in cells if r["method"] == "sd" and id(r) in per_block}
    return [{"method": r["method"], "alpha": r.get("alpha"), "temperature": r["temperature"], "gamma": r["gamma"],
             "seed": r.get("seed", 0), "blocks": r["stats"]["blocks"], "block_s": per_block[id(r)],
             "over_sd_s": per_block[id(r)] - sd[where(r)] if where(r) in sd else None}
            for r in cells if r["method"] != "sd" and id(r) in per_block]


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
