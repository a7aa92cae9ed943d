"""Kept for existing imports: the Bible translation helpers now live in :mod:`speccascade.eval.tasks`
(:func:`~speccascade.eval.tasks.translate_pairs`, :func:`~speccascade.eval.tasks.score_pairs`)."""

from .tasks import score_pairs as score
from .tasks import translate_pairs as translate

__all__ = ["score", "translate"]
