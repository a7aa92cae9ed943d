"""Greedy lossless SD against the verifier alone, per dtype: how many outputs differ.

In exact arithmetic greedy `sd` returns the verifier's greedy output. In a reduced precision the
verifier's logits for a token depend on how many tokens one call scores (a block of gamma + 1 vs
one), so near-tied argmaxes can flip. Writes one JSON record.

Run from the repository root (default paths are relative to it), with the package installed:
``pip install -e .`` (or ``scripts/setup.sh``). For example:

    python benchmarks/greedy_dtype_check.py --out results/pairs/greedy_sd_vs_verifier_tiny_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

import speccascade as sc
from speccascade.data.bible import load_split
from speccascade.data.prompt import EOS, encode_prompt
from speccascade.models.loading import TOKENIZER_DIR, embedded_pair_dirs, load_causal_lm, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=60)
    ap.add_argument("--gamma", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()
    torch.set_num_threads(1)
    d_dir, v_dir = embedded_pair_dirs("tiny")
    tok = load_tokenizer(TOKENIZER_DIR)
    prompts = [encode_prompt(tok, p["en"]) for p in load_split("test")[:args.prompts]]
    rec = {"pair": "tiny (embedded)", "device": f"cpu:{platform.machine()}", "torch": torch.__version__,
           "gamma": args.gamma, "max_new_tokens": args.max_new_tokens, "prompts": len(prompts), "dtypes": {}}
    for dtype in (torch.float32, torch.bfloat16):
        d, v = load_causal_lm(d_dir).to(dtype), load_causal_lm(v_dir).to(dtype)
        differ = 0
        for p in prompts:
            kw = dict(temperature=0, max_new_tokens=args.max_new_tokens, eos_token_id=EOS)
            a = sc.generate(d, v, [p], method="verifier_only", **kw).tokens[0]
            b = sc.generate(d, v, [p], method="sd", gamma=args.gamma, **kw).tokens[0]
            differ += a != b
        rec["dtypes"][str(dtype).removeprefix("torch.")] = {"outputs_differing": differ}
        print(dtype, differ, "of", len(prompts), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rec, indent=2))


if __name__ == "__main__":
    main()
