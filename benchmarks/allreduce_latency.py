"""All-reduce latency inside a CUDA graph on two GPUs (issue 17): what one of the verifier's 64
all-reduces a token costs at ``--tp 2``, and whether a one-shot all-reduce over peer memory would
cost less than NCCL's.

``tp_speed.py``'s time model puts the batch-1 cost at about 26 µs an all-reduce (the time left once
the halved weight reads are paid). This measures it directly. For each implementation and message
size, one CUDA graph holds ``--chain`` all-reduces in a row, each on the previous one's (halved)
output, as in the decoding step; the graph is replayed ``--repeats`` times and timed with CUDA
events. A graph of the same chain without the all-reduces (the copy and the halving alone) is timed
too and subtracted. Implementations:

* ``nccl``: ``torch.distributed.all_reduce`` (NCCL, in place), what the fused backend's eager step
  calls and its compiled step lowers to;
* ``symm_mem_one_shot``: ``torch.ops.symm_mem.one_shot_all_reduce`` on a symmetric-memory buffer
  (PyTorch's symmetric memory: each GPU reads the other's buffer over NVLink; multicast stays off).

::

    torchrun --standalone --nproc-per-node 2 benchmarks/allreduce_latency.py --out DIR/allreduce_latency.json

Message sizes: the hidden size (4096, the 8B shape) × rows, bf16; rows 1 (``verifier_only`` at batch
1), 6 (a γ = 5 block) and 16 (batch 16). An implementation that fails (no symmetric memory in this
torch, say) is recorded with its error; the next one runs.
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


def fail(msg: str) -> None:
    print(f"allreduce_latency: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/multigpu/allreduce_latency.json"))
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 6, 16])
    ap.add_argument("--chain", type=int, default=64, help="all-reduces in one graph (64 = 2 a layer x 32 layers)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--impls", nargs="+", default=["nccl", "symm_mem_one_shot"],
                    choices=["nccl", "symm_mem_one_shot"])
    return ap.parse_args(argv)


def graph_ms(torch, body, repeats: int) -> float:
    """Median milliseconds of one replay of a CUDA graph of ``body``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):   # warm-up outside the capture (NCCL and symmetric memory set up here)
            body()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del g
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        fail("needs 2 CUDA GPUs; torch sees " + (str(torch.cuda.device_count()) if torch.cuda.is_available() else
                                                  "none"))
    if os.environ.get("WORLD_SIZE") != "2":
        fail("launch with torchrun --standalone --nproc-per-node 2 benchmarks/allreduce_latency.py")
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from speccascade.distributed import shutdown

    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=device)
    group = dist.group.WORLD
    rows = []
    try:
        for n in args.rows:
            x = torch.ones(n, args.hidden, dtype=torch.bfloat16, device=device)

            def chain(reduce):
                def body():
                    y = x
                    for _ in range(args.chain):
                        y = reduce(y * 0.5)
                    return y
                return body

            base = graph_ms(torch, chain(lambda t: t), args.repeats)
            for impl in args.impls:
                row = {"impl": impl, "rows": n, "hidden": args.hidden, "bytes": n * args.hidden * 2,
                       "chain": args.chain, "graph_ms_without_all_reduces": base}
                try:
                    if impl == "nccl":
                        def reduce(t):
                            dist.all_reduce(t, group=group)
                            return t
                    else:
                        import torch.distributed._symmetric_memory as symm_mem

                        if hasattr(symm_mem, "enable_symm_mem_for_group"):   # needed by older torch
                            symm_mem.enable_symm_mem_for_group(group.group_name)
                        buf = symm_mem.empty(n, args.hidden, dtype=torch.bfloat16, device=device)
                        symm_mem.rendezvous(buf, group.group_name)

                        def reduce(t, buf=buf):
                            buf.copy_(t)
                            return torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group.group_name)
                    ms = graph_ms(torch, chain(reduce), args.repeats)
                    row |= {"graph_ms": ms, "us_per_all_reduce": (ms - base) * 1e3 / args.chain}
                except Exception as e:  # noqa: BLE001 - recorded; the next implementation runs
                    row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                    if rank == 0:
                        traceback.print_exc()
                rows.append(row)
                if rank == 0:
                    print(json.dumps(row), flush=True)
        if rank == 0:
            record = {"benchmark": "allreduce_latency", "gpu": torch.cuda.get_device_name(local), "gpus": 2,
                      "torch": torch.__version__, "cuda": torch.version.cuda,
                      "nccl": ".".join(map(str, torch.cuda.nccl.version())),
                      "nvls": os.environ.get("NCCL_NVLS_ENABLE"), "dtype": "bfloat16", "repeats": args.repeats,
                      "rows": rows, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=1) + "\n")
            print("wrote", args.out)
        dist.barrier()
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
