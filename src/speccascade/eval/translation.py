"""Translate Bible verses with any method, batched, and score the result."""

from __future__ import annotations

from dataclasses import fields

from ..api import generate
from ..stats import Stats
from ..train.tokenizer import EOS, decode, encode_prompt
from .metrics import bleu, chrf


def add_stats(total: Stats, part: Stats) -> None:
    for f in fields(Stats):
        a, b = getattr(total, f.name), getattr(part, f.name)
        if isinstance(a, list):
            n = max(len(a), len(b))
            setattr(total, f.name, [x + y for x, y in zip(a + [0] * (n - len(a)), b + [0] * (n - len(b)))])
        else:
            setattr(total, f.name, a + b)


def translate(drafter, verifier, tokenizer, pairs: list[dict], *, method: str = "verifier_only", alpha=None,
              gamma: int = 5, temperature: float = 0.0, batch_size: int = 64, max_new_tokens: int = 200,
              seed: int = 0, progress: bool = False, **options) -> tuple[list[str], Stats]:
    """Translate ``pairs`` (dicts with ``en``); rows are batched by prompt length, results in input order."""
    from tqdm.auto import tqdm

    prompts = [encode_prompt(tokenizer, p["en"]) for p in pairs]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    hyps: list[str] = [""] * len(prompts)
    total = Stats()
    for k in tqdm(range(0, len(order), batch_size), desc=f"translate {method}", disable=not progress):
        idx = order[k:k + batch_size]
        out = generate(drafter, verifier, [prompts[i] for i in idx], method=method, alpha=alpha, gamma=gamma,
                       temperature=temperature, max_new_tokens=max_new_tokens, eos_token_id=EOS,
                       seed=seed + k, **options)
        for i, toks in zip(idx, out.tokens):
            hyps[i] = decode(tokenizer, toks)
        add_stats(total, out.stats)
    return hyps, total


def score(hyps: list[str], pairs: list[dict]) -> dict[str, float]:
    refs = [p["es"] for p in pairs]
    return {"bleu": bleu(hyps, refs), "chrf": chrf(hyps, refs)}
