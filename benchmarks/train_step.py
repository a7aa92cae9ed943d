"""Training steps per second on this machine, eager against ``train --compile`` (each decoder layer
compiled, ``trainer.compile_layers``), and what each makes of a time budget. Writes one JSON record
naming the card.

    python benchmarks/train_step.py --preset deep --roles verifier,drafter --device cuda \\
        --batch-sizes verifier=256 --out runs/train_step.json
    python benchmarks/train_step.py --preset tiny --roles drafter --steps 4 --out /tmp/train_step_cpu.json  # 1 thread

Each role's model is built with random weights (seed 0) in training mode with its recipe's dropout,
and runs the trainer's own step (``trainer.step_loss`` and ``trainer.optimizer_step``: bf16 autocast
on a GPU, fused AdamW) over the same batches of the shipped training verses in both modes, cut as
training cuts them (``length_batches``: lengths vary from batch to batch); a drafter distils from a
teacher of the verifier's shape (random weights, its layers compiled too in the compiled mode), as
``train --teacher`` does. Per mode: the first ``--warm-up`` steps, and then one batch of each padded
width the timed steps meet that those did not (a width's first step is slow in both modes), are timed
as one span (the compile happens there), then ``--steps`` steps. The record keeps both rates, each
warm-up's excess over the same steps at the mode's rate (the compile, and the first steps' allocations
in both modes), and the steps each mode fits in ``--budget-minutes``;
``pays`` is true where the compiled mode fits at least 3% more (``gpu_deep_pair_run.sh``'s
``TRAIN_COMPILE=auto`` reads it). ``--modes eager`` times the eager mode alone (no ``pays``).

``--profile-steps N`` (a GPU) then profiles N more eager steps (torch.profiler; ``gpu_speed.kernel_time_share``):
per step the host's wall, the device's kernel time and their ratio (``device_busy_fraction``, and
``device_busy_fraction_unprofiled`` against the unprofiled steps' rate, which the profiler's own host
overhead does not slow: near 1, the step waits on the device's kernels, and the top kernels say which;
well below 1, on the host: launches, the data's collation, Python), the kernels launched and the top
kernels by time. That is what decides
how a role's training could go faster (run 10: the verifier 5.2 steps/s at 256 sequences a step, the drafter
13.7 at 128 with its 30-layer teacher; a session's minutes of verifier training are what its test BLEU
follows).

    python benchmarks/train_step.py --preset deep --roles verifier,drafter --device cuda --modes eager \
        --batch-sizes verifier=256 --steps 20 --profile-steps 5 --out runs/train_profile.json

On an H200 (the deep pair's run 9, ``results/deep_pair/run9/NOTE.md``) compiling paid for neither role:
the verifier's compiled step ran at 0.64x the eager rate, and the drafter's compiled training ran at the
rate of an earlier run's eager one (18.2 against 18.7 steps/s) after ~50 s of compiling; that run's
benchmark, timed before the width warm-up existed, had called the drafter's compile a 1.49x gain.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

import speccascade
from speccascade.data.bible import load_split
from speccascade.eval.sweep import device_name
from speccascade.models.loading import TOKENIZER_DIR
from speccascade.models.timing import sync
from speccascade.train.tokenizer import load_tokenizer
from speccascade.train.trainer import (
    ARCHS,
    PRESETS,
    SHAPE_MULTIPLE,
    SOURCES,
    build_model,
    compile_layers,
    default_distill_weight,
    encode_pairs,
    length_batches,
    make_optimizer,
    optimizer_step,
    step_loss,
)

#: a mode must fit this much more of the budget's steps to count as paying
PAYS = 1.03


def width(batch, collate, multiple: int) -> tuple[int, ...]:
    """The padded widths a batch is trained at (each input's, rounded up as training rounds them)."""
    inputs, _ = collate(batch, torch.device("cpu"), multiple)
    return tuple(t.shape[-1] for t in inputs.values())


def width_warm_ups(warm: list, timed: list, collate, multiple: int) -> list:
    """One batch of each padded width the timed batches meet that the warm-up's did not: a width's first
    step is slow in both modes (kernel selection, allocations; the run 9 record, results/deep_pair/run9,
    timed the eager mode inside those first steps and overrated compiling), so both modes meet each width
    once before the timing."""
    seen = {width(b, collate, multiple) for b in warm}
    extra = []
    for b in timed:
        w = width(b, collate, multiple)
        if w not in seen:
            seen.add(w)
            extra.append(b)
    return extra


def run_mode(preset: str, role: str, compiled: bool, batches: list, device: torch.device, vocab: int,
             warm_up: int, steps: int, batch_size: int, profile_steps: int = 0) -> dict:
    """One mode's warm-up span and rate over ``batches`` (warm-up + steps of them); with
    ``profile_steps``, also the profile of that many more steps (:func:`profile_steps_of`)."""
    recipe = PRESETS[preset][role]
    torch.manual_seed(0)
    model = build_model(recipe.shape, vocab, recipe.attention_dropout, recipe.dropout).to(device).train()
    teacher = None
    if role == "drafter":
        torch.manual_seed(1)
        teacher = build_model(PRESETS[preset]["verifier"].shape, vocab).to(device).eval().requires_grad_(False)
    if compiled:
        compile_layers(model)
        if teacher is not None:
            compile_layers(teacher)
    opt = make_optimizer(model, recipe)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    distill_weight = default_distill_weight(recipe, teacher is not None)
    collate = ARCHS[recipe.arch].collate
    multiple = SHAPE_MULTIPLE if device.type == "cuda" else 1
    losses = []

    def step(batch) -> None:
        inputs, targets = collate(batch, device, multiple)
        loss = step_loss(model, inputs, targets, device, recipe.label_smoothing, teacher, distill_weight)
        optimizer_step(loss, model, opt, sched)
        losses.append(loss.detach())

    sync(device)
    start = time.perf_counter()
    warm = batches[:warm_up] + width_warm_ups(batches[:warm_up], batches[warm_up:], collate, multiple)
    for batch in warm:
        step(batch)
    sync(device)
    warm_s = time.perf_counter() - start
    start = time.perf_counter()
    for batch in batches[warm_up:warm_up + steps]:
        step(batch)
    sync(device)
    timed_s = time.perf_counter() - start
    rate = steps / timed_s
    out = {"warm_up_s": warm_s, "warm_up_steps": len(warm), "timed_s": timed_s, "steps_per_s": rate,
           "first_loss": float(losses[0]), "last_loss": float(losses[-1]), "batch_size": batch_size}
    if profile_steps:
        # the timed steps' batches again: every width is warm
        profiled = batches[warm_up:warm_up + steps][:profile_steps]
        out["profile"] = prof = profile_steps_of(lambda: [step(b) for b in profiled], len(profiled))
        # the profiler's own host overhead slows the profiled steps: against the unprofiled rate instead
        prof["device_busy_fraction_unprofiled"] = prof["kernel_s_per_step"] * rate
    return out


def profile_steps_of(run, steps: int, top: int = 15) -> dict:
    """``run`` (``steps`` training steps) under torch.profiler, per step: the host's wall, the device's
    kernel time, their ratio, the kernels launched and the ``top`` kernels by time
    (``gpu_speed.kernel_time_share``, which runs ``run`` once unprofiled first)."""
    from gpu_speed import kernel_time_share  # this folder is on sys.path when the script runs

    r = kernel_time_share(run, top)
    return {"steps": steps, "wall_s_per_step": r["wall_s"] / steps, "kernel_s_per_step": r["device_kernel_s"] / steps,
            "device_busy_fraction": r["device_busy_fraction"], "kernels_per_step": r["kernel_launches"] / steps,
            "top": [{"name": k["name"], "per_step": k["calls"] / steps, "s_per_step": k["total_s"] / steps}
                    for k in r["top_kernels"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="deep", choices=list(PRESETS))
    ap.add_argument("--roles", default="verifier,drafter", help="comma-separated: verifier, drafter")
    ap.add_argument("--batch-sizes", default="",
                    help="role=N,... (default: each recipe's batch), e.g. verifier=256 as the deep pair's runs use")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warm-up", type=int, default=10, help="steps timed as one span (the compile happens there)")
    ap.add_argument("--steps", type=int, default=40, help="steps timed after the warm-up")
    ap.add_argument("--budget-minutes", default="5.5",
                    help="the training budget to fit steps into: minutes, or role=M,... (e.g. verifier=5.5,drafter=5)")
    ap.add_argument("--sources", default="kjv,web", help="the training verses' English sides (trainer.SOURCES)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    ap.add_argument("--modes", default="eager,compiled", help="eager and / or compiled (pays needs both)")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="profile this many more eager steps (a GPU): device busy fraction, top kernels")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    device = torch.device(args.device)
    modes_asked = [m for m in args.modes.split(",") if m]
    if not modes_asked or any(m not in ("eager", "compiled") for m in modes_asked):
        raise SystemExit(f"--modes {args.modes!r}: give eager and / or compiled, e.g. --modes eager")
    if args.profile_steps and ("eager" not in modes_asked or device.type != "cuda"):
        raise SystemExit("--profile-steps profiles eager steps on a GPU: give --device cuda and eager in --modes")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    roles = [r for r in args.roles.split(",") if r]
    sizes = dict(kv.split("=") for kv in args.batch_sizes.split(",") if kv)
    budgets = (dict((r, float(m)) for r, m in (kv.split("=") for kv in args.budget_minutes.split(",")))
               if "=" in args.budget_minutes else dict.fromkeys(roles, float(args.budget_minutes)))
    bad = [r for r in roles + list(sizes) + list(budgets)
           if r not in ("verifier", "drafter") or r not in PRESETS[args.preset]]
    if bad:
        raise SystemExit(f"--roles / --batch-sizes: {', '.join(bad)}: preset {args.preset!r} has "
                         f"{', '.join(PRESETS[args.preset])}")
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    data = encode_pairs(tokenizer, [p for s in args.sources.split(",") for p in load_split(SOURCES[s])])
    lengths = [len(ids) for ids, _ in data]
    record = {"benchmark": "train_step", "card": device_name(device), "torch": torch.__version__,
              "speccascade": speccascade.__version__, "python": platform.python_version(),
              "threads": args.threads if device.type == "cpu" else None, "preset": args.preset,
              "warm_up": args.warm_up, "steps": args.steps, "budget_minutes": budgets, "roles": {}}
    for role in roles:
        budget = budgets.get(role, 5.5) * 60
        batch_size = int(sizes.get(role, PRESETS[args.preset][role].batch_size))
        order = length_batches(lengths, batch_size, random.Random(0))
        batches = [[data[i] for i in b] for b in order[:args.warm_up + args.steps]]
        modes = {}
        for name, compiled in (("eager", False), ("compiled", True)):
            if name not in modes_asked:
                continue
            modes[name] = run_mode(args.preset, role, compiled, batches, device, len(tokenizer), args.warm_up,
                                   args.steps, batch_size, args.profile_steps if name == "eager" else 0)
            if device.type == "cuda":
                torch.cuda.empty_cache()   # (the mode's model and optimiser are gone)
        for m in modes.values():   # the warm-up's excess over the same steps at the mode's rate: the compile
            # (and the first steps' allocations, in both modes)
            m["warm_up_excess_s"] = max(0.0, m["warm_up_s"] - m["warm_up_steps"] / m["steps_per_s"])
            m["steps_in_budget"] = max(0, int((budget - m["warm_up_excess_s"]) * m["steps_per_s"]))
        record["roles"][role] = dict(modes)
        if len(modes) == 2:
            gain = modes["compiled"]["steps_in_budget"] / max(modes["eager"]["steps_in_budget"], 1)
            speedup = modes["compiled"]["steps_per_s"] / modes["eager"]["steps_per_s"]
            record["roles"][role] |= {"speedup": speedup, "budget_gain": gain, "pays": gain >= PAYS}
        print(json.dumps({role: {m: {k: v.get(k) for k in ("steps_per_s", "steps_in_budget")} for m, v in modes.items()}
                          | {k: record["roles"][role].get(k) for k in ("speedup", "pays")}}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["roles"], indent=1))


if __name__ == "__main__":
    main()
