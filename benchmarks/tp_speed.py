"""Tensor-parallel verifier speed (issue 17): ``verifier_only`` and ``sd`` tokens/s at batch 1 and
16 for a Llama-3.1-8B-shaped verifier (random weights, bfloat16) whole on one GPU (``--tp 1``) and
split over two (``--tp 2``), on the engine's fastest path and on transformers' own sharding.

One launch measures one *stage* (a backend at one tensor-parallel degree, world size = ``--tp``)
and writes its own JSON; ``--merge`` gathers the stages into one record with the ratios. Stages:

* ``--backend fused``: :class:`speccascade.models.FusedLlamaBackend`, compiled, the whole block
  (drafting, the verifier's scoring call with its all-reduces, acceptance) one captured CUDA graph
  per replay; at ``--tp 2`` each rank keeps its Megatron shard of the verifier (two all-reduces a
  layer). The weights are made on the GPU from a seed (rank 0's are broadcast: every rank holds the
  same model) and never written to disk.
* ``--backend hf``: transformers' model on the ``dynamic`` backend, eager; at ``--tp 2`` sharded by
  transformers (``from_pretrained(..., distributed_config=DistributedConfig(tp_size=2))``, the
  model's own plan), which needs a checkpoint: written once to ``--work-dir`` (about 16 GB in
  bfloat16 at the full shape). The reference: measured earlier at half of ``--tp 1``'s speed.

::

    torchrun --standalone --nproc-per-node 1 benchmarks/tp_speed.py --backend fused --tp 1 --out DIR/fused_tp1.json
    torchrun --standalone --nproc-per-node 2 benchmarks/tp_speed.py --backend fused --tp 2 --out DIR/fused_tp2.json
    torchrun --standalone --nproc-per-node 1 benchmarks/tp_speed.py --backend hf --tp 1 --out DIR/hf_tp1.json
    torchrun --standalone --nproc-per-node 2 benchmarks/tp_speed.py --backend hf --tp 2 --out DIR/hf_tp2.json
    python benchmarks/tp_speed.py --merge DIR/fused_tp1.json DIR/fused_tp2.json DIR/hf_tp1.json DIR/hf_tp2.json \\
        --out results/multigpu/tp_H200.json
    # CPU rehearsal of a stage (gloo, float32, tiny shapes): add --device cpu --tiny

(``benchmarks/gpu_multigpu_run.sh`` runs all of it, one launch per stage and batch size, each with its own
log and time limit: ``--batch-sizes 1`` and ``--batch-sizes 16`` separately, so that compiling and
capturing the 8B shapes of one launch fits a 10-minute command.)
The drafter (a ~0.3B Llama of the same vocabulary, random weights) is whole on every rank. Random
weights accept few drafts, so ``sd``'s tokens/s here measures the cost of its calls (the record
also gives tokens per verifier call), not a speed-up a trained pair would see. EOS is off: every
row emits exactly ``--new-tokens`` tokens. Greedy (T = 0). Timings: medians over ``--repeats`` runs
after one warm-up run (which compiles and captures), CUDA synchronised. Each (batch, method) cell
is written as soon as it is measured; a cell that fails is recorded with its error and the next
one runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

#: Llama-3.1-8B (meta-llama/Llama-3.1-8B config.json)
VERIFIER = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
#: a ~0.3B drafter of the same vocabulary
DRAFTER = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 4, "num_attention_heads": 16,
           "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 4,
        "vocab_size": 8192}
BACKENDS = ("fused", "hf")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="the stage's JSON (default runs/multigpu/<backend>_tp<N>.json); with --merge, the record "
                         "(default results/multigpu/tp_H200.json)")
    ap.add_argument("--backend", default="fused", choices=BACKENDS,
                    help="fused: the engine's fast path (sharded fused backend, captured); hf: transformers' model "
                         "(dynamic backend; tp_plan sharding at --tp > 1)")
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel degree of this stage (= torchrun's "
                                                      "--nproc-per-node)")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="STAGE_JSON",
                    help="merge stage files into one record (ratios tp N / tp 1, fused / hf); runs no model")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/speccascade_tp_speed"),
                    help="where --backend hf --tp > 1 writes its checkpoint")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--methods", nargs="+", default=["verifier_only", "sd"])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--gamma", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None, help="verifier layers (default: 32, the 8B shape)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a rehearsal of this script over gloo (float32, use with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="shrink both shapes (hidden 256, vocab 8192): a rehearsal")
    return ap.parse_args(argv)


def fail(msg: str) -> None:
    print(f"tp_speed: error: {msg}", file=sys.stderr)
    sys.exit(2)


def check_launch(tp: int, device: str = "cuda") -> tuple[int, int, int]:
    import torch

    if tp < 1:
        fail(f"--tp must be >= 1, got {tp}")
    if device == "cpu":
        pass
    elif not torch.cuda.is_available():
        fail(f"needs {tp} CUDA GPUs; torch {torch.__version__} sees none (torch.cuda.is_available() is False)")
    elif torch.cuda.device_count() < tp:
        fail(f"needs {tp} CUDA GPUs; this machine has {torch.cuda.device_count()}")
    if "WORLD_SIZE" not in os.environ:
        fail(f"launch with torchrun --standalone --nproc-per-node {tp} benchmarks/tp_speed.py --tp {tp} ...")
    rank, local, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if world != tp:
        fail(f"--tp {tp} needs torchrun --nproc-per-node {tp} (this launch has {world} processes)")
    return rank, local, world


def shapes(args) -> tuple[dict, dict]:
    v = VERIFIER | ({"num_hidden_layers": args.layers} if args.layers else {}) | (TINY if args.tiny else {})
    d = DRAFTER | (TINY | {"num_attention_heads": 4, "num_key_value_heads": 2} if args.tiny else {})
    return v, d


def llama(shape: dict, args, seed: int):
    """A Llama of ``shape`` with random weights made on the device from ``seed`` (in ``args.dtype``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(args.dtype)
    try:
        with torch.device(args.device):
            return LlamaForCausalLM(LlamaConfig(**shape, bos_token_id=1, eos_token_id=2)).eval()
    finally:
        torch.set_default_dtype(default)


def make_model(shape: dict, args, seed: int):
    """:func:`llama` on every rank, rank 0's weights broadcast: every rank holds the same model."""
    import torch
    import torch.distributed as dist

    model = llama(shape, args, seed)
    if dist.get_world_size() > 1:
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)
    return model


def write_checkpoint(args) -> Path:
    """The verifier's checkpoint for transformers' sharded loading (rank 0 writes it once)."""
    import torch.distributed as dist

    shape = shapes(args)[0]
    path = args.work_dir / f"verifier-{shape['num_hidden_layers']}l-{shape['hidden_size']}h-{args.dtype_name}"
    if dist.get_rank() == 0 and not (path / "config.json").is_file():
        model = llama(shape, args, seed=0)
        tmp = path.with_name(path.name + ".tmp")
        model.save_pretrained(tmp)
        tmp.rename(path)
        del model
        if args.device == "cuda":
            import torch

            torch.cuda.empty_cache()
    dist.barrier()
    return path


def load_stage(args):
    """(drafter backend, verifier backend, verifier config) of this stage on this rank."""
    import torch

    from speccascade.models import FusedLlamaBackend, HFBackend

    v_shape, d_shape = shapes(args)
    compile = args.device == "cuda"
    drafter = make_model(d_shape, args, seed=1)
    if args.backend == "fused":
        verifier = make_model(v_shape, args, seed=0)
        fv = FusedLlamaBackend(verifier, "verifier", compile=compile, tp=args.tp)
        cfg = verifier.config
        del verifier  # the backend keeps its (sharded) copy of the layers
        if args.device == "cuda":
            torch.cuda.empty_cache()
        return FusedLlamaBackend(drafter, "drafter", compile=compile), fv, cfg
    # hf: transformers' model on the dynamic backend (eager), its own sharding at --tp > 1
    if args.tp == 1:
        verifier = make_model(v_shape, args, seed=0)
    else:
        from transformers import AutoModelForCausalLM
        from transformers.distributed import DistributedConfig

        path = write_checkpoint(args)
        verifier = AutoModelForCausalLM.from_pretrained(path, dtype=args.dtype,
                                                        distributed_config=DistributedConfig(tp_size=args.tp)).eval()
    return HFBackend(drafter, "drafter"), HFBackend(verifier, "verifier"), verifier.config


def card(args) -> dict:
    import torch
    import transformers

    import speccascade

    cuda = args.device == "cuda"
    try:
        nccl = torch.cuda.nccl.version() if cuda else None
        nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl
    except Exception as e:  # noqa: BLE001 - the card is informative
        nccl = f"unknown ({type(e).__name__})"
    return {"gpu": torch.cuda.get_device_name(0) if cuda else "cpu (rehearsal)",
            "gpus_visible": torch.cuda.device_count() if cuda else 0,
            "cuda": torch.version.cuda, "nccl": nccl,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "speccascade": speccascade.__version__, "python": sys.version.split()[0]}


def measure_stage(args, rank: int) -> None:
    import torch

    import speccascade as sc

    t0 = time.perf_counter()
    d, v, cfg = load_stage(args)
    record = {"benchmark": "tp_speed", "stage": f"{args.backend} tp={args.tp} batch={args.batch_sizes}",
              "backend": args.backend,
              "tp": args.tp, **card(args), "verifier_shape": shapes(args)[0], "drafter_shape": shapes(args)[1],
              "dtype": args.dtype_name, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "gamma": args.gamma, "repeats": args.repeats, "temperature": 0.0, "load_s": time.perf_counter() - t0,
              "rows": []}

    def save():
        if rank == 0:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=2) + "\n")

    save()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    for batch in args.batch_sizes:
        prompts = torch.randint(3, min(30000, cfg.vocab_size), (batch, args.prompt_tokens), generator=g).tolist()
        for method in args.methods:
            row = {"tp": args.tp, "backend": args.backend, "batch": batch, "method": method}

            def run(prompts=prompts, method=method):
                return sc.generate(d, v, prompts, method=method, gamma=args.gamma, temperature=0.0,
                                   max_new_tokens=args.new_tokens, eos_token_id=[], seed=0)
            try:
                sync()
                t = time.perf_counter()
                run()  # compiles and captures
                sync()
                row["warm_up_s"] = time.perf_counter() - t
                times, out = [], None
                for _ in range(args.repeats):
                    sync()
                    t = time.perf_counter()
                    out = run()
                    sync()
                    times.append(time.perf_counter() - t)
                s = out.stats.to_dict()
                med = statistics.median(times)
                row |= {"median_s": med, "times_s": times, "tokens_per_second": batch * args.new_tokens / med,
                        "tokens_per_verifier_call": s.get("tokens_per_verifier_call"),
                        "acceptance_rate": s.get("acceptance_rate"), "first_tokens": out.tokens[0][:8]}
                if args.device == "cuda":
                    row["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            except Exception as e:  # noqa: BLE001 - recorded; the next cell runs
                row |= {"error": f"{type(e).__name__}: {e}"[:2000], "trace": traceback.format_exc()[-3000:]}
            record["rows"].append(row)
            if rank == 0:
                print(json.dumps({k: x for k, x in row.items() if k != "trace"}), flush=True)
            save()
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save()
    if rank == 0:
        print(f"wrote {args.out}", flush=True)


#: NVIDIA's H200 datasheet: 4.8 TB/s of HBM3e bandwidth (the ceiling of a weight-bound decoding step)
H200_HBM_BYTES_PER_S = 4.8e12


def weight_bytes_per_rank(shape: dict, tp: int, dtype_bytes: int) -> float:
    """Bytes of weights one rank reads per decoding step at batch 1: its 1/tp of every layer's
    projections (q, k, v, o; gate, up, down) and the whole LM head (the embedding reads one row;
    norms are negligible)."""
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    layer = 2 * h * h + 2 * h * kv + 3 * h * inter
    return (shape["num_hidden_layers"] * layer / tp + shape["vocab_size"] * h) * dtype_bytes


def where_time_goes(speed: dict, shape: dict | None, dtype: str | None, peak: float = H200_HBM_BYTES_PER_S) -> dict:
    """A model of batch-1 ``verifier_only`` on the fused path, from the measured times and the shape
    (not a profile): the weight bytes each rank reads per token, the fraction of the HBM ceiling
    that --tp 1 reaches, the --tp 2 time that same fraction predicts with free all-reduces, and the
    rest of the measured --tp 2 time spread over its 2 all-reduces a layer."""
    one, two = speed.get(("fused", 1, 1, "verifier_only")), speed.get(("fused", 2, 1, "verifier_only"))
    if not (one and two and shape):
        return {}
    size = 2 if dtype in ("bfloat16", "float16") else 4
    b1, b2 = weight_bytes_per_rank(shape, 1, size), weight_bytes_per_rank(shape, 2, size)
    ms1, ms2 = 1e3 / one, 1e3 / two
    eff = (b1 / peak * 1e3) / ms1
    predicted = b2 / peak * 1e3 / eff
    reduces = 2 * shape["num_hidden_layers"]
    return {"kind": "model from the measured times and the shape, not a profile; times include the prefill "
                    "amortised over the new tokens",
            "assumed_peak_hbm_bytes_per_s": peak,
            "weight_gb_per_rank_tp1": b1 / 1e9, "weight_gb_per_rank_tp2": b2 / 1e9,
            "ideal_tp2_over_tp1": b1 / b2, "ms_per_token_tp1": ms1, "ms_per_token_tp2": ms2,
            "hbm_fraction_reached_tp1": eff, "tp2_ms_at_tp1_fraction_with_free_all_reduces": predicted,
            "tp2_ms_left_for_all_reduces": ms2 - predicted, "all_reduces_per_token": reduces,
            "us_per_all_reduce": (ms2 - predicted) * 1e3 / reduces}


def merge(paths: list[Path], out: Path) -> dict:
    """The stages' rows in one record, with tokens/s ratios: each backend's tp N over its tp 1, the
    fused backend over transformers' at each degree, and whether --tp 2 beat --tp 1 on the fused
    path at batch 1 (the issue's target)."""
    stages, notes = [], []
    for p in paths:
        try:
            stages.append(json.loads(Path(p).read_text()))
        except (OSError, ValueError) as e:
            notes.append(f"{p}: not read ({type(e).__name__}: {e})")
    walls = [s for s in stages if s.get("benchmark") == "sweep_walls"]   # gpu_multigpu_run.sh's sweeps step
    stages = [s for s in stages if s.get("benchmark") != "sweep_walls"]
    rows = [r for s in stages for r in s.get("rows", [])]
    speed = {(r["backend"], r["tp"], r["batch"], r["method"]): r["tokens_per_second"]
             for r in rows if "tokens_per_second" in r}
    for r in rows:
        if "error" in r:
            notes.append(f"{r['backend']} tp={r['tp']} batch={r['batch']} {r['method']}: {r['error'][:300]}")
    ratios = {}
    for (backend, tp, batch, method), x in sorted(speed.items()):
        if tp > 1 and (backend, 1, batch, method) in speed:
            ratios[f"{backend} tp{tp}/tp1 {method} batch={batch}"] = x / speed[(backend, 1, batch, method)]
        if backend == "fused" and ("hf", tp, batch, method) in speed:
            ratios[f"fused/hf tp{tp} {method} batch={batch}"] = x / speed[("hf", tp, batch, method)]
    target = {m: speed[("fused", 2, 1, m)] > speed[("fused", 1, 1, m)]
              for m in ("verifier_only", "sd") if ("fused", 2, 1, m) in speed and ("fused", 1, 1, m) in speed}
    first = stages[0] if stages else {}
    record = {"benchmark": "tp_speed", "card": {k: first.get(k) for k in ("gpu", "gpus_visible", "cuda", "nccl",
                                                                         "torch", "transformers", "speccascade",
                                                                         "python")},
              "settings": {k: first.get(k) for k in ("verifier_shape", "drafter_shape", "dtype", "prompt_tokens",
                                                     "new_tokens", "gamma", "repeats", "temperature")},
              "stages": [s.get("stage") for s in stages],
              "tokens_per_second": {f"{b} tp{t} {m} batch={n}": x for (b, t, n, m), x in sorted(speed.items())},
              "ratios": ratios, "target_tp2_faster_than_tp1_at_batch1_fused": target,
              "where_time_goes_batch1": where_time_goes(speed, first.get("verifier_shape"), first.get("dtype")),
              "data_parallel_sweep": walls[-1] if walls else None,
              "notes": notes,
              "rows": rows, "merged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        rec = merge(args.merge, args.out or Path("results/multigpu/tp_H200.json"))
        keys = ("tokens_per_second", "ratios", "target_tp2_faster_than_tp1_at_batch1_fused", "where_time_goes_batch1",
                "notes")
        print(json.dumps({k: rec[k] for k in keys}, indent=2))
        return 0
    rank, local, world = check_launch(args.tp, args.device)
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    cuda = args.device == "cuda"
    args.dtype = torch.bfloat16 if cuda else torch.float32
    args.dtype_name = str(args.dtype).removeprefix("torch.")
    args.out = args.out or Path(f"runs/multigpu/{args.backend}_tp{args.tp}.json")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if cuda:
        torch.cuda.set_device(local)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device("cuda", local) if cuda else None,
                            timeout=timedelta(minutes=30))
    from speccascade.distributed import shutdown

    try:
        measure_stage(args, rank)
        dist.barrier()
    finally:
        shutdown()   # bounded: a teardown after captured all-reduces can hang
    return 0


if __name__ == "__main__":
    sys.exit(main())
