"""Batched decoding speed per backend: what `speccascade distill` should decode the verifier's
translations with. Writes one JSON record naming the card.

    python benchmarks/decode_batch.py --verifier runs/deep/verifier --device cuda --out runs/decode_batch.json
    python benchmarks/decode_batch.py --preset tiny --device cpu --batch-size 8 --max-new-tokens 4 --out /tmp/d.json

The distillation decodes every training verse's English with the verifier alone, in batches of
1,024 rows (`gpu_deep_pair_run.sh`'s DISTILL_BATCH), and took 5.6 of run 10's 30 device-minutes on
the `dynamic` backend (transformers' own forward and cache); the `fused_eager` backend runs our own
forward over the same weights (one KV cache of head-major slots, no graphs, no compile). Each backend
here decodes the same ``--batches`` batches of training verses (sorted by length, as the distillation
batches them) for exactly ``--max-new-tokens`` tokens a row (default 200, the distillation's, which also
sizes the fused backend's cache; no EOS, so a trained and a random verifier cost the same), after one
warm-up batch of 4 tokens; the record keeps each batch's wall, tokens per second, milliseconds a
decoding step (the prompts' pre-fill included) and, as a check, how far the rows' tokens agree with the
first backend's (greedy; bf16 rounding can split near-ties, and a split runs on to the row's end): whole
rows, rows up to their first EOS (what the distillation keeps), and the mean position of the first
difference (run 11 on an H200: 27% of 1,024 whole 200-token rows equal, before this count existed);
``--reference-float32`` also counts each backend's agreement with a float32 decode of the same rows
(``results/decode_bf16_cpu.json``: the shipped tiny verifier on one CPU thread). ``faster`` names the
backend with the most tokens per second, ``speedup`` its rate over the other's
(`gpu_deep_pair_run.sh`'s ``DISTILL_BACKEND=auto`` takes ``fused_eager`` where it is at least
:data:`PAYS` times faster; run 11: 7.2×, so the script now distils on it by default). Random weights of
``--preset``'s verifier shape unless ``--verifier`` names a checkpoint (the shipped tiny one uses the
shipped tokenizer).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import speccascade
from speccascade.api import generate
from speccascade.data.bible import load_split
from speccascade.data.prompt import encode_prompt
from speccascade.eval.sweep import device_name
from speccascade.eval.tasks import batch_order
from speccascade.models import make_backend
from speccascade.models.loading import TOKENIZER_DIR, load_causal_lm
from speccascade.models.timing import sync
from speccascade.train.tokenizer import load_tokenizer
from speccascade.train.trainer import PRESETS, build_model

#: how much faster ``fused_eager`` must decode for DISTILL_BACKEND=auto to take it over ``dynamic``
PAYS = 1.1


def batches_of(tokenizer, batch_size: int, n_batches: int) -> list[list[list[int]]]:
    """The first ``batch_size * n_batches`` training verses' prompts, sorted by length and cut into
    batches (as ``run_task`` batches the distillation's)."""
    prompts = [encode_prompt(tokenizer, p["en"]) for p in load_split("train")[:batch_size * n_batches]]
    return [[prompts[i] for i in idx] for idx in batch_order(prompts, batch_size)]


def agreement(tokens: list[list[int]], first: list[list[int]], eos: int | None) -> dict:
    """How far each row's tokens agree with the first backend's: whole rows equal, rows equal up to and
    including the first backend's first ``eos`` (what the distillation keeps of a row), and the mean
    position of a row's first differing token (the row's length where none differs)."""
    def kept(row):
        return row[:row.index(eos) + 1] if eos is not None and eos in row else row

    def first_difference(a, b):
        return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    n = len(first)
    return {"rows_equal_to_first": sum(a == b for a, b in zip(tokens, first)) / n,
            "rows_equal_to_first_to_eos": sum(kept(b) == a[:len(kept(b))] for a, b in zip(tokens, first)) / n,
            "mean_first_difference": sum(first_difference(a, b) for a, b in zip(tokens, first)) / n}


def decode(backend, prompts, max_new_tokens: int, device: torch.device) -> tuple[float, list[list[int]]]:
    sync(device)
    start = time.perf_counter()
    out = generate(backend, backend, prompts, method="verifier_only", temperature=0.0,
                   max_new_tokens=max_new_tokens, eos_token_id=[], seed=0)
    sync(device)
    return time.perf_counter() - start, out.tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--verifier", type=Path, default=None, help="a checkpoint (default: random weights of --preset)")
    ap.add_argument("--preset", default="deep", choices=list(PRESETS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                    help="default: bfloat16 on a GPU (the distillation's), float32 on a CPU")
    ap.add_argument("--backends", default="dynamic,fused_eager")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=200,
                    help="tokens a row (default: `distill`'s --max-new-tokens, which sizes the fused cache)")
    ap.add_argument("--reference-float32", action="store_true",
                    help="also decode the batches on `dynamic` in float32 and count each backend's agreement with "
                         "that (`against_float32`): how far each one's bf16 rounding moves the greedy tokens")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    backends = [b for b in args.backends.split(",") if b]
    has_own = args.verifier is not None and (args.verifier / "tokenizer.json").is_file()
    tokenizer = load_tokenizer(args.verifier if has_own else TOKENIZER_DIR)   # the shipped models use the shipped one

    def load(dtype):
        if args.verifier is not None:
            return load_causal_lm(args.verifier, device=str(device), dtype=dtype).eval()
        torch.manual_seed(0)
        return build_model(PRESETS[args.preset]["verifier"].shape, len(tokenizer)).to(device=device, dtype=dtype).eval()

    model = load(dtype)
    batches = batches_of(tokenizer, args.batch_size, args.batches)
    record = {"benchmark": "decode_batch", "card": device_name(device), "torch": torch.__version__,
              "speccascade": speccascade.__version__, "python": platform.python_version(),
              "threads": args.threads if device.type == "cpu" else None, "dtype": str(dtype).removeprefix("torch."),
              "verifier": str(args.verifier) if args.verifier else f"random {args.preset} verifier",
              "batch_size": args.batch_size, "batches": len(batches), "max_new_tokens": args.max_new_tokens,
              "backends": {}}
    first_tokens = reference = None
    if args.reference_float32:   # the same batches on `dynamic` in float32: what each backend's rounding is against
        exact = load(torch.float32)
        reference = [row for prompts in batches for row in decode(exact, prompts, args.max_new_tokens, device)[1]]
        del exact
    for name in backends:
        backend = model if name == "dynamic" else make_backend(model, "verifier", name)
        decode(backend, batches[0], 4, device)   # warm-up: allocations, kernel selection
        walls, tokens = [], []
        for prompts in batches:
            wall, toks = decode(backend, prompts, args.max_new_tokens, device)
            walls.append(wall)
            tokens += toks
        n = sum(len(t) for t in tokens)
        steps = len(batches) * args.max_new_tokens
        rec = {"walls_s": walls, "tokens": n, "tokens_per_s": n / sum(walls), "ms_per_step": 1e3 * sum(walls) / steps}
        if first_tokens is None:
            first_tokens = tokens
        else:
            rec.update(agreement(tokens, first_tokens, tokenizer.eos_token_id))
        if reference is not None:
            rec["against_float32"] = agreement(tokens, reference, tokenizer.eos_token_id)
        record["backends"][name] = rec
        print(json.dumps({name: {k: rec[k] for k in ("tokens_per_s", "ms_per_step")}}), flush=True)
        del backend
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rates = {k: v["tokens_per_s"] for k, v in record["backends"].items()}
    record["faster"] = max(rates, key=rates.get)
    if len(rates) == 2:
        record["speedup"] = max(rates.values()) / min(rates.values())
        record["fused_eager_pays"] = rates.get("fused_eager", 0) >= PAYS * rates.get("dynamic", float("inf"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
