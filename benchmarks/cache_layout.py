"""The fused backend's attention in the KV-cache layout it uses now (head-major, slot count aligned)
against the one it replaced (slot-major, one trash slot), on the same machine: one decoder step's
worth of attention (every layer's cache write, scores, softmax, values) per feed width. Writes one
JSON record naming the card.

    python benchmarks/cache_layout.py --out runs/cache_layout.json            # the deep preset's shapes

Why: deep pair run 7's kernel profile (results/deep_pair/run7/costs_default.json) of the verifier's
6-token call showed 60 launches (two a layer) of an unaligned cuBLAS kernel (``..._align1``, 398 us of
the call's 1,281 us of kernels) where the one-token step ran gemv kernels (173 us), and two copy
kernels a layer (150 us a call at both widths) that laid each layer's whole cache out for the
products. The slot-major cache ``[B, S+1, Hkv, D]`` with its odd S+1 rows (S slots and the trash slot)
is what made both: a product against it needs the keys transposed, expanded over a KV head's G query
heads and copied, and its rows of S+1 scores are not 16-byte aligned. ``models.fused.gqa_attention``
reads a head-major ``[B, Hkv, C, D]`` cache in place, C a multiple of ``CACHE_ALIGN``.

Each layout's attention is compiled as the fused backend compiles a layer (torch.compile, static
shapes) on a GPU, and the L layers of a step are timed as a CUDA graph replay
(``models.timing.fn_seconds``), as the loops run them; on a CPU (one thread) eagerly. ``--rounds``
repeats each measurement; the record keeps each round and the median.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
from pathlib import Path

import torch

import speccascade
from speccascade.eval.sweep import device_name
from speccascade.models.fused import _cache_len, _capacity, gqa_attention
from speccascade.models.timing import fn_seconds
from speccascade.train.trainer import PRESETS, Shape


def slot_major_attention(q, k, v, k_cache, v_cache, rows, slots, bias, scaling):
    """The layout before: ``k_cache`` / ``v_cache  # [B, S+1, Hkv, D]``, the keys and values viewed
    transposed and broadcast over the G query heads of a KV head.  # -> [B, w, H·D]"""
    B, w, H, D = q.shape
    Hkv = k_cache.shape[2]
    G = H // Hkv
    k_cache[rows, slots] = k
    v_cache[rows, slots] = v
    keys = k_cache.permute(0, 2, 3, 1).unsqueeze(2)                  # [B, Hkv, 1, D, S+1]
    vals = v_cache.transpose(1, 2).unsqueeze(2)                      # [B, Hkv, 1, S+1, D]
    qg = q.view(B, w, Hkv, G, D).permute(0, 2, 3, 1, 4)              # [B, Hkv, G, w, D]
    scores = torch.matmul(qg, keys).float() * scaling
    att = torch.softmax(scores + bias, -1).to(k_cache.dtype)
    return torch.matmul(att, vals).permute(0, 3, 1, 2, 4).reshape(B, w, H * D)


def head_major_attention(q, k, v, k_cache, v_cache, rows, slots, bias, scaling):
    """The layout now (the fused backend's own code): ``[B, Hkv, C, D]``.  # -> [B, w, H·D]"""
    k_cache[rows, :, slots] = k
    v_cache[rows, :, slots] = v
    return gqa_attention(q, k_cache, v_cache, bias, scaling)


LAYOUTS = {"slot_major": slot_major_attention, "head_major": head_major_attention}


def inputs(layout: str, shape: Shape, cache_for: int, filled: int, width: int, device, dtype, seed: int = 0):
    """One step's inputs in ``layout``, batch 1: the L layers' caches (sized as the fused backend sizes
    them for ``cache_for`` tokens; random contents), the feed's q, k, v at positions ``filled ..
    filled + width - 1``, where they go and the attention bias.  # -> (caches, q, k, v, rows, slots, bias)"""
    layers, H, Hkv = shape.layers, shape.heads, shape.kv_heads
    D = shape.hidden // H
    S = _capacity(cache_for)
    n = S + 1 if layout == "slot_major" else _cache_len(S)
    g = torch.Generator().manual_seed(seed)   # the same draws in both layouts
    k_cache, v_cache = (torch.randn(layers, 1, Hkv, _cache_len(S), D, generator=g) for _ in range(2))   # head-major
    if layout == "slot_major":
        k_cache, v_cache = (c[:, :, :, : S + 1].transpose(2, 3).contiguous() for c in (k_cache, v_cache))
    q = torch.randn(1, width, H, D, generator=g)
    k, v = (torch.randn(1, width, Hkv, D, generator=g) for _ in range(2))
    positions = torch.arange(filled, filled + width).view(1, width)
    seen = torch.arange(n).view(1, 1, -1) <= positions.unsqueeze(-1)
    seen[..., S:] = False
    bias = torch.where(seen, 0.0, float("-inf")).view(1, 1, 1, width, n)
    to = [t.to(device, dtype) for t in (k_cache, v_cache, q, k, v)] + [t.to(device) for t in (positions, bias)]
    k_cache, v_cache, q, k, v, positions, bias = to
    return (k_cache, v_cache), q, k, v, torch.zeros_like(positions), positions, bias


def step_seconds(layout: str, shape: Shape, cache_for: int, filled: int, width: int, device: torch.device, dtype,
                 rounds: int, repeats: int) -> list[float]:
    """Seconds of one step's attention (``shape.layers`` layers) at feed ``width`` (:func:`inputs`)."""
    caches, q, k, v, rows, slots, bias = inputs(layout, shape, cache_for, filled, width, device, dtype)
    scaling = (shape.hidden // shape.heads) ** -0.5
    fn = LAYOUTS[layout]
    if device.type == "cuda":
        fn = torch.compile(fn, dynamic=False, fullgraph=True)

    def step():
        for i in range(shape.layers):
            fn(q, k, v, caches[0][i], caches[1][i], rows, slots, bias, scaling)

    return [fn_seconds(step, device, repeats, captured=device.type == "cuda") for _ in range(rounds)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="deep", help="the verifier shape of this preset (layers, heads, kv heads)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default: bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--cache-for", type=int, default=261,
                    help="tokens the cache is sized for (the deep pair's sweep: its longest prompt + 128 new + a "
                         "block's, 261: 512 slots)")
    ap.add_argument("--filled", type=int, default=120, help="cached tokens before the feed (a prompt and ~64 new)")
    ap.add_argument("--widths", default="1,2,6,8", help="feed widths (gamma + 1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    llama = sorted(p for p, roles in PRESETS.items() if isinstance(roles["verifier"].shape, Shape))
    if args.preset not in llama:
        ap.error(f"--preset {args.preset!r}: give a decoder-only preset, one of {', '.join(llama)}")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shape = PRESETS[args.preset]["verifier"].shape
    widths = [int(w) for w in args.widths.split(",")]
    if args.filled + max(widths) > _capacity(args.cache_for):
        ap.error(f"--filled {args.filled} + a feed of {max(widths)} exceed the cache of --cache-for {args.cache_for}")
    rounds = {lay: {str(w): step_seconds(lay, shape, args.cache_for, args.filled, w, device, dtype, args.rounds,
                                         args.repeats) for w in widths} for lay in LAYOUTS}
    med = {lay: {w: statistics.median(r) for w, r in per.items()} for lay, per in rounds.items()}
    record = {"benchmark": "cache_layout", "card": device_name(device), "dtype": str(dtype).removeprefix("torch."),
              "torch": torch.__version__, "speccascade": speccascade.__version__, "python": platform.python_version(),
              "threads": torch.get_num_threads() if device.type == "cpu" else None, "preset": args.preset,
              "shape": dataclasses.asdict(shape), "cache_slots": _capacity(args.cache_for), "filled": args.filled,
              "attention_step_s": med,
              "saved_s": {w: med["slot_major"][w] - med["head_major"][w] for w in med["head_major"]},
              "rounds": rounds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("card", "attention_step_s", "saved_s")}, indent=2))


if __name__ == "__main__":
    main()
