"""The method registry: every method of the paper under one name, ``METHODS[name]``.

A plain dict filled by the ``register`` decorator (speculative rules in :mod:`.rules`,
sequential methods in :mod:`.baselines`). The CLI takes its ``choices=`` from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from .checks import as_bool, as_int, as_real, parse_bool
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
        v = as_real(f"{name} for method {method!r}", value, hint=f" in {self.describe()}")
        too_low = v < self.low or (self.low_open and v == self.low)
        too_high = v > self.high or (self.high_open and v == self.high)
        if too_low or too_high:
            raise SpecCascadeError(
                f"{name}={value!r} is outside the range of method {method!r}: "
                f"{self.describe()} ({self.meaning})"
            )
        return v

    def describe(self) -> str:
        lo = "(" if self.low_open or self.low == -math.inf else "["
        hi = ")" if self.high_open or self.high == math.inf else "]"
        fmt = lambda x: "inf" if x == math.inf else "-inf" if x == -math.inf else f"{x:g}"  # noqa: E731
        return f"{lo}{fmt(self.low)}, {fmt(self.high)}{hi}"

    def parse(self, method: str, text: str, name: str = "alpha") -> float:
        """Command-line text -> a checked value."""
        try:
            v = float(str(text).strip())
        except ValueError:
            raise SpecCascadeError(f"{name} for method {method!r} must be a number, got {text!r}") from None
        return self.check(method, v, name)


@dataclass(frozen=True)
class Option:
    """A typed method option (besides alpha): its type, default and admissible values.

    ``type`` is ``bool``, ``int`` or ``float``; ``minimum`` bounds numbers from below;
    ``none_ok``: ``None`` is admissible (e.g. "no cap"). :meth:`check` takes Python values and
    converts nothing (``"yes"`` is not a bool, 2.5 is not an int); :meth:`parse` reads command-line
    text (true/false, a number, ``none``).
    """

    type: type
    default: object
    minimum: float | None = None
    none_ok: bool = False
    meaning: str = ""

    def check(self, method: str, value, name: str):
        what = f"option {name} of method {method!r}"
        if value is None:
            if self.none_ok:
                return None
            raise SpecCascadeError(f"{what} cannot be None; give {self.describe()}")
        if self.type is bool:
            return as_bool(what, value)
        if self.type is int:
            return as_int(what, value, None if self.minimum is None else int(self.minimum), self.none_ok)
        v = as_real(what, value)
        if self.minimum is not None and v < self.minimum:
            raise SpecCascadeError(f"{what} must be >= {self.minimum:g}, got {v:g}")
        return v

    def parse(self, method: str, text: str, name: str):
        t = str(text).strip()
        if self.none_ok and t.lower() in ("none", "null"):
            return None
        if self.type is bool:
            return parse_bool(f"option {name} of method {method!r}", t)
        try:
            value = int(t) if self.type is int else float(t)
        except ValueError:
            raise SpecCascadeError(f"option {name} of method {method!r} must be {self.describe()}, "
                                   f"got {text!r}") from None
        return self.check(method, value, name)

    def describe(self) -> str:
        if self.type is bool:
            kind = "true or false"
        else:
            kind = ("an integer" if self.type is int else "a number") + \
                (f" >= {self.minimum:g}" if self.minimum is not None else "")
        none = " or none" if self.none_ok else ""
        default = self.default if not isinstance(self.default, bool) else str(self.default).lower()
        return f"{kind}{none} (default {'none' if default is None else default})"


#: What a plain default in ``register(extra=...)`` means (a typed spec is derived from it).
OPTION_MEANINGS = {
    "length_normalized": "compare the per-token geometric mean of q(response) instead of the raw product",
    "max_drafter_run": "at most this many drafter tokens in a row before the verifier is called (none: no cap)",
}


def typed_option(name: str, value) -> "Option | AlphaRange":
    """A typed spec from a plain default: a bool -> a bool option; an int -> a count >= 1 that may
    be None (no limit); a float -> a number. Typed specs (:class:`Option`, :class:`AlphaRange`)
    are kept as they are."""
    if isinstance(value, (Option, AlphaRange)):
        return value
    meaning = OPTION_MEANINGS.get(name, "")
    if isinstance(value, bool):
        return Option(bool, value, meaning=meaning)
    if isinstance(value, int):
        return Option(int, value, minimum=1, none_ok=True, meaning=meaning)
    if isinstance(value, float):
        return Option(float, value, meaning=meaning)
    raise TypeError(f"option {name!r}: give a typed spec (registry.Option), not {value!r}")


@dataclass(frozen=True)
class MethodSpec:
    """One decoding method.

    ``kind`` is ``"speculative"`` (the one loop of :mod:`.loop`, with ``fn`` the rule building pi)
    or ``"sequential"`` (``fn`` decodes by itself, :mod:`.baselines`).
    ``bonus_from_verifier``: the bonus token is drawn from p rather than pi (sd, lossy*).
    ``extra``: the method's options besides alpha, each a typed spec (:class:`Option` or
    :class:`AlphaRange`) with :meth:`check` (Python values) and :meth:`parse` (command-line text).
    """

    name: str
    kind: str
    fn: Callable
    title: str
    paper: str
    alpha: AlphaRange | None = None
    extra: dict = field(default_factory=dict)
    bonus_from_verifier: bool = False

    def drafter_calls_per_block(self, gamma: int) -> int:
        """A speculative block's drafter calls: gamma + 1 (the last gives q at the bonus position), or
        gamma where the bonus token comes from p (the last draft is fed with the next block's first call)."""
        return gamma + (0 if self.bonus_from_verifier else 1)

    def check_alpha(self, alpha):
        """``alpha`` checked against the method's range (``None``: the method's default)."""
        if self.alpha is None:
            if alpha is not None:
                raise SpecCascadeError(f"method {self.name!r} takes no alpha (got alpha={alpha!r}); leave it out")
            return None
        return self.alpha.default if alpha is None else self.alpha.check(self.name, alpha)

    def check_options(self, options: dict) -> dict:
        """The method's options (besides alpha), each checked against its typed spec."""
        unknown = sorted(set(options) - set(self.extra))
        if unknown:
            takes = ", ".join(f"{k}: {v.describe()}" for k, v in self.extra.items()) or "none"
            raise SpecCascadeError(f"method {self.name!r} has no option(s) {unknown}; it takes {takes}")
        return {k: self.extra[k].check(self.name, v, k) for k, v in options.items()}


METHODS: dict[str, MethodSpec] = {}


def register(name: str, *, kind: str, title: str, paper: str, alpha: AlphaRange | None = None,
             bonus_from_verifier: bool = False, extra: dict | None = None):
    """Decorator: add ``fn`` to :data:`METHODS` under ``name``."""

    def deco(fn):
        if name in METHODS:
            raise RuntimeError(f"method {name!r} registered twice")
        METHODS[name] = MethodSpec(name=name, kind=kind, fn=fn, title=title, paper=paper, alpha=alpha,
                                   extra={k: typed_option(k, v) for k, v in (extra or {}).items()},
                                   bonus_from_verifier=bonus_from_verifier)
        return fn

    return deco


def get_method(name: str) -> MethodSpec:
    if not isinstance(name, str) or name not in METHODS:
        raise SpecCascadeError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]
