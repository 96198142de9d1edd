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


def shorten(text: str, limit: int) -> str:
    """``text`` whole when it fits in ``limit`` UTF-8 bytes; else its start, an ellipsis and
    its total size. Messages that quote input (a path, a value) stay readable and far below
    gRPC's limit on status details (8-16 KiB of metadata), beyond which a client would see a
    transport error instead of the status."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    tail = f"... ({len(raw)} bytes in all)"
    # Cut on a character boundary: errors="ignore" drops a split multi-byte character.
    return raw[: max(0, limit - len(tail))].decode(errors="ignore") + tail


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
