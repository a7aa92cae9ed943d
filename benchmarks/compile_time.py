"""How long torch.compile takes for the fused backend's step: the whole model as one program, or
compiled per region (the prologue, one decoder layer reused for every layer, the head: what
``FusedLlamaBackend(compile=True)`` does).

A sweep on a GPU compiles one step per (batch, feed width, cache size) and model; with the whole
30-layer model in one program that took minutes per specialisation on an H200 (results/deep_pair/
run1: 13 minutes of compiling per sweep worker before its first cell). This script measures, for a
model of a given shape with random weights, the first call of each feed width (the compile) and a
later call (the run), in a fresh process per mode with its own empty inductor cache (cold), then
again in a second process on that cache (warm: what torch's on-disk caches save a later process).
It also checks that each compiled step gives the eager step's logits.

    python benchmarks/compile_time.py --out results/compile/compile_time_cpu.json            # CPU, 1 thread
    python benchmarks/compile_time.py --device cuda --dtype bfloat16 --out /tmp/compile_gpu.json

The default shape is the deep pair's verifier (30 layers x 576, GQA 9/3 heads, 1536 feed-forward,
the Bible task's 8,000-token vocabulary).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("whole", "layer")


def child(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from speccascade.models.fused import FusedLlamaBackend

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv, intermediate_size=args.inter,
                      max_position_embeddings=4096, tie_word_embeddings=True)
    dtype = getattr(torch, args.dtype)
    model = LlamaForCausalLM(cfg).to(args.device, dtype).eval()
    eager = FusedLlamaBackend(model, "eager")
    if args.mode == "layer":
        b = FusedLlamaBackend(model, "verifier", compile=True)
    else:   # the whole step traced as one program: the layers unrolled into it
        b = FusedLlamaBackend(model, "verifier")
        b.compiled = True
        b._step_fn = torch.compile(b._step, dynamic=False, fullgraph=True)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    prompt = torch.randint(1, args.vocab, (1, 24), device=args.device)
    mask = torch.ones_like(prompt)
    out = {"mode": args.mode, "widths": {}}
    for bk in (b, eager):
        bk.reserve(1, args.slots - 8)
    for w in args.widths:
        feed = torch.randint(1, args.vocab, (1, w), device=args.device)
        times = []
        for _ in range(3):   # the first call compiles
            for bk in (b, eager):
                bk.reset(prompt, mask)
            sync()
            t0 = time.perf_counter()
            got = b.extend(feed)
            sync()
            times.append(time.perf_counter() - t0)
        want = eager.extend(feed)
        out["widths"][str(w)] = {"first_call_s": round(times[0], 3), "run_ms": round(1e3 * min(times[1:]), 3),
                                 "max_abs_diff_vs_eager": float((got - want).abs().max())}
    out["compile_s_total"] = round(sum(v["first_call_s"] - v["run_ms"] / 1e3 for v in out["widths"].values()), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default 1)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv", type=int, default=3)
    ap.add_argument("--inter", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--slots", type=int, default=256, help="cache slots (the request's capacity)")
    ap.add_argument("--widths", type=int, nargs="+", default=[1, 6], help="feed widths (1: a decode step; "
                    "gamma + 1: a block's scoring call)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)   # the child process
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return
    import torch
    import transformers

    record = {"benchmark": "compile_time", "device": args.device, "dtype": args.dtype,
              "machine": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu",
              "threads": args.threads if args.device == "cpu" else None,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "shape": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "kv", "inter", "vocab", "slots")},
              "widths": args.widths, "runs": []}
    base = [a for a in sys.argv[1:]]
    strip = {"--out", "--modes"}
    cmd, skip = [], 0
    for a in base:   # the parent's arguments, less --out / --modes and their values
        if skip and not a.startswith("--"):
            continue
        skip = a in strip
        if not skip:
            cmd.append(a)
    for mode in args.modes:
        with tempfile.TemporaryDirectory() as cache:
            env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
            for cache_state in ("cold", "warm"):
                t0 = time.perf_counter()
                p = subprocess.run([sys.executable, __file__, *cmd, "--mode", mode], env=env, capture_output=True,
                                   text=True)
                if p.returncode:
                    sys.exit(f"{mode} ({cache_state}) failed:\n{p.stderr[-4000:]}")
                run = json.loads(p.stdout.strip().splitlines()[-1]) | {"cache": cache_state,
                                                                       "process_s": round(time.perf_counter() - t0, 1)}
                print(json.dumps(run), flush=True)
                record["runs"].append(run)
    by = {(r["mode"], r["cache"]): r["compile_s_total"] for r in record["runs"]}
    if ("whole", "cold") in by and ("layer", "cold") in by:
        record["summary"] = {"whole_cold_s": by["whole", "cold"], "layer_cold_s": by["layer", "cold"],
                             "whole_over_layer_cold": round(by["whole", "cold"] / max(by["layer", "cold"], 1e-9), 2),
                             "whole_warm_s": by.get(("whole", "warm")), "layer_warm_s": by.get(("layer", "warm"))}
        print(json.dumps(record["summary"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
