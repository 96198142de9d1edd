"""Exceptions raised by corrpo. All are ``CorrpoError`` and ``ValueError`` subclasses.

Each carries its context as attributes (``row``, ``rollout``, ``token_index``,
``vocab_index``, ``token_id``, ``field``, ``index``: whichever apply, else ``None``) so code can
react without parsing the message.
"""

from __future__ import annotations


class CorrpoError(ValueError):
    """Base class of every corrpo input error."""

    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.message = message
        for name in ("row", "rollout", "token_index", "vocab_index", "token_id", "field", "index"):
            setattr(self, name, context.pop(name, None))
        if context:
            raise TypeError(f"unknown error context {sorted(context)}")


class ShapeError(CorrpoError):
    """Arrays whose shapes or lengths do not fit together."""


class ConfigError(CorrpoError):
    """A setting out of its domain: temperature, method, gate, advantage, min_tokens..."""


class InvalidLogitsError(CorrpoError):
    """A row of logits with NaN or +inf, or with every entry -inf."""


class InvalidTokenError(CorrpoError):
    """A token id outside the vocabulary, or one whose logit is -inf."""


class InvalidValueError(CorrpoError):
    """A non-finite or out-of-range value in a per-token or per-rollout array."""


__all__ = [
    "CorrpoError",
    "ShapeError",
    "ConfigError",
    "InvalidLogitsError",
    "InvalidTokenError",
    "InvalidValueError",
]
