"""What the host's wait near the end of a decode buys in wall-clock (runner.StepSync): the same cells
with the flags read one step late and the wait on (a GPU's default for batches), one step late with
the wait off (the loop before it: one step past every end), and read at once (no lag: an idle gap of
the device after every step; a GPU's default at batch 1 since the deep pair's run 8 measured it
fastest, runner.AT_ONCE_ROWS), and read at once with the pre-fills in the order they had before run 9
(the drafter's first: ``loop.PREFILL_VERIFIER_FIRST`` off; only ``sd`` runs it, as ``verifier_only``
pre-fills one model). Writes one JSON record naming the card.

    python benchmarks/end_wait.py --drafter runs/deep/drafter --verifier runs/deep/verifier --device cuda \\
        --out runs/end_wait.json
    python benchmarks/end_wait.py --out /tmp/end_wait_cpu.json --examples 20     # the shipped tiny pair, one CPU thread

Each mode runs ``sd`` (gamma 5) and ``verifier_only`` at T = 0 over the same test verses at batch 1,
in turn (mode A, B, C, then again, ``--rounds`` times), after one untimed pass that compiles and
captures every program (fused backend on a GPU). The record keeps every round's wall and the medians,
the steps run past the end and the outputs' agreement across modes (they must be identical: the
modes change only when the host reads the flags).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import speccascade
from speccascade import loop
from speccascade.eval.sweep import device_name
from speccascade.eval.tasks import get_task, run_task
from speccascade.loop import StepSync
from speccascade.models import make_backend
from speccascade.models.base import reserve_request

#: mode: (flags read one step late, wait near the end, the verifier pre-filled first)
MODES = {"late_with_wait": (True, True, True), "late_without_wait": (True, False, True), "at_once": (False, True, True),
         "at_once_drafter_prefilled_first": (False, True, False)}


def main() -> None:
    from speccascade.cli import _load_pair, _model_args, _pair_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _pair_args(ap)     # the pair and its tokenizer (the verifier's), loaded as `speccascade sweep` loads them
    _model_args(ap)
    ap.set_defaults(dtype=None, backend=None)   # default: bfloat16 and fused on a GPU, float32 and dynamic on a CPU
    ap.add_argument("--examples", type=int, default=100)
    ap.add_argument("--size-examples", type=int, default=None,
                    help="size the caches for the longest of this many test verses (a sweep's --examples: the "
                         "same compiled shapes, found in torch's on-disk caches); default --examples")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", default="sd,verifier_only")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(1)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    backend = args.backend = args.backend or ("fused" if cuda else "dynamic")
    dtype = getattr(torch, args.dtype)
    d_model, v_model, tok, (d_dir, v_dir) = _load_pair(args)
    task = get_task()
    inputs = [ex.input for ex in task.examples(args.examples)]
    d_be, v_be = make_backend(d_model, "drafter", backend), make_backend(v_model, "verifier", backend)
    longest = max(len(task.encode(tok, ex.input)) for ex in task.examples(args.size_examples or args.examples))
    for be in (d_be, v_be):
        reserve_request(be, 1, longest, 128, 5)
    methods = args.methods.split(",")

    def run(method: str):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        hyps, stats = run_task(d_be, v_be, tok, task, inputs, method=method, gamma=5, temperature=0.0)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, hyps, stats

    def modes(method: str) -> dict:   # the pre-fill order matters only where two models are pre-filled
        return {k: v for k, v in MODES.items() if v[2] or method != "verifier_only"}

    walls = {m: {mode: [] for mode in modes(m)} for m in methods}
    past, outputs = {m: {} for m in methods}, {m: {} for m in methods}
    try:
        for method in methods:
            run(method)   # compile and capture (untimed)
        for _ in range(args.rounds):
            for method in methods:
                for mode, (lagged, wait, verifier_first) in modes(method).items():
                    StepSync.lagged, StepSync.wait_near_end = lagged, wait
                    loop.PREFILL_VERIFIER_FIRST = verifier_first
                    wall, hyps, stats = run(method)
                    walls[method][mode].append(wall)
                    past[method][mode] = stats.steps_past_end
                    outputs[method][mode] = hyps
    finally:
        StepSync.lagged, StepSync.wait_near_end = None, True
        loop.PREFILL_VERIFIER_FIRST = True
    med = {m: {mode: statistics.median(w) for mode, w in per.items()} for m, per in walls.items()}
    record = {"benchmark": "end_wait", "card": device_name(torch.device(args.device)), "torch": torch.__version__,
              "speccascade": speccascade.__version__, "backend": backend, "dtype": str(dtype).removeprefix("torch."),
              "drafter": os.path.relpath(d_dir), "verifier": os.path.relpath(v_dir), "examples": len(inputs),
              "gamma": 5, "temperature": 0.0, "batch_size": 1, "rounds": args.rounds,
              "median_wall_s": med, "walls_s": walls, "steps_past_end": past,
              "outputs_identical_across_modes": {m: len({tuple(h) for h in o.values()}) == 1
                                                 for m, o in outputs.items()},
              "speedup_of_the_wait": {m: per["late_without_wait"] / per["late_with_wait"] for m, per in med.items()}}
    if "sd" in med and "verifier_only" in med:
        # (the baseline has no pre-fill order: its at-once wall serves both at-once modes)
        base = med["verifier_only"]
        record["sd_speedup_over_verifier_only"] = {mode: base.get(mode, base["at_once"]) / wall
                                                   for mode, wall in med["sd"].items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("card", "median_wall_s", "steps_past_end", "speedup_of_the_wait",
                                            "outputs_identical_across_modes")}, indent=2))


if __name__ == "__main__":
    main()
