"""Errors raised for bad input. Each message names the problem and the value that caused it."""


class SpecCascadeError(ValueError):
    """Bad input to speccascade: the message says what is wrong and how to fix it."""


class NonFiniteLogitsError(RuntimeError):
    """A model returned NaN or infinite logits; the message names the model."""
