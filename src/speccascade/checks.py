"""Type and range checks shared by the API, the registry's option specs, the sampling settings,
the sweep and the command line. Each raises :class:`SpecCascadeError` naming the argument, the value
received and what is expected; none silently converts (2.5 is not an integer, ``"yes"`` is not a bool).
"""

from __future__ import annotations

import math
import numbers

from .errors import SpecCascadeError


def _scalar(value):
    """A 0-d tensor / numpy scalar -> its Python value; anything else unchanged."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value


def _got(value) -> str:
    return f"{value!r} ({type(value).__name__})" if not isinstance(value, (int, float)) or isinstance(value, bool) \
        else repr(value)


def as_int(name: str, value, minimum: int | None = None, allow_none: bool = False, hint: str = "") -> int | None:
    """``value`` as an ``int``: an integer (a float only when it is integral, e.g. 5.0), >= ``minimum``."""
    value = _scalar(value)
    if value is None and allow_none:
        return None
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok and isinstance(value, float) and value.is_integer():
        ok = True
    low = f" >= {minimum}" if minimum is not None else ""
    nothing = " or None" if allow_none else ""
    if not ok:
        raise SpecCascadeError(f"{name} must be an integer{low}{nothing}{hint}, got {_got(value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise SpecCascadeError(f"{name} must be an integer{low}{nothing}{hint}, got {value}")
    return value


def as_real(name: str, value, allow_none: bool = False, finite: bool = True, hint: str = "") -> float | None:
    """``value`` as a ``float``: a real number (not a string or a bool), not NaN, finite unless
    ``finite=False``."""
    value = _scalar(value)
    if value is None and allow_none:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise SpecCascadeError(f"{name} must be a number{hint}, got {_got(value)}")
    v = float(value)
    if math.isnan(v):
        raise SpecCascadeError(f"{name} is NaN{hint}")
    if finite and math.isinf(v):
        raise SpecCascadeError(f"{name} must be a finite number{hint}, got {v}")
    return v


TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


def as_bool(name: str, value, hint: str = "") -> bool:
    """``value`` as a ``bool``: True or False (numpy bools too); never a string or a number."""
    value = _scalar(value)
    if isinstance(value, bool):
        return value
    if type(value).__name__ == "bool_":  # numpy.bool_
        return bool(value)
    raise SpecCascadeError(f"{name} must be True or False{hint}, got {_got(value)}")


def parse_bool(name: str, text: str) -> bool:
    """Command-line text -> bool: true/yes/on/1 or false/no/off/0 (any case)."""
    t = str(text).strip().lower()
    if t in TRUE_WORDS:
        return True
    if t in FALSE_WORDS:
        return False
    raise SpecCascadeError(f"{name} must be true or false, got {text!r}")
