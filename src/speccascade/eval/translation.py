"""Translate Bible verses (dicts with ``en`` / ``es``) with any method, batched, and score the result."""

from __future__ import annotations

from ..stats import Stats
from .metrics import bleu, chrf
from .tasks import BibleTask, run_task


def translate(drafter, verifier, tokenizer, pairs: list[dict], *, method: str = "verifier_only", alpha=None,
              gamma: int = 5, temperature: float = 0.0, batch_size: int = 64, max_new_tokens: int = 200,
              seed: int = 0, progress: bool = False, **options) -> tuple[list[str], Stats]:
    """The Spanish of each pair's ``en``, in input order (:func:`.tasks.run_task` on the Bible task)."""
    return run_task(drafter, verifier, tokenizer, BibleTask(), [p["en"] for p in pairs], method=method, alpha=alpha,
                    gamma=gamma, temperature=temperature, batch_size=batch_size, max_new_tokens=max_new_tokens,
                    seed=seed, progress=progress, **options)


def score(hyps: list[str], pairs: list[dict]) -> dict[str, float]:
    refs = [p["es"] for p in pairs]
    return {"bleu": bleu(hyps, refs), "chrf": chrf(hyps, refs)}
