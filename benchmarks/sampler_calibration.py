"""Does a decode sample the verifier's law, token by token, on a real pair? A calibration test.

Where a method samples each token x_t from the verifier's tempered distribution p_t = p(. | prefix)
(``verifier_only``, and lossless speculative decoding: Leviathan et al. 2023, the paper's Algorithm 4 with
T(q, p) = p), the token's surprisal under p_t, -log p_t(x_t), has expectation H(p_t), the entropy of p_t,
given the prefix. So d_t = -log p_t(x_t) - H(p_t) has mean 0 at every position whatever came before, and
the mean of d_t over every generated token of many decodes is 0 up to its standard error (the d_t are
martingale differences: uncorrelated, so the plain standard error holds; stopping at EOS or at
``--max-new-tokens`` depends only on the prefix and keeps the mean at 0). A method that favours the
tail of p (tokens p finds unlikely) shows d > 0; one that favours its head, d < 0. With tens of
thousands of tokens this sees a bias far smaller than a sweep's BLEU can (a T = 1 cell of 500 verses is
±1 BLEU from its law's mean). Lossy methods (the cascades) are not expected to give 0.

p_t is recomputed by one teacher-forced pass of the verifier over prompt + output (float32 log-softmax),
not read from the decode, so a decode whose p differs from the model's (a cache or position fault) shows
too. In bf16 the decode's and the pass's logits differ by rounding, which moves d by far less than its
standard error. One JSON record naming the card.

    python benchmarks/sampler_calibration.py --drafter runs/deep/drafter --verifier runs/deep/verifier \\
        --device cuda --dtype bfloat16 --backend fused --examples 500 --out runs/calibration.json
    python benchmarks/sampler_calibration.py --examples 100 --out /tmp/calibration.json   # the shipped tiny pair, CPU
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
from pathlib import Path

import torch

import speccascade
from speccascade.api import generate
from speccascade.eval.sweep import device_name
from speccascade.eval.tasks import get_task
from speccascade.models import make_backend
from speccascade.models.base import reserve_request


def surprisal_minus_entropy(model, prompt: list[int], output: list[int], temperature: float) -> list[float]:
    """d_t = -log p_t(x_t) - H(p_t) for each token x_t of ``output``, p_t the model's distribution at
    ``temperature`` after prompt + output[:t] (one forward pass; float32 log-softmax)."""
    if not output:
        return []
    ids = torch.tensor([prompt + output], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float() / temperature    # [len(output), V]
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    surprisal = -logp.gather(-1, torch.tensor(output, device=logp.device).unsqueeze(-1)).squeeze(-1)
    return (surprisal - entropy).tolist()


def summary(d: list[float]) -> dict:
    """Mean of d, its standard error and z = mean / se."""
    mean = statistics.fmean(d)
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    return {"tokens": len(d), "mean": mean, "se": se, "z": mean / se if se > 0 else None}


def calibrate(d_be, v_model, v_be, prompts: list[list[int]], method: str, temperature: float, gamma: int,
              max_new_tokens: int, eos, alpha=None, seed: int = 0) -> dict:
    """Decode each prompt alone (batch 1, seed ``seed + i``) with ``method``; the summary of its d_t."""
    d = []
    for i, prompt in enumerate(prompts):
        out = generate(d_be, v_be, [prompt], method=method, alpha=alpha, gamma=gamma, temperature=temperature,
                       max_new_tokens=max_new_tokens, eos_token_id=eos, seed=seed + i)
        d += surprisal_minus_entropy(v_model, prompt, out.tokens[0], temperature)
    return {"method": method, "alpha": alpha} | summary(d)


def _shown(path) -> str:
    """A model folder as the record names it: relative to the working directory where it lies under it."""
    p = Path(path).resolve()
    return str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p)


def main() -> None:
    from speccascade.cli import _load_pair, _model_args, _pair_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _pair_args(ap)     # the pair and its tokenizer (the verifier's), loaded as `speccascade sweep` loads them
    _model_args(ap)
    ap.add_argument("--examples", type=int, default=100)
    ap.add_argument("--methods", default="verifier_only,sd")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--gamma", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not args.temperature > 0:
        ap.error("--temperature must be > 0: at T = 0 nothing is sampled")
    if not args.device.startswith("cuda"):
        torch.set_num_threads(1)
    d_model, v_model, tok, (d_dir, v_dir) = _load_pair(args)
    task = get_task()
    prompts = [task.encode(tok, ex.input) for ex in task.examples(args.examples)]
    d_be, v_be = make_backend(d_model, "drafter", args.backend), make_backend(v_model, "verifier", args.backend)
    for be in (d_be, v_be):
        reserve_request(be, 1, max(map(len, prompts)), args.max_new_tokens, args.gamma)
    rows = [calibrate(d_be, v_model, v_be, prompts, m, args.temperature, args.gamma, args.max_new_tokens,
                      task.eos_token_id(tok)) for m in args.methods.split(",")]
    rec = {"benchmark": "sampler_calibration", "card": device_name(torch.device(args.device)),
           "cpu": platform.machine(),
           "torch": torch.__version__, "speccascade": speccascade.__version__, "dtype": args.dtype,
           "backend": args.backend, "drafter": _shown(d_dir), "verifier": _shown(v_dir), "examples": len(prompts),
           "temperature": args.temperature, "gamma": args.gamma, "max_new_tokens": args.max_new_tokens,
           "threads": torch.get_num_threads(), "methods": rows,
           "note": "mean of -log p(x) - H(p) over every generated token, p the verifier's distribution "
                   "recomputed by a teacher-forced pass: 0 within ~2 se for a method that samples p"}
    args.out.write_text(json.dumps(rec, indent=1) + "\n")
    for r in rows:
        print(f"{r['method']:14s} {r['tokens']:6d} tokens: mean {r['mean']:+.4f} nats "
              f"(se {r['se']:.4f}, z {r['z']:+.2f})")


if __name__ == "__main__":
    main()
