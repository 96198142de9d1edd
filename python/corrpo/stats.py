"""Per-token statistics of the next-token distribution (SPEC 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _native
from ._arrays import logits_buffer, real, vector


@dataclass(frozen=True)
class TokenStats:
    """Per-token statistics of softmax(logits / temperature), float32, one entry per token.

    entropy: H = -sum p log p, in nats (divide by ln 2 for bits).
    logprob: log p of the emitted token.
    collision: sum p^2.
    grad_norm: G = ||p - onehot(y)||, the norm of the gradient of -log p_y w.r.t. the logits.
    head_grad_norm: G * ||h||, the nuclear norm of the token's LM-head weight gradient; only
        when hidden-state norms were given.
    """

    entropy: np.ndarray
    logprob: np.ndarray
    collision: np.ndarray
    grad_norm: np.ndarray
    head_grad_norm: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.entropy)


def token_stats(
    logits: Any,
    token_ids: Any,
    *,
    temperature: float = 1.0,
    hidden_norms: Any = None,
    lengths: Any = None,
) -> TokenStats:
    """Entropy, logprob, collision mass and grad_norm of every token, from one read of its
    logits.

    logits: [T, V] float32, float16 or bfloat16 (NumPy, ``ml_dtypes.bfloat16`` or a torch
        CPU tensor); read in place when rows are contiguous. -inf entries are masked
        vocabulary. Row t holds the logits that produced ``token_ids[t]``.
    token_ids: [T] integer ids of the emitted tokens.
    temperature: the sampling temperature; statistics are of softmax(logits / temperature).
    hidden_norms: optional [T] norms of the final hidden states, for ``head_grad_norm``.
    lengths: optional rollout lengths summing to T; errors then name the rollout and the
        token inside it, not only the row.

    Raises InvalidLogitsError (NaN, +inf or an all -inf row), InvalidTokenError (id out of
    range, or a -inf logit: logits and ids shifted by one), ShapeError, ConfigError.
    The native work runs without the GIL, in parallel over rows.
    """
    array, dtype = logits_buffer(logits)
    rows = array.shape[0]
    ids = vector(token_ids, np.int64, "token_ids", rows)
    norms = None if hidden_norms is None else vector(hidden_norms, np.float32, "hidden_norms", rows)
    spans = None if lengths is None else vector(lengths, np.int64, "lengths")
    h, l, c, g, head = _native.token_stats(array, dtype, ids, real(temperature, "temperature"), norms, spans)
    return TokenStats(entropy=h, logprob=l, collision=c, grad_norm=g, head_grad_norm=head)
