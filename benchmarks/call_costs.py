"""Per-call costs of a pair by feed width, timed the way a sweep times them: what this machine makes of
the latency model's c (a drafter step over a verifier step) and b (a verifier call on gamma + 1 tokens
over a one-token step). Writes one JSON record naming the card.

    python benchmarks/call_costs.py --out runs/costs.json          # random weights of the deep preset's shapes
    python benchmarks/call_costs.py --drafter runs/deep/drafter --verifier runs/deep/verifier --out runs/costs.json

Why: the deep pair's sweeps measured b = 1.03-1.04 for a 6-token verifier call in runs 2 and 4 and 1.24
in run 5, with the same code, torch, driver and shapes (results/deep_pair/run5/NOTE.md). Random weights
of the same shapes on the lent machine say whether the machine or the weights made the difference.

Each cost is ``models.timing.call_seconds`` (graph replays where the loops capture the calls, as in
``speccascade sweep``'s cost record), after the cache is sized as a sweep sizes it (the longest test
prompt + ``--max-new-tokens`` + one block); ``--rounds`` repeats every measurement and the record keeps
each round's value and their median. On a CPU (``--device cpu``, one thread) it times plain calls.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

import speccascade
from speccascade.eval.sweep import device_name
from speccascade.eval.tasks import get_task
from speccascade.models import make_backend
from speccascade.models.base import reserve_request
from speccascade.models.loading import TOKENIZER_DIR, load_causal_lm, load_tokenizer
from speccascade.models.timing import call_seconds
from speccascade.train.trainer import save_random_pair


def measure(drafter_dir: Path, verifier_dir: Path, device: str, dtype: torch.dtype, backend: str,
            widths: list[int], rounds: int, repeats: int, max_new_tokens: int, examples: int) -> dict:
    tok = load_tokenizer(TOKENIZER_DIR)   # the project's pairs share the embedded tokenizer
    task = get_task()
    prompts = [task.encode(tok, ex.input) for ex in task.examples(examples)]
    longest = max(len(p) for p in prompts)
    models = {role: load_causal_lm(path, device=device, dtype=dtype)
              for role, path in (("drafter", drafter_dir), ("verifier", verifier_dir))}
    backends = {role: make_backend(m, role, backend) for role, m in models.items()}
    for be in backends.values():
        reserve_request(be, 1, longest, max_new_tokens, max(widths) - 1)
    prompt = prompts[0]   # the sweep's cost record times after its first example's prompt
    times: dict[str, dict[int, list[float]]] = {"drafter": {1: []}, "verifier": {w: [] for w in widths}}
    for _ in range(rounds):
        for role, per_width in times.items():
            for w in per_width:
                per_width[w].append(call_seconds(backends[role], prompt, w, repeats))
    med = {role: {w: statistics.median(v) for w, v in per_width.items()} for role, per_width in times.items()}
    step = med["verifier"][1]
    return {"prompt_tokens": len(prompt), "cache_for_tokens": longest + max_new_tokens + max(widths),
            "drafter_step_s": med["drafter"][1], "verifier_step_s": step,
            "c": med["drafter"][1] / step,
            "verifier_call_s": {str(w): s for w, s in med["verifier"].items()},
            "b_by_width": {str(w): s / step for w, s in med["verifier"].items()},
            "rounds": {role: {str(w): v for w, v in per_width.items()} for role, per_width in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="deep", help="random weights of this preset's shapes (no --drafter/--verifier)")
    ap.add_argument("--drafter", type=Path, default=None)
    ap.add_argument("--verifier", type=Path, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default: bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--backend", default=None, help="default: fused on a GPU, dynamic on a CPU")
    ap.add_argument("--widths", default="1,2,3,4,5,6,7,8,9", help="verifier feed widths (gamma + 1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--examples", type=int, default=500, help="test examples whose longest prompt sizes the cache")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if (args.drafter is None) != (args.verifier is None):
        ap.error("give both --drafter and --verifier, or neither (random weights of --preset's shapes)")
    if args.device == "cpu":
        torch.set_num_threads(1)
    backend = args.backend or ("fused" if args.device.startswith("cuda") else "dynamic")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    widths = sorted({int(w) for w in args.widths.split(",")} | {1})
    with tempfile.TemporaryDirectory() as tmp:
        pair = (args.drafter, args.verifier) if args.drafter else save_random_pair(args.preset, Path(tmp))
        result = measure(*pair, args.device, getattr(torch, args.dtype), backend, widths, args.rounds,
                         args.repeats, args.max_new_tokens, args.examples)
    record = {"benchmark": "call_costs", "card": device_name(torch.device(args.device)),
              "weights": "trained: " + str(args.verifier) if args.verifier else f"random ({args.preset} shapes)",
              "dtype": args.dtype, "backend": backend, "torch": torch.__version__,
              "speccascade": speccascade.__version__, "python": platform.python_version(),
              "threads": torch.get_num_threads() if args.device == "cpu" else None} | result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("card", "weights", "c", "b_by_width")}, indent=2))


if __name__ == "__main__":
    main()
