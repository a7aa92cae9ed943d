"""Logits -> probabilities (temperature, top-k, top-p) and seeded draws.

Everything after the model boundary works on probabilities in float32 (float64 in tests).
Draws never synchronise with the host: a categorical draw is ``argmax(probs / E)`` with
``E ~ Exponential(1)`` i.i.d. (the exponential race; P(argmax = i) = probs_i / sum(probs)), so the
probabilities need not be normalised, and a Bernoulli draw is ``u < prob`` with ``u ~ U[0, 1)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .checks import as_int, as_real
from .errors import SpecCascadeError

#: A row's argmax over the vocabulary (a greedy token, an exponential race) is taken in chunks of this
#: many entries and then over the chunks (:func:`wide_argmax`); SPECCASCADE_SPLIT_ARGMAX=0 turns it off.
ARGMAX_CHUNK = 1024
SPLIT_ARGMAX = os.environ.get("SPECCASCADE_SPLIT_ARGMAX", "1") != "0"

#: The smallest temperature that is sampled from; 0 < T < MIN_TEMPERATURE is refused (logits / T
#: overflows float32 and the softmax turns into NaN, which used to emit pad tokens). T = 0 is greedy.
MIN_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class SamplingConfig:
    """How a model's logits become the distribution that tokens are drawn from.

    ``temperature == 0`` means greedy: the sampling distribution is one-hot on the argmax;
    ``0 < temperature < MIN_TEMPERATURE`` (1e-4) is refused: use 0 for greedy decoding.
    ``top_k == 0`` and ``top_p == 1.0`` switch those filters off. They apply to both models.
    Values are checked, never converted: ``top_k=2.5`` is an error, not 2.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        t = as_real("temperature", self.temperature, hint=" >= 0 (0 = greedy)")
        if t < 0:
            raise SpecCascadeError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if 0 < t < MIN_TEMPERATURE:
            raise SpecCascadeError(
                f"temperature={self.temperature!r} is too small to sample from (the softmax of logits / T "
                f"underflows); use temperature=0 for greedy decoding, or a temperature >= {MIN_TEMPERATURE:g}")
        k = as_int("top_k", self.top_k, minimum=0, hint=" (0 = off)")
        p = as_real("top_p", self.top_p, hint=" in (0, 1] (1 = off)")
        if not 0.0 < p <= 1.0:
            raise SpecCascadeError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        object.__setattr__(self, "temperature", t)
        object.__setattr__(self, "top_k", k)
        object.__setattr__(self, "top_p", p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sampling_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The sampling distribution: tempered, top-k / top-p filtered, float32.  # [..., V]"""
    logits = logits.float()
    if cfg.greedy:  # one-hot on the argmax (a scatter: F.one_hot checks its input on the host)
        return torch.zeros_like(logits).scatter_(-1, wide_argmax(logits).unsqueeze(-1), 1.0)
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def confidence_probs(logits: torch.Tensor) -> torch.Tensor:
    """The untempered (T = 1, unfiltered) softmax used by deferral confidences.  # [..., V]"""
    return torch.softmax(logits.float(), dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None, greedy: bool = False) -> torch.Tensor:
    """One categorical draw per row of (possibly unnormalised) ``probs``.  # [...] long

    A row whose mass is all zero would be ill-defined; callers guard against that. ``greedy``: the rows
    are one-hot (T = 0), so no random number is drawn (:func:`exponential_noise`).
    """
    return draw_with(probs, exponential_noise(probs.shape, probs, generator, greedy))


def exponential_noise(shape, like: torch.Tensor, generator: torch.Generator | None,
                      greedy: bool = False) -> torch.Tensor:
    """Exp(1) draws for :func:`draw_with`, with ``like``'s dtype and device (drawn apart from the
    arithmetic so that the arithmetic can be compiled: a random op with a generator cannot).

    ``greedy``: the distribution to be drawn from is one-hot (T = 0: :func:`sampling_probs` is one-hot,
    and so is every target pi built from one-hot q and p, and its residual), so every positive noise
    gives the same draw; ones are returned and no random number is drawn (on one CPU thread 49,152
    Exp(1) draws cost ~0.9 ms, a draft's worth)."""
    if greedy:
        return torch.ones(shape, dtype=like.dtype, device=like.device)
    return torch.empty(shape, dtype=like.dtype, device=like.device).exponential_(1.0, generator=generator)


def draw_with(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The exponential race with given Exp(1) ``noise`` (same shape as ``probs``).  # [...] long"""
    return wide_argmax(probs / noise)


def wide_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)``, the index of each row's first maximum, as two reductions where the row is
    long: the maximum and its first index within each chunk of ``ARGMAX_CHUNK`` entries (the row
    padded with -inf), then the first chunk holding the largest of them. The same index as
    ``argmax``, ties and all-(-inf) rows included (tested). Why: torch.compile splits a long sum or
    max over several GPU programs but never an argmax, so at batch 1 a 49,152-token row is read by one
    program; a block takes γ + 1 such argmaxes or more.  # [..., V] -> [...] long"""
    V = x.shape[-1]
    if not SPLIT_ARGMAX or V < 2 * ARGMAX_CHUNK:
        return x.argmax(-1)
    chunks = -(-V // ARGMAX_CHUNK)
    if chunks * ARGMAX_CHUNK > V:
        x = torch.nn.functional.pad(x, (0, chunks * ARGMAX_CHUNK - V), value=float("-inf"))
    best, where = x.unflatten(-1, (chunks, ARGMAX_CHUNK)).max(-1)            # [..., chunks]
    chunk = best.argmax(-1, keepdim=True)                                   # [..., 1]
    return (chunk * ARGMAX_CHUNK + where.gather(-1, chunk)).squeeze(-1)


def uniform(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """U[0, 1) draws with ``like``'s dtype and device."""
    return torch.rand(shape, generator=generator, dtype=like.dtype, device=like.device)
