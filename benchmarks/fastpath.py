"""The device-resident fast path on a GPU: the whole speculative block as one CUDA graph.

Writes one JSON record (``--out``) whose top-level ``"summary"`` holds the figures the README
quotes, each measured in this run; every section is saved as soon as it is measured, and a
section that fails records its error and the run goes on.

Run from the repository root (default paths are relative to it), with the package installed:
``pip install -e .`` (or ``scripts/setup.sh``). For example:

    python benchmarks/fastpath.py --out results/gpu/fastpath_H200.json            # everything
    python benchmarks/fastpath.py --out /tmp/f.json --sections tiny,deep --prompts 8

Sections:
  tiny     the shipped tiny pair (bf16, fused backend, batch 1, EOS on, test prompts):
           tokens/s of verifier_only, drafter_only, sd, token_v3 (alpha 0.5), diff (alpha 0) at
           T = 0 and 1; c inside the sd loop; the share of a decode outside graph replays
  deep     a 30-layer SmolLM2-135M-shaped verifier (random weights) and a 1-layer drafter cut
           from it (its embeddings, first layer and head; the verifier's other layers' output
           projections scaled down so the two agree often): c, acceptance, realised / predicted
  llama1B  the Llama-3.2-1B shape, verifier_only at batch 1, against the copy bandwidth
  hf       the tiny pair in transformers' generate (static cache + compile) and assisted
           generation, and the previous engine (graphs backend), in the same run
  batch    batch scaling (1, 4, 16, 64) of sd and token_v3 against verifier_only, tiny pair, T = 1
  profile  device kernels per step (torch.profiler) of verifier_only and an sd block, tiny pair

Timing: each (method, T) first runs twice (capture and compile), then every prompt once, one
``generate`` call each (which synchronises the device before it returns); tokens/s = tokens
emitted / summed wall time. Graph-replay costs (``c``) come from graphs of the loop's own calls
(drafting phase: gamma + 1 drafter steps with their sampling; scoring: the verifier's gamma + 1
positions), each replayed back to back.
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
from speccascade import runner
from speccascade.models import FusedLlamaBackend, make_backend
from speccascade.models.timing import sync
from speccascade.sampling import SamplingConfig, draw, sampling_probs
from speccascade.stats import Stats
from speccascade.train.trainer import copy_first_layers

DTYPE = torch.bfloat16


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB: bytes read + written per second (median of 10)."""
    n = 2 * 2**30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(10):
        sync()
        t = time.perf_counter()
        b.copy_(a)
        sync()
        times.append(time.perf_counter() - t)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / statistics.median(times)


def graph_seconds(fn, reps: int = 50) -> float:
    """Seconds per call of ``fn`` captured as a CUDA graph and replayed ``reps`` times back to back."""
    return runner.replay_seconds(fn, torch.device("cuda"), reps)


def decode_rate(d, v, prompts, method, T, alpha=None, gamma=5, max_new=128, eos=2) -> dict:
    """tokens/s of ``method`` over ``prompts`` at batch 1 (after two warm-up calls)."""
    kw = dict(method=method, alpha=alpha, gamma=gamma, temperature=T, max_new_tokens=max_new, eos_token_id=eos)
    for p in prompts[:2]:
        sc.generate(d, v, [p], seed=0, **kw)
    total = Stats()
    walls = []
    for i, p in enumerate(prompts):
        o = sc.generate(d, v, [p], seed=i, **kw)
        total.add(o.stats)
        walls.append(o.stats.wall_time_s)
    examined = total.accepted + total.rejected
    return {"tokens_per_s": total.emitted / sum(walls), "tokens": total.emitted, "wall_s": sum(walls),
            "per_prompt_median_s": statistics.median(walls),
            "acceptance_per_examined": total.accepted / examined if examined else None,
            "tokens_per_verifier_call": total.tokens_per_verifier_call or None,
            "drafter_calls": total.drafter_calls, "verifier_calls": total.verifier_calls}


def loop_costs(fd: FusedLlamaBackend, fv: FusedLlamaBackend, gamma: int, T: float) -> dict:
    """Graph-replay costs of the sd loop's own calls on the backends' current caches: the drafting
    phase (gamma + 1 drafter steps, each with its sampling and draw), the verifier's scoring call
    (gamma + 1 positions) and a one-token verifier step; c = drafter step / scoring call."""
    cfg = SamplingConfig(temperature=T)
    gen = None  # a graph draws from the default generator (registered with every graph) here
    tok = torch.full((fd.batch,), 5, dtype=torch.long, device="cuda")
    ones = torch.ones_like(tok)
    block = torch.full((fv.batch, gamma + 1), 5, dtype=torch.long, device="cuda")

    def draft_phase():
        t = tok
        for _ in range(gamma + 1):
            t = draw(sampling_probs(fd.extend(t.unsqueeze(1))[:, -1], cfg), gen)
        fd.commit(ones)

    def score():
        sampling_probs(fv.extend(block), cfg)
        fv.commit(ones)

    def step():
        sampling_probs(fv.extend(tok.unsqueeze(1)), cfg)
        fv.commit(ones)

    t_draft = graph_seconds(draft_phase)
    t_score = graph_seconds(score)
    t_step = graph_seconds(step)
    return {"drafting_phase_s": t_draft, "drafter_step_s": t_draft / (gamma + 1), "scoring_call_s": t_score,
            "verifier_step_s": t_step, "c": t_draft / (gamma + 1) / t_score,
            "c_vs_one_token_step": t_draft / (gamma + 1) / t_step}


def block_replay_s(entry, reps: int = 50) -> float:
    """Seconds per replay of a captured block (``runner.Captured``), back to back."""
    entry.graph.replay()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        entry.graph.replay()
    sync()
    return (time.perf_counter() - t) / reps


def load_tiny():
    from speccascade.data.bible import load_split
    from speccascade.data.prompt import encode_prompt
    from speccascade.models.loading import TOKENIZER_DIR, embedded_pair_dirs, load_causal_lm, load_tokenizer

    d_dir, v_dir = embedded_pair_dirs("tiny")
    d = load_causal_lm(d_dir, device="cuda", dtype=DTYPE)
    v = load_causal_lm(v_dir, device="cuda", dtype=DTYPE)
    tok = load_tokenizer(TOKENIZER_DIR)
    prompts = [encode_prompt(tok, r["en"]) for r in load_split("test")[:64]]
    return d, v, prompts


def section_tiny(rec, args, save):
    d, v, prompts = load_tiny()
    prompts = prompts[:args.prompts]
    fd, fv = FusedLlamaBackend(d, "drafter", compile=True), FusedLlamaBackend(v, "verifier", compile=True)
    out = rec.setdefault("tiny", {})
    for T in (0.0, 1.0):
        row = out.setdefault(f"T={T:g}", {})
        for m, a in (("verifier_only", None), ("drafter_only", None), ("sd", None), ("token_v3", 0.5), ("diff", 0.0)):
            try:
                row[m] = decode_rate(fd, fv, prompts, m, T, a, args.gamma, args.max_new)
            except Exception as e:
                row[m] = {"error": repr(e), "trace": traceback.format_exc()[-2000:]}
            print("tiny", T, m, {k: row[m].get(k) for k in ("tokens_per_s", "acceptance_per_examined", "error")},
                  flush=True)
            save()
    # c and the outside share, for sd at T = 0
    decode_rate(fd, fv, prompts[:2], "sd", 0.0, None, args.gamma, args.max_new)
    entry = [e for k, e in runner.graph_cache(fv).items() if k[0] == "speculative" and k[3][0] == "sd"
             and k[3][2].temperature == 0.0][0]
    t_block = block_replay_s(entry)
    replays0, walls, emitted, prefill = entry.replays, [], 0, []
    for i, p in enumerate(prompts):
        o = sc.generate(fd, fv, [p], method="sd", gamma=args.gamma, temperature=0.0, max_new_tokens=args.max_new,
                        eos_token_id=2, seed=i)
        walls.append(o.stats.wall_time_s)
        emitted += o.stats.emitted
        ids = torch.tensor([p], device="cuda")
        sync()
        t = time.perf_counter()
        fd.reset(ids, torch.ones_like(ids))
        fv.reset(ids, torch.ones_like(ids))
        sync()
        prefill.append(time.perf_counter() - t)
    replays = entry.replays - replays0
    inside = replays * t_block
    out["sd_T0_outside"] = {"block_replay_s": t_block, "replays": replays, "decode_wall_s": sum(walls),
                            "prefill_s": sum(prefill), "tokens": emitted,
                            "outside_share": 1 - inside / sum(walls),
                            "outside_share_without_prefill": 1 - inside / (sum(walls) - sum(prefill))}
    out["sd_loop_costs_T0"] = costs = loop_costs(fd, fv, args.gamma, 0.0)
    costs["block_replay_s"] = t_block
    costs["verification_and_bookkeeping_s"] = t_block - costs["drafting_phase_s"] - costs["scoring_call_s"]
    print("tiny costs", costs, out["sd_T0_outside"], flush=True)
    save()


def deep_pair(scale: float, layers: int = 30, hidden: int = 576, heads: int = 9, kv: int = 3, inter: int = 1536,
              vocab: int = 49152):
    """A SmolLM2-135M-shaped verifier and a 1-layer drafter cut from it (random weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    mk = lambda n: LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,  # noqa: E731
                               num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=kv,
                               max_position_embeddings=2048, tie_word_embeddings=True)
    v = LlamaForCausalLM(mk(layers)).eval()
    with torch.no_grad():
        for layer in v.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
    d = LlamaForCausalLM(mk(1)).eval()
    copy_first_layers(d, v)
    return d.to("cuda", DTYPE), v.to("cuda", DTYPE)


def section_deep(rec, args, save):
    d, v = deep_pair(args.deep_scale)
    fd, fv = FusedLlamaBackend(d, "drafter", compile=True), FusedLlamaBackend(v, "verifier", compile=True)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 49000, (32,), generator=g).tolist() for _ in range(args.prompts)]
    out = rec.setdefault("deep", {"verifier_params": sum(p.numel() for p in v.parameters()),
                                  "drafter_params": sum(p.numel() for p in d.parameters()),
                                  "scale_of_layers_1_on": args.deep_scale})
    for T in (0.0, 1.0):
        row = out.setdefault(f"T={T:g}", {})
        for m, a in (("verifier_only", None), ("sd", None), ("token_v3", 0.5)):
            try:
                row[m] = decode_rate(fd, fv, prompts, m, T, a, args.gamma, args.max_new, eos=None)
            except Exception as e:
                row[m] = {"error": repr(e), "trace": traceback.format_exc()[-2000:]}
            print("deep", T, m, {k: row[m].get(k) for k in ("tokens_per_s", "acceptance_per_examined", "error")},
                  flush=True)
            save()
        costs = row["sd_loop_costs"] = loop_costs(fd, fv, args.gamma, T)
        sd, alone = row["sd"], row["verifier_only"]
        if "tokens_per_s" in sd and "tokens_per_s" in alone:
            # predicted from the measured acceptance and per-call costs: tokens per block over the block's
            # calls, against one verifier step per token
            per_block = (args.gamma + 1) * costs["drafter_step_s"] + costs["scoring_call_s"]
            predicted = sd["tokens_per_verifier_call"] * (1 / alone["tokens_per_s"]) / per_block
            realised = sd["tokens_per_s"] / alone["tokens_per_s"]
            row["sd_speedup"] = {"realised": realised, "predicted": predicted,
                                 "realised_over_predicted": realised / predicted}
        print("deep costs", T, costs, row.get("sd_speedup"), flush=True)
        save()


def kernel_profile(fn, steps: int, top: int = 12) -> dict:
    """Device kernels of ``fn`` per step (gpu_speed.kernel_time_share, whose profile lists the
    kernels inside graph replays one by one): their number and time, and the ``top`` by time."""
    from gpu_speed import kernel_time_share  # this folder is on sys.path when the script runs

    r = kernel_time_share(fn, top)
    return {"wall_s_per_step": r["wall_s"] / steps, "kernel_s_per_step": r["device_kernel_s"] / steps,
            "kernels_per_step": r["kernel_launches"] / steps,
            "top": [{"name": k["name"], "per_step": k["calls"] / steps, "s_per_step": k["total_s"] / steps}
                    for k in r["top_kernels"]]}


def section_profile(rec, args, save):
    """Where a decode step's time goes: verifier_only (tiny verifier) and an sd block (tiny pair)."""
    d, v, prompts = load_tiny()
    fd, fv = FusedLlamaBackend(d, "drafter", compile=True), FusedLlamaBackend(v, "verifier", compile=True)
    p = [prompts[0]]
    out = rec.setdefault("profile", {})
    for m in ("verifier_only", "sd"):
        kw = dict(method=m, gamma=args.gamma, temperature=0.0, max_new_tokens=64, eos_token_id=None)
        o = sc.generate(fd, fv, p, **kw)
        steps = o.stats.verifier_calls
        out[f"tiny/{m}"] = kernel_profile(lambda: sc.generate(fd, fv, p, **kw), steps)
        out[f"tiny/{m}"]["steps"] = steps
        print("profile", m, {k: out[f"tiny/{m}"][k] for k in ("wall_s_per_step", "kernel_s_per_step",
                                                            "kernels_per_step")}, flush=True)
        save()


def section_llama1b(rec, args, save):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    with torch.device("cuda"):
        v = LlamaForCausalLM(cfg).to(DTYPE).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in v.parameters())
    prompts = [list(range(10, 42))] * args.prompts
    bw = rec["copy_bandwidth_bytes_per_s"]
    variants = {"default": None, "coordinate_descent": {"coordinate_descent_tuning": True},
                "max_autotune_gemm": {"max_autotune_gemm": True, "coordinate_descent_tuning": True}}
    rec["llama1B"] = {"weight_bytes": weight_bytes}
    for name in args.llama_variants.split(","):
        try:
            fv = FusedLlamaBackend(v, "verifier", compile=True, compile_options=variants[name])
            t = time.perf_counter()
            r = decode_rate(fv, fv, prompts, "verifier_only", 0.0, None, 1, args.max_new, eos=None)
            r["seconds_with_compile"] = time.perf_counter() - t
            r["bandwidth_fraction"] = r["tokens_per_s"] * weight_bytes / bw
            r["compile_options"] = variants[name]
            if name == args.llama_variants.split(",")[-1]:
                r["profile"] = kernel_profile(lambda: sc.generate(fv, fv, [prompts[0]], method="verifier_only",
                                                                  temperature=0.0, max_new_tokens=64), 64)
        except Exception as e:
            r = {"error": repr(e), "trace": traceback.format_exc()[-2000:]}
        rec["llama1B"][name] = r
        print("llama1B", name, {k: r.get(k) for k in ("tokens_per_s", "bandwidth_fraction", "error")}, flush=True)
        save()
        torch._dynamo.reset()
    del v
    torch.cuda.empty_cache()


def section_hf(rec, args, save):
    d, v, prompts = load_tiny()
    p = prompts[0]
    ids = torch.tensor([p], device="cuda")
    out = rec.setdefault("hf", {})
    n = args.max_new

    def timed(fn, reps=3):
        fn()
        ts = []
        for _ in range(reps):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    for label, kw in (("hf_generate_static_compiled", {"cache_implementation": "static"}),
                      ("hf_assisted", {"assistant_model": d, "num_assistant_tokens": args.gamma,
                                       "num_assistant_tokens_schedule": "constant",
                                       "assistant_confidence_threshold": 0.0})):
        try:
            t = timed(lambda: v.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, **kw))
            out[label] = {"tokens_per_s": n / t}
        except Exception as e:
            out[label] = {"error": repr(e)}
        print("hf", label, out[label], flush=True)
        save()
    fd, fv = FusedLlamaBackend(d, "drafter", compile=True), FusedLlamaBackend(v, "verifier", compile=True)
    for label, (bd, bv) in (("fused", (fd, fv)),
                            ("graphs", (make_backend(d, "drafter", "graphs", 2048),
                                        make_backend(v, "verifier", "graphs", 2048)))):
        for m in ("verifier_only", "sd"):
            try:
                out[f"{label}/{m}"] = decode_rate(bd, bv, [p] * 5, m, 0.0, None, args.gamma, n, eos=None)
            except Exception as e:
                out[f"{label}/{m}"] = {"error": repr(e)}
            print("hf", label, m, out[f"{label}/{m}"].get("tokens_per_s"), flush=True)
            save()


def section_batch(rec, args, save):
    d, v, prompts = load_tiny()
    out = rec.setdefault("batch_scaling_T1", {})
    for B in (1, 4, 16, 64):
        fd, fv = FusedLlamaBackend(d, "drafter", compile=True), FusedLlamaBackend(v, "verifier", compile=True)
        batch = [prompts[i % len(prompts)] for i in range(B)]
        row = out.setdefault(str(B), {})
        for m, a in (("verifier_only", None), ("sd", None), ("token_v3", 0.5)):
            try:
                kw = dict(method=m, alpha=a, gamma=args.gamma, temperature=1.0, max_new_tokens=args.max_new,
                          eos_token_id=None)
                sc.generate(fd, fv, batch, seed=0, **kw)
                sc.generate(fd, fv, batch, seed=0, **kw)
                walls = [sc.generate(fd, fv, batch, seed=s, **kw).stats.wall_time_s for s in range(3)]
                row[m] = B * args.max_new / statistics.median(walls)
            except Exception as e:
                row[m] = repr(e)
        row["sd_over_verifier_only"] = row["sd"] / row["verifier_only"] if all(
            isinstance(row[k], float) for k in ("sd", "verifier_only")) else None
        row["token_v3_over_verifier_only"] = row["token_v3"] / row["verifier_only"] if all(
            isinstance(row[k], float) for k in ("token_v3", "verifier_only")) else None
        print("batch", B, row, flush=True)
        save()


def summarise(rec) -> dict:
    def get(*path):
        x = rec
        for k in path:
            if not isinstance(x, dict) or k not in x:
                return None
            x = x[k]
        return x

    s = {"copy_bandwidth_bytes_per_s": rec.get("copy_bandwidth_bytes_per_s"),
         "drafter_only_tiny_tok_s": get("tiny", "T=0", "drafter_only", "tokens_per_s"),
         "verifier_only_tiny_tok_s": get("tiny", "T=0", "verifier_only", "tokens_per_s"),
         "sd_tiny_T0_tok_s": get("tiny", "T=0", "sd", "tokens_per_s"),
         "c_in_sd_loop_tiny": get("tiny", "sd_loop_costs_T0", "c"),
         "c_in_sd_loop_deep": get("deep", "T=0", "sd_loop_costs", "c"),
         "sd_realised_over_predicted_deep": get("deep", "T=0", "sd_speedup", "realised_over_predicted"),
         "outside_graph_share_sd": get("tiny", "sd_T0_outside", "outside_share"),
         "verifier_only_llama1B_tok_s": max([r["tokens_per_s"] for r in (rec.get("llama1B") or {}).values()
                                             if isinstance(r, dict) and "tokens_per_s" in r] or [None],
                                            key=lambda x: x or 0)}
    s["notes"] = ("tiny rates: shipped tiny pair, bf16, fused backend, batch 1, T = 0, EOS on, test prompts; "
                  "c = drafter step / verifier scoring call (gamma + 1 positions), both graph replays of the "
                  "loop's own calls; outside share = 1 - block replays x block replay time / decode wall time "
                  "(prefill included as outside)")
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sections", default="tiny,deep,llama1B,hf,batch")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--gamma", type=int, default=5)
    ap.add_argument("--llama-variants", default="default,coordinate_descent,max_autotune_gemm",
                    help="compile options tried for the 1B shape (the best is the summary's figure)")
    ap.add_argument("--deep-scale", type=float, default=0.05,
                    help="scale of the deep verifier's layers 1.. output projections (agreement with the drafter)")
    ap.add_argument("--inductor", default="", help="torch._inductor.config settings, e.g. coordinate_descent_tuning=1")
    args = ap.parse_args()
    import transformers

    settings = {}
    for kv in filter(None, args.inductor.split(",")):
        import torch._inductor.config as ind

        k, val = kv.split("=")
        setattr(ind, k, type(getattr(ind, k))(int(val)))
        settings[k] = getattr(ind, k)
    rec = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
           "speccascade": sc.__version__, "inductor_settings": settings, "args": vars(args) | {"out": str(args.out)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        rec["summary"] = summarise(rec)
        args.out.write_text(json.dumps(rec, indent=2))

    rec["copy_bandwidth_bytes_per_s"] = copy_bandwidth()
    save()
    sections = {"tiny": section_tiny, "deep": section_deep, "llama1B": section_llama1b, "hf": section_hf,
                "batch": section_batch, "profile": section_profile}
    for name in args.sections.split(","):
        t = time.perf_counter()
        try:
            sections[name](rec, args, save)
        except Exception as e:
            rec.setdefault("errors", {})[name] = {"error": repr(e), "trace": traceback.format_exc()[-3000:]}
            print("section", name, "failed:", repr(e), flush=True)
        rec.setdefault("section_seconds", {})[name] = time.perf_counter() - t
        save()
    print(json.dumps(rec["summary"], indent=2))


if __name__ == "__main__":
    main()
