"""GPU speed of the engine (issue 5): bandwidth roofline, head-to-head with transformers, realised vs
predicted speed-up, batch scaling. Writes one JSON record naming the card.

Run from the repository root (default paths are relative to it), with the package installed:
``pip install -e .`` (or ``scripts/setup.sh``). For example:

    python benchmarks/gpu_speed.py --pair-dir runs/base --out results/gpu/speed.json

Backends: ``dynamic`` (HFBackend: transformers' DynamicCache, eager), ``static`` (StaticHFBackend:
pre-allocated cache, fixed shapes) and ``static+compile`` (the same under torch.compile with CUDA
graphs, mode reduce-overhead). Timings: medians over ``--repeats`` runs after a warm-up run,
``torch.cuda.synchronize`` before reading the clock. EOS is ignored so every run emits exactly
``--new-tokens`` tokens per row (transformers' generate gets ``min_new_tokens`` to match).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from pathlib import Path

import torch

import speccascade as sc
from speccascade.models import GraphHFBackend, HFBackend, StaticHFBackend
from speccascade.models.timing import sync

DTYPE = torch.bfloat16


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, bytes read + written per second."""
    n = 2 * 2**30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    med, _ = timed(lambda: b.copy_(a), 10)
    return 2 * n / med


def llama(hidden, layers, heads, kv, inter, vocab, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to("cuda", DTYPE).eval()


def backend(model, kind: str, name: str):
    if kind == "dynamic":
        return HFBackend(model, name)
    if kind == "graphs":
        return GraphHFBackend(model, name, max_cache_len=1024)
    return StaticHFBackend(model, name, max_cache_len=1024, compile=kind == "static+compile")


def tokens_per_s(drafter, verifier, prompts, method, gamma, temperature, new_tokens, repeats, alpha=None):
    out = {}

    def run():
        out["o"] = sc.generate(drafter, verifier, prompts, method=method, alpha=alpha, gamma=gamma,
                               temperature=temperature, max_new_tokens=new_tokens, seed=0)
    med, times = timed(run, repeats)
    s = out["o"].stats
    examined = s.accepted + s.rejected
    return {"tokens_per_s": len(prompts) * new_tokens / med, "median_s": med, "runs_s": times,
            "acceptance_per_examined": s.accepted / examined if examined else None,
            "tokens_per_verifier_call": s.tokens_per_verifier_call, "drafter_calls": s.drafter_calls,
            "verifier_calls": s.verifier_calls}


def queued_calls(be, width: int, prompt=(10, 11, 12, 13)):
    """A function that resets ``be`` and runs ``n`` model calls (feed ``width`` tokens, keep one)
    queued back to back with no host sync: the model plus the backend's bookkeeping, nothing of
    the loop."""
    x = torch.tensor([list(prompt)], device="cuda")
    tok = x[:, -1:].expand(1, width).contiguous()
    keep = torch.ones(1, dtype=torch.long, device="cuda")

    def run(n):
        be.reset(x, torch.ones_like(x))
        for _ in range(n):
            be.extend(tok)
            be.commit(keep)
    return run


def pipelined_call_s(be, width: int, calls: int = 100, prompt=(10, 11, 12, 13)) -> float:
    """Seconds per model call when calls are queued back to back (:func:`queued_calls`)."""
    run = queued_calls(be, width, prompt)
    run(8)  # warm-up (compiles)
    sync()
    t = time.perf_counter()
    run(calls)
    sync()
    return (time.perf_counter() - t) / calls


def gemv_seconds(k: int, n: int, reps: int = 50) -> float:
    """One bf16 ``[1, k] @ [k, n]`` (torch's linear, i.e. cuBLAS), ``reps`` of them captured in one
    CUDA graph so that no launch overhead is timed: the floor of one projection at batch 1."""
    w = torch.randn(n, k, device="cuda", dtype=DTYPE)
    x = torch.randn(1, k, device="cuda", dtype=DTYPE)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            torch.nn.functional.linear(x, w)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            torch.nn.functional.linear(x, w)
    med, _ = timed(g.replay, 10)
    return med / reps


def gemv_floor(shape, bw: float) -> dict:
    """The projections of one decode step of ``shape`` (hidden, layers, heads, kv heads,
    intermediate, vocab) timed alone (:func:`gemv_seconds`): their achieved bandwidth, and the
    tokens/s a step made of nothing else would reach."""
    hidden, layers, heads, kv, inter, vocab = shape
    hd = hidden // heads
    mats = {"q/o": (hidden, hidden), "k/v": (hidden, kv * hd), "gate/up": (hidden, inter),
            "down": (inter, hidden), "lm_head": (hidden, vocab)}
    per_layer = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1, "lm_head": 0}
    rows, step = {}, 0.0
    for name, (k, n) in mats.items():
        t = gemv_seconds(k, n)
        rows[name] = {"shape": [k, n], "seconds": t, "bandwidth_fraction": k * n * 2 / t / bw}
        step += t * (per_layer[name] * layers if name != "lm_head" else 1)
    return {"projections": rows, "step_s": step, "tokens_per_s": 1 / step}


def kernel_time_share(fn, top: int = 15) -> dict:
    """Wall time of ``fn`` and the time of the device kernels it ran (torch.profiler), counting
    only kernel events (device type CUDA): summing every row of ``key_averages()`` also counts a
    graph launch's device time beside the kernels it ran (the first version of this record did,
    and reported more kernel time than wall time). Also the ``top`` kernels by total time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - t
    by_name: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_name.setdefault(e.name, []).append(e.device_time / 1e6)
    kernels = sum(sum(v) for v in by_name.values())
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {"wall_s": wall, "device_kernel_s": kernels, "device_busy_fraction": kernels / wall,
            "kernel_launches": sum(len(v) for v in by_name.values()),
            "top_kernels": [{"name": k[:120], "calls": len(v), "total_s": sum(v)} for k, v in ranked]}


SHAPES = {"llama_1B": (2048, 16, 32, 8, 8192, 128256), "base_verifier_29M": (512, 8, 8, 4, 1536, 8000)}


def roofline(bw: float, repeats: int, new_tokens: int, res: dict, save=lambda: None,
             shapes=tuple(SHAPES), kinds=("dynamic", "static", "static+compile"), hf=True) -> dict:
    """Verifier-only decoding at batch 1 against the bandwidth limit. Bytes per token: every weight
    once (embeddings tied, as in Llama 3.2 1B: the tied matrix is read by the output layer) plus
    the KV cache. ``res`` is filled shape by shape and ``save`` called after each."""
    for name in shapes:
        shp = SHAPES[name]
        model = llama(*shp)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        cfg = model.config
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2
        prompt = [list(range(10, 42))]
        res[name] = {"weight_bytes": weight_bytes, "limit_tokens_per_s": bw / (weight_bytes + kv_per_token * 64)}
        try:
            res[name]["gemv_floor"] = g = gemv_floor(shp, bw)
            g["bandwidth_fraction"] = g["tokens_per_s"] / res[name]["limit_tokens_per_s"]
        except Exception as e:
            res[name]["gemv_floor"] = {"error": repr(e)}
        print(name, "gemv floor", res[name]["gemv_floor"], flush=True)
        for kind in kinds:
            try:
                be = backend(model, kind, "verifier")
                r = tokens_per_s(be, be, prompt, "verifier_only", 1, 0.0, new_tokens, repeats)
                r["bandwidth_fraction"] = r["tokens_per_s"] / res[name]["limit_tokens_per_s"]
                if kind in ("static+compile", "graphs"):
                    # the engine's parts: model calls alone, queued back to back (upper bound of the loop)
                    call = pipelined_call_s(be, 1)
                    r["model_calls_only_tokens_per_s"] = 1 / call
                    r["model_calls_only_bandwidth_fraction"] = 1 / call / res[name]["limit_tokens_per_s"]
                    run = queued_calls(be, 1)
                    r["profile_model_calls"] = kernel_time_share(lambda: run(new_tokens))
                    r["profile"] = kernel_time_share(lambda: sc.generate(be, be, prompt, method="verifier_only",
                                                                          temperature=0.0, max_new_tokens=new_tokens))
                res[name][kind] = r
            except Exception as e:  # record and go on
                res[name][kind] = {"error": repr(e), "trace": traceback.format_exc()[-1500:]}
            shown = ("tokens_per_s", "bandwidth_fraction", "error")
            print(name, kind, {k: v for k, v in res[name][kind].items() if k in shown}, flush=True)
        try:  # transformers' own generate, eager and static+compiled
            if not hf:
                continue
            ids = torch.tensor(prompt, device="cuda")
            hf_generate = model.generate
            for label, kw in (("hf_generate", {}), ("hf_generate_static_compiled", {"cache_implementation": "static"})):
                try:
                    med, _ = timed(lambda: hf_generate(ids, do_sample=False, max_new_tokens=new_tokens,
                                                          min_new_tokens=new_tokens, **kw), repeats)
                    res[name][label] = {"tokens_per_s": new_tokens / med,
                                        "bandwidth_fraction": new_tokens / med / res[name]["limit_tokens_per_s"]}
                except Exception as e:
                    res[name][label] = {"error": repr(e)}
                print(name, label, res[name][label], flush=True)
        finally:
            del model
            torch.cuda.empty_cache()
            save()
    return res


def head_to_head(pair_dir: Path, prompts_ids, gamma, repeats, new_tokens,
                 kinds=("dynamic", "static", "static+compile"), scaling_batches=(1, 4, 16, 64),
                 res: dict | None = None, save=lambda: None) -> dict:
    from transformers import AutoModelForCausalLM

    d = AutoModelForCausalLM.from_pretrained(str(pair_dir / "drafter"), dtype=DTYPE).to("cuda").eval()
    v = AutoModelForCausalLM.from_pretrained(str(pair_dir / "verifier"), dtype=DTYPE).to("cuda").eval()
    res = {} if res is None else res
    for T in (0.0, 1.0):
        row = {}
        for kind in kinds:
            try:
                bd, bv = backend(d, kind, "drafter"), backend(v, kind, "verifier")
                row[kind] = {m: tokens_per_s(bd, bv, [prompts_ids[0]], m, gamma, T, new_tokens, repeats, alpha)
                             for m, alpha in (("verifier_only", None), ("sd", None), ("token_v3", 0.5))}
            except Exception as e:
                row[kind] = {"error": repr(e), "trace": traceback.format_exc()[-1500:]}
            print("h2h", T, kind, {m: r.get("tokens_per_s") for m, r in row[kind].items() if isinstance(r, dict)},
                  flush=True)
        ids = torch.tensor([prompts_ids[0]], device="cuda")
        sample = {"do_sample": T > 0, **({"temperature": T, "top_k": 0} if T > 0 else {})}
        for label, kw in (("hf_generate", {}),
                          ("hf_assisted", {"assistant_model": d, "num_assistant_tokens": gamma,
                                           "num_assistant_tokens_schedule": "constant",
                                           "assistant_confidence_threshold": 0.0})):
            try:
                med, _ = timed(lambda: v.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                  **sample, **kw), repeats)
                row[label] = {"tokens_per_s": new_tokens / med}
            except Exception as e:
                row[label] = {"error": repr(e)}
            print("h2h", T, label, row[label], flush=True)
        res[f"T={T:g}"] = row
        save()
    # realised vs predicted (Leviathan et al. 2023's speed-up model): beta = acceptance per examined draft,
    # c = drafter step / verifier step
    costs = {}
    for kind in [k for k in kinds if k != "static"]:
        try:
            bd, bv = backend(d, kind, "drafter"), backend(v, kind, "verifier")
            ds = tokens_per_s(bd, bd, [prompts_ids[0]], "drafter_only", 1, 1.0, new_tokens, repeats)["tokens_per_s"]
            vs = tokens_per_s(bv, bv, [prompts_ids[0]], "verifier_only", 1, 1.0, new_tokens, repeats)["tokens_per_s"]
            c = vs / ds
            out = {}
            for m in ("sd", "token_v3"):
                r = res["T=1"][kind][m] if kind in res["T=1"] and m in res["T=1"].get(kind, {}) else None
                if not r or r.get("acceptance_per_examined") is None:
                    continue
                b = r["acceptance_per_examined"]
                pred = (1 - b ** (gamma + 1)) / ((1 - b) * (gamma * c + 1)) if b < 1 else (gamma + 1) / (gamma * c + 1)
                real = r["tokens_per_s"] / res["T=1"][kind]["verifier_only"]["tokens_per_s"]
                out[m] = {"beta": b, "cost_ratio_c": c, "predicted_speedup": pred, "realised_speedup": real,
                          "realised_over_predicted": real / pred}
            costs[kind] = out
        except Exception as e:
            costs[kind] = {"error": repr(e)}
    res["realised_vs_predicted"] = costs
    save()
    # share of a decode outside the model calls, pipelined: per-call costs measured back to back
    # (no sync), times the calls each method made, against its measured wall time
    pipelined = {}
    for kind in [k for k in kinds if k != "dynamic"]:
        try:
            bd, bv = backend(d, kind, "drafter"), backend(v, kind, "verifier")
            c_d, c_v, c_blk = pipelined_call_s(bd, 1), pipelined_call_s(bv, 1), pipelined_call_s(bv, gamma + 1)
            row = {"drafter_call_s": c_d, "verifier_call_s": c_v, "verifier_block_call_s": c_blk}
            for m, alpha in (("sd", None), ("token_v3", 0.5)):
                sc.generate(bd, bv, [prompts_ids[0]], method=m, alpha=alpha, gamma=gamma, max_new_tokens=new_tokens,
                            temperature=1.0)
                o = sc.generate(bd, bv, [prompts_ids[0]], method=m, alpha=alpha, gamma=gamma,
                                max_new_tokens=new_tokens, temperature=1.0)
                inside = o.stats.drafter_calls * c_d + o.stats.verifier_calls * c_blk
                row[m] = {"wall_s": o.stats.wall_time_s, "model_calls_s": inside,
                          "outside_share": max(0.0, 1 - inside / o.stats.wall_time_s)}
            pipelined[kind] = row
        except Exception as e:
            pipelined[kind] = {"error": repr(e), "trace": traceback.format_exc()[-1500:]}
    res["share_outside_model_calls_pipelined"] = pipelined
    save()
    print("outside (pipelined)", pipelined, flush=True)
    # share of a decode spent outside the two models' forward passes (timed with a sync per call)
    from speccascade.models.timing import TimedBackend, outside_share

    outside = {}
    for kind in kinds:
        for m, alpha in (("sd", None), ("token_v3", 0.5)):
            try:
                bd, bv = TimedBackend(backend(d, kind, "drafter")), TimedBackend(backend(v, kind, "verifier"))
                sc.generate(bd, bv, [prompts_ids[0]], method=m, alpha=alpha, gamma=gamma, max_new_tokens=new_tokens)
                bd.seconds = bv.seconds = 0.0
                o = sc.generate(bd, bv, [prompts_ids[0]], method=m, alpha=alpha, gamma=gamma, max_new_tokens=new_tokens)
                outside[f"{kind}/{m}"] = outside_share(o.stats.wall_time_s, bd, bv)
            except Exception as e:
                outside[f"{kind}/{m}"] = repr(e)
    res["share_outside_model_forwards"] = outside
    save()
    print("outside", outside, flush=True)
    # batch scaling (dynamic backend: the static one keeps one batch size per cache)
    scaling = {}
    for bsz in scaling_batches:
        prompts = [prompts_ids[i % len(prompts_ids)] for i in range(bsz)]
        scaling[bsz] = {}
        for m, alpha in (("verifier_only", None), ("sd", None), ("token_v3", 0.5)):
            try:
                scaling[bsz][m] = tokens_per_s(HFBackend(d, "drafter"), HFBackend(v, "verifier"), prompts, m, gamma,
                                               1.0, new_tokens, max(1, repeats // 2), alpha)["tokens_per_s"]
            except Exception as e:
                scaling[bsz][m] = repr(e)
        print("batch", bsz, scaling[bsz], flush=True)
    res["batch_scaling_tokens_per_s"] = scaling
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pair-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=5)
    ap.add_argument("--skip-roofline", action="store_true")
    ap.add_argument("--skip-h2h", action="store_true")
    ap.add_argument("--kinds", default="dynamic,static,static+compile")
    ap.add_argument("--scaling-batches", default="1,4,16,64")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="roofline shapes: " + ", ".join(SHAPES))
    ap.add_argument("--roofline-kinds", default="dynamic,static,static+compile")
    ap.add_argument("--skip-hf", action="store_true", help="roofline without transformers' own generate")
    ap.add_argument("--inductor", default="", help="torch._inductor.config settings, e.g. "
                    "coordinate_descent_tuning=1,max_autotune_gemm=0 (recorded)")
    args = ap.parse_args()
    settings = {}
    for kv in filter(None, args.inductor.split(",")):
        k, v = kv.split("=")
        import torch._inductor.config as ind

        setattr(ind, k, type(getattr(ind, k))(int(v)) if isinstance(getattr(ind, k), (bool, int)) else v)
        settings[k] = getattr(ind, k)
    from speccascade.data.bible import load_split
    from speccascade.data.prompt import encode_prompt
    from speccascade.models.loading import TOKENIZER_DIR, load_tokenizer

    tok = load_tokenizer(TOKENIZER_DIR)
    prompts = [encode_prompt(tok, p["en"]) for p in load_split("test")[:64]]
    rec = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "speccascade": sc.__version__}
    import transformers

    rec["transformers"] = transformers.__version__
    rec["inductor_settings"] = settings
    rec["copy_bandwidth_bytes_per_s"] = bw = copy_bandwidth()
    print("bandwidth GB/s", bw / 1e9, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.skip_roofline:
        rec["roofline"] = {}
        roofline(bw, args.repeats, args.new_tokens, rec["roofline"],
                 save=lambda: args.out.write_text(json.dumps(rec, indent=2)), shapes=args.shapes.split(","),
                 kinds=tuple(args.roofline_kinds.split(",")), hf=not args.skip_hf)
    if not args.skip_h2h:
        rec["head_to_head"] = {}
        head_to_head(args.pair_dir, prompts, args.gamma, args.repeats, args.new_tokens,
                     kinds=tuple(args.kinds.split(",")),
                     scaling_batches=tuple(int(b) for b in args.scaling_batches.split(",") if b),
                     res=rec["head_to_head"], save=lambda: args.out.write_text(json.dumps(rec, indent=2)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rec, indent=2))


if __name__ == "__main__":
    main()
