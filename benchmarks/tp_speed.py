"""Tensor-parallel verifier speed (issue 17): ``verifier_only`` and ``sd`` tokens/s at batch 1 and
16 with the verifier whole on one GPU (``--tp 1``) and split over two (``--tp 2``, transformers'
tensor parallelism, the model's own plan), for a Llama-3.1-8B-shaped verifier with random weights.

    pip install -e .        # speccascade importable (or PYTHONPATH=src)
    torchrun --nproc-per-node 2 benchmarks/tp_speed.py --out results/multigpu/tp_H200.json
    torchrun --nproc-per-node 2 benchmarks/tp_speed.py --device cpu --tiny --layers 2 --out /tmp/tp.json  # smoke

Rank 0 first measures ``--tp 1`` alone (rank 1 waits), then both ranks load the sharded verifier
and measure ``--tp 2``; rank 0 writes the record. The drafter (a small Llama of the same vocabulary,
random weights) sits whole on every rank. Random weights accept few drafts, so ``sd``'s tokens/s
here measures the cost of its calls (the record also gives tokens per verifier call), not a
speed-up a trained pair would see. EOS is off: every row emits exactly ``--new-tokens`` tokens.
Greedy (T = 0). Timings: medians over ``--repeats`` runs after one warm-up, CUDA synchronised.
The checkpoint is written once to ``--work-dir`` (about 16 GB in bfloat16 at the full shape;
``--layers`` shrinks it for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

#: Llama-3.1-8B (meta-llama/Llama-3.1-8B config.json)
VERIFIER = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
                "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
#: a ~0.3B drafter of the same vocabulary
DRAFTER = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 4, "num_attention_heads": 16,
               "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
               "rms_norm_eps": 1e-5, "tie_word_embeddings": True}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/multigpu/tp_H200.json"))
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/speccascade_tp_speed"))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--methods", nargs="+", default=["verifier_only", "sd"])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--gamma", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None, help="verifier layers (default: 32, the 8B shape)")
    ap.add_argument("--tp", type=int, default=2, help="the tensor-parallel degree measured against --tp 1")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a smoke run of this script over gloo (float32, use with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="shrink both shapes (hidden 256, vocab 8192): a smoke run")
    return ap.parse_args(argv)


def fail(msg: str) -> None:
    print(f"tp_speed: error: {msg}", file=sys.stderr)
    sys.exit(2)


def check_launch(tp: int, device: str = "cuda") -> tuple[int, int, int]:
    import torch

    if device == "cpu":
        pass
    elif not torch.cuda.is_available():
        fail(f"needs {tp} CUDA GPUs; torch {torch.__version__} sees none (torch.cuda.is_available() is False)")
    elif torch.cuda.device_count() < tp:
        fail(f"needs {tp} CUDA GPUs; this machine has {torch.cuda.device_count()}")
    if "WORLD_SIZE" not in os.environ:
        fail(f"launch with torchrun --nproc-per-node {tp} benchmarks/tp_speed.py ...")
    rank, local, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if world != tp:
        fail(f"--tp {tp} needs torchrun --nproc-per-node {tp} (this launch has {world} processes)")
    return rank, local, world


TINY = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 4,
        "vocab_size": 8192}


def shapes(args) -> tuple[dict, dict]:
    v = VERIFIER | ({"num_hidden_layers": args.layers} if args.layers else {}) | (TINY if args.tiny else {})
    d = DRAFTER | (TINY | {"num_attention_heads": 4, "num_key_value_heads": 2} if args.tiny else {})
    return v, d


def write_checkpoints(work: Path, args) -> tuple[Path, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = []
    for name, shape in zip(("verifier", "drafter"), shapes(args)):
        path = work / f"{name}-{shape['num_hidden_layers']}l-{shape['hidden_size']}h"
        if not (path / "config.json").is_file():
            torch.manual_seed(0)
            with torch.device(args.device):
                model = LlamaForCausalLM(LlamaConfig(**shape, bos_token_id=1, eos_token_id=2)).to(args.dtype)
            model.save_pretrained(path)
            del model
            if args.device == "cuda":
                torch.cuda.empty_cache()
        out.append(path)
    return out[0], out[1]


def measure(drafter, verifier, args, tp: int) -> list[dict]:
    import torch

    import speccascade as sc
    from speccascade.models import make_backend

    d, v = make_backend(drafter, "drafter", "dynamic"), make_backend(verifier, "verifier", "dynamic")
    g = torch.Generator().manual_seed(0)
    rows = []
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for batch in args.batch_sizes:
        prompts = torch.randint(3, min(30000, verifier.config.vocab_size), (batch, args.prompt_tokens),
                                generator=g).tolist()
        for method in args.methods:
            def run(prompts=prompts, method=method):
                return sc.generate(d, v, prompts, method=method, gamma=args.gamma, temperature=0.0,
                                   max_new_tokens=args.new_tokens, eos_token_id=[], seed=0)
            run()
            times, out = [], None
            for _ in range(args.repeats):
                sync()
                t = time.perf_counter()
                out = run()
                sync()
                times.append(time.perf_counter() - t)
            s = out.stats.to_dict()
            med = statistics.median(times)
            rows.append({"tp": tp, "batch": batch, "method": method, "median_s": med, "times_s": times,
                         "tokens_per_second": batch * args.new_tokens / med,
                         "tokens_per_verifier_call": s.get("tokens_per_verifier_call"),
                         "acceptance_rate": s.get("acceptance_rate")})
            if int(os.environ.get("RANK", "0")) == 0:
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, local, world = check_launch(args.tp, args.device)
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    import speccascade

    cuda = args.device == "cuda"
    args.dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.cuda.set_device(local)
    # rank 1 waits while rank 0 writes the checkpoint and measures --tp 1 alone
    dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device("cuda", local) if cuda else None,
                            timeout=timedelta(hours=1))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        v_path, d_path = write_checkpoints(args.work_dir, args)
    dist.barrier()
    v_path, d_path = write_checkpoints(args.work_dir, args) if rank else (v_path, d_path)
    drafter = AutoModelForCausalLM.from_pretrained(d_path, dtype=args.dtype).to(args.device).eval()
    rows = []
    if rank == 0:  # --tp 1: the verifier whole on cuda:0
        verifier = AutoModelForCausalLM.from_pretrained(v_path, dtype=args.dtype).to(args.device).eval()
        rows += measure(drafter, verifier, args, 1)
        del verifier
        if cuda:
            torch.cuda.empty_cache()
    dist.barrier()
    verifier = AutoModelForCausalLM.from_pretrained(v_path, dtype=args.dtype,
                                                    distributed_config=DistributedConfig(tp_size=args.tp)).eval()
    rows += measure(drafter, verifier, args, args.tp)
    if rank == 0:
        by = {(r["tp"], r["batch"], r["method"]): r["tokens_per_second"] for r in rows}
        record = {"benchmark": "tp_speed", "gpu": torch.cuda.get_device_name(0) if cuda else "cpu (smoke run)",
                  "gpus": world,
                  "torch": torch.__version__, "transformers": transformers.__version__,
                  "speccascade": speccascade.__version__, "verifier_shape": shapes(args)[0],
                  "drafter_shape": shapes(args)[1], "dtype": str(args.dtype).removeprefix("torch."),
                  "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                  "gamma": args.gamma, "repeats": args.repeats, "rows": rows,
                  "speedup_tp_over_tp1": {f"{m} batch={b}": by[(args.tp, b, m)] / by[(1, b, m)]
                                          for b in args.batch_sizes for m in args.methods},
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
