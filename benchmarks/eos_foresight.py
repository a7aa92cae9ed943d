"""How often a decode's end is foreseen, so that no step runs past it (runner.StepSync's wait near the
end), on a pair and test verses, at batch 1. Writes one JSON record.

    python benchmarks/eos_foresight.py --out results/pairs/eos_foresight_cpu.json            # the shipped tiny pair
    python benchmarks/eos_foresight.py --drafter runs/deep/drafter --verifier runs/deep/verifier --device cuda ...

On a GPU the host reads each step's flags one step late; here (any device) that reading is forced on
(``StepSync.lagged``), so ``Stats.steps_past_end`` counts, per method and temperature, the decodes whose
last step was followed by one more, and ``waits`` the steps after which the host waited for the next
one's flags (each costs the device an idle gap on a GPU; those not followed by the end are false
alarms). For ``sd`` a block in which the drafter gives EOS at least ``loop.NEAR_END_EOS_PROB``
announces the end; one-token decoding (``verifier_only``) has no such look-ahead, and the record also
gives the verifier's own probability of EOS one step before it emits it (teacher-forced on its
greedy output), the signal such a decode could use instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

import speccascade as sc
from speccascade.eval.tasks import get_task
from speccascade.loop import NEAR_END_EOS_PROB, StepSync
from speccascade.models import make_backend


def main() -> None:
    from speccascade.cli import _load_pair, _model_args, _pair_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _pair_args(ap)     # the pair and its tokenizer (the verifier's), loaded as `speccascade sweep` loads them
    _model_args(ap)
    ap.add_argument("--examples", type=int, default=150)
    ap.add_argument("--gamma", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    d, v, tok, (d_dir, v_dir) = _load_pair(args)
    d_be, v_be = make_backend(d, "drafter", args.backend), make_backend(v, "verifier", args.backend)
    task = get_task()
    eos = task.eos_token_id(tok)
    StepSync.lagged = True
    cells = {f"{m} T={t:g}": (m, t) for t in (0.0, 1.0) for m in ("sd", "verifier_only")}
    past, wait_count, blocks = {k: [] for k in cells}, dict.fromkeys(cells, 0), dict.fromkeys(cells, 0)
    eos_prob_before = []
    try:
        for ex in task.examples(args.examples):
            ids = task.encode(tok, ex.input)
            for key, (method, temperature) in cells.items():
                out = sc.generate(d_be, v_be, [ids], method=method, gamma=args.gamma, temperature=temperature,
                                  max_new_tokens=args.max_new_tokens, eos_token_id=eos, seed=0)
                past[key].append(out.stats.steps_past_end)
                wait_count[key] += out.stats.end_waits
                blocks[key] += out.stats.blocks or out.stats.verifier_calls
                if key == "verifier_only T=0" and out.tokens[0][-1:] == [eos] and len(out.tokens[0]) >= 2:
                    x = torch.tensor([ids + out.tokens[0][:-1]], device=args.device)
                    with torch.no_grad():
                        logits = v(x).logits[0, -2].float()   # the step before the one that emitted EOS
                    eos_prob_before.append(torch.softmax(logits, -1)[eos].item())
    finally:
        StepSync.lagged = None
    record = {"benchmark": "eos_foresight", "device": args.device, "torch": torch.__version__,
              "drafter": os.path.relpath(d_dir), "verifier": os.path.relpath(v_dir),
              "examples": args.examples, "gamma": args.gamma,
              "max_new_tokens": args.max_new_tokens, "near_end_eos_prob": NEAR_END_EOS_PROB,
              "decodes_with_a_step_past_the_end": {m: sum(x > 0 for x in xs) for m, xs in past.items()},
              "share_foreseen": {m: 1 - sum(x > 0 for x in xs) / len(xs) for m, xs in past.items()},
              "waits": wait_count, "steps": blocks,
              "verifier_eos_prob_one_step_before": {
                  "median": statistics.median(eos_prob_before), "max": max(eos_prob_before),
                  "decodes": len(eos_prob_before)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
