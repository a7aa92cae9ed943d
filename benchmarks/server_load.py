"""Throughput and latency of ``speccascade serve`` at several concurrencies, against serving the
same requests one at a time (and against ``generate`` called directly, one prompt at a time).

Run from the repository root (default paths are relative to it), with the package installed:
``pip install -e ".[serve,test]"`` (or ``scripts/setup.sh``). For example:

    python benchmarks/server_load.py                                      # CPU, tiny pair, 1 torch thread
    python benchmarks/server_load.py --device cuda --dtype bfloat16 --backend graphs \\
        --out results/server/gpu_tiny.json                                 # a GPU (static cache + CUDA graphs)

The server runs in this process (a thread; the decode loop in its worker thread); clients are
``httpx`` async clients on loopback, each sending its next request as soon as the previous one is
answered, until the ``--requests`` test verses are all translated. Greedy by default, so every
concurrency must return the same tokens as the sequential pass (checked and recorded). Each level
runs ``--repeats`` times after one unmeasured warm-up pass; the record holds the medians.
Requests cycle through ``--alphas`` (one method, per-row alpha: they share batches).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "fastapi", "uvicorn", "httpx", "speccascade"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def run_level(url: str, bodies: list[dict], concurrency: int, timeout: float) -> dict:
    import httpx

    queue = list(enumerate(bodies))
    results: dict[int, dict] = {}
    latencies: list[float] = []

    async def worker():
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as c:
            while queue:
                i, body = queue.pop(0)
                t0 = time.perf_counter()
                r = await c.post("/v1/completions", json=body)
                latencies.append(time.perf_counter() - t0)
                r.raise_for_status()
                results[i] = r.json()

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout)
    wall = time.perf_counter() - t0
    tokens = sum(r["usage"]["completion_tokens"] for r in results.values())
    return {"wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
            "requests_per_s": len(bodies) / wall, "latency_p50_s": percentile(latencies, 0.5),
            "latency_p90_s": percentile(latencies, 0.9), "latency_p99_s": percentile(latencies, 0.99),
            "latency_mean_s": statistics.fmean(latencies),
            "tokens": [results[i]["choices"][0]["token_ids"] for i in range(len(bodies))]}


def main(argv=None) -> int:
    from speccascade.cli import _load_pair, _model_args
    from speccascade.server.config import add_serve_arguments

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_serve_arguments(ap)
    _model_args(ap)
    ap.add_argument("--requests", type=int, default=32, help="test verses translated per pass")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.3, 0.5, 0.8],
                    help="alphas the requests cycle through (method: --method)")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "server" / "cpu_tiny.json")
    ap.set_defaults(threads=1, max_tokens=32, temperature=0.0, log_level="warning")
    args = ap.parse_args(argv)

    import torch

    import speccascade as sc
    from speccascade.eval.tasks import BibleTask
    from speccascade.server.app import ServerThread, build_engine

    torch.set_num_threads(args.threads)
    engine = build_engine(args, _load_pair)
    texts = [e.input for e in BibleTask().examples(args.requests, seed=0)]
    bodies = [{"prompt": t, "max_tokens": args.max_tokens, "temperature": args.temperature, "method": args.method,
               **({} if sc.METHODS[args.method].alpha is None else {"alpha": args.alphas[i % len(args.alphas)]})}
              for i, t in enumerate(texts)]
    srv = ServerThread(engine, port=0, log_level=args.log_level).start()
    record = {"benchmark": "server_load", "cpu": cpu_name(), "cpus": __import__("os").cpu_count(),
              "device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
              "dtype": args.dtype, "backend": args.backend, "torch_threads": torch.get_num_threads(),
              "versions": versions(), "pair": args.pair if args.drafter is None else [args.drafter, args.verifier],
              "method": args.method, "alphas": args.alphas if sc.METHODS[args.method].alpha else None,
              "gamma": args.gamma, "temperature": args.temperature, "max_tokens": args.max_tokens,
              "requests": len(bodies), "repeats": args.repeats, "max_batch_size": args.max_batch_size,
              "batch_wait_ms": args.batch_wait_ms, "loadavg_before": list(__import__("os").getloadavg()),
              "levels": {}}
    try:
        # direct generate, one prompt at a time (no HTTP, no queue): the floor of serving one by one
        d, v, tok, eos = engine.drafter, engine.verifier, engine.tokenizer, engine.eos
        direct = []
        for rep in range(args.repeats + 1):
            t0, n = time.perf_counter(), 0
            for body in bodies:
                out = sc.generate(d, v, [engine.task.encode(tok, body["prompt"])], method=body["method"],
                                  alpha=body.get("alpha"), gamma=args.gamma, temperature=args.temperature,
                                  max_new_tokens=args.max_tokens, eos_token_id=eos)
                n += len(out.tokens[0])
            if rep:   # the first pass warms up
                direct.append({"wall_s": time.perf_counter() - t0, "tokens_per_s": n / (time.perf_counter() - t0)})
        record["direct_sequential"] = {"tokens_per_s": statistics.median(x["tokens_per_s"] for x in direct),
                                       "wall_s": statistics.median(x["wall_s"] for x in direct)}
        print(f"direct generate, one at a time: {record['direct_sequential']['tokens_per_s']:.1f} tok/s", flush=True)
        reference = None
        for c in args.concurrency:
            runs = []
            for rep in range(args.repeats + 1):
                first = engine.batch_log[-1]["id"] + 1 if engine.batch_log else 0
                res = asyncio.run(run_level(srv.url, bodies, c, args.timeout))
                sizes = [b["size"] for b in engine.batch_log if b["id"] >= first]
                res["batch_sizes"] = sizes
                if reference is None:
                    reference = res["tokens"]
                res["equal_to_sequential"] = res["tokens"] == reference
                del res["tokens"]
                if rep:
                    runs.append(res)
            level = {k: statistics.median(r[k] for r in runs) for k in
                     ("wall_s", "tokens_per_s", "requests_per_s", "latency_p50_s", "latency_p90_s", "latency_p99_s",
                      "latency_mean_s")}
            level["completion_tokens"] = runs[0]["completion_tokens"]
            level["mean_batch_size"] = statistics.fmean(s for r in runs for s in r["batch_sizes"])
            level["equal_to_sequential"] = all(r["equal_to_sequential"] for r in runs)
            level["runs"] = runs
            record["levels"][str(c)] = level
            print(f"concurrency {c:3d}: {level['tokens_per_s']:7.1f} tok/s  {level['requests_per_s']:6.2f} req/s  "
                  f"p50 {level['latency_p50_s']:.3f}s  p99 {level['latency_p99_s']:.3f}s  "
                  f"mean batch {level['mean_batch_size']:.1f}  same tokens: {level['equal_to_sequential']}", flush=True)
        base = record["levels"].get("1")
        for level in record["levels"].values():
            if base:
                level["throughput_vs_one_at_a_time"] = level["tokens_per_s"] / base["tokens_per_s"]
                level["p50_latency_vs_one_at_a_time"] = level["latency_p50_s"] / base["latency_p50_s"]
            level["throughput_vs_direct_generate"] = level["tokens_per_s"] / record["direct_sequential"]["tokens_per_s"]
        record["note"] = ("medians over repeats after one warm-up pass; concurrency 1 = the same requests served "
                          "one at a time through the server; direct_sequential = generate() one prompt at a time")
        record["loadavg_after"] = list(__import__("os").getloadavg())
    finally:
        srv.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
