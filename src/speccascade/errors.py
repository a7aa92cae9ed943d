"""Errors raised for bad input. Each message names the problem, the value that caused it and, where
there is one, the fix. Every error speccascade raises on purpose is a :class:`SpecCascadeError`
(a ``ValueError``); the command line prints it as ``speccascade: error: ...`` and exits with 2.
"""


class SpecCascadeError(ValueError):
    """Bad input to speccascade: the message says what is wrong and how to fix it."""


class ModelLoadError(SpecCascadeError):
    """A model or tokenizer could not be loaded; the message names the role (drafter, verifier,
    tokenizer), the path and what is wrong with it."""


class DeviceError(SpecCascadeError):
    """A device that does not exist on this machine, an unknown device string, a bad thread count,
    or two models on different devices."""


class SweepFileError(SpecCascadeError):
    """A sweep or report file that cannot be read or extended safely: missing, not a text file,
    damaged, not sweep records, written with other settings, or not writable."""


class NonFiniteLogitsError(SpecCascadeError, RuntimeError):
    """A model returned NaN or infinite logits; the message names the model. (Also a
    ``RuntimeError``, as it was before it became a :class:`SpecCascadeError`.)"""
