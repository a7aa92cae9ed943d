"""The method registry: every method of the paper under one name, ``METHODS[name]``.

A plain dict filled by the ``register`` decorator (speculative rules in :mod:`.rules`,
sequential methods in :mod:`.baselines`). The CLI takes its ``choices=`` from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from .errors import SpecCascadeError


@dataclass(frozen=True)
class AlphaRange:
    """The admissible values of a threshold, with what they mean."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    default: float = 0.0
    meaning: str = ""

    def check(self, method: str, value: float, name: str = "alpha") -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise SpecCascadeError(f"{name} for method {method!r} must be a number, got {value!r}") from None
        if math.isnan(v):
            raise SpecCascadeError(f"{name} for method {method!r} is NaN")
        too_low = v < self.low or (self.low_open and v == self.low)
        too_high = v > self.high or (self.high_open and v == self.high)
        if too_low or too_high:
            raise SpecCascadeError(
                f"{name}={value!r} is outside the range of method {method!r}: "
                f"{self.describe()} ({self.meaning})"
            )
        return v

    def describe(self) -> str:
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open else "]"
        fmt = lambda x: "inf" if x == math.inf else "-inf" if x == -math.inf else f"{x:g}"  # noqa: E731
        return f"{lo}{fmt(self.low)}, {fmt(self.high)}{hi}"


@dataclass(frozen=True)
class MethodSpec:
    """One decoding method.

    ``kind`` is ``"speculative"`` (the one loop of :mod:`.loop`, with ``fn`` the rule building pi)
    or ``"sequential"`` (``fn`` decodes by itself, :mod:`.baselines`).
    ``bonus_from_verifier``: the bonus token is drawn from p rather than pi (sd, lossy*).
    """

    name: str
    kind: str
    fn: Callable
    title: str
    paper: str
    alpha: AlphaRange | None = None
    extra: dict = field(default_factory=dict)
    bonus_from_verifier: bool = False


METHODS: dict[str, MethodSpec] = {}


def register(name: str, *, kind: str, title: str, paper: str, alpha: AlphaRange | None = None,
             bonus_from_verifier: bool = False, extra: dict | None = None):
    """Decorator: add ``fn`` to :data:`METHODS` under ``name``."""

    def deco(fn):
        if name in METHODS:
            raise RuntimeError(f"method {name!r} registered twice")
        METHODS[name] = MethodSpec(name=name, kind=kind, fn=fn, title=title, paper=paper, alpha=alpha,
                                   extra=dict(extra or {}), bonus_from_verifier=bonus_from_verifier)
        return fn

    return deco


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise SpecCascadeError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]
