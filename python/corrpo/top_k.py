"""Bounds on H and G from top-k logprobs, the form rollout engines (SGLang, vLLM) return.

With only the k largest probabilities seen, the unseen tail holds the rest of the mass R
spread over the other V - k tokens, none larger than the smallest top-k probability q. The
entropy is lowest (and the collision mass, hence G, highest) when the tail is as few tokens
of size q as possible, and the entropy highest (G lowest) when the tail is spread evenly:

    H_tail in [-R ln q, -R ln(R / n)],   sum_tail p^2 in [R^2 / n, R q]

with n the number of unseen tokens. An emitted token outside the top-k is taken out of the
tail with its known probability. G = sqrt((1 - p_y)^2 + sum_{j != y} p_j^2) keeps full
precision as p_y -> 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidTokenError, InvalidValueError, ShapeError

# Logprobs a little above 0 or probabilities summing a little above 1 are rounding, not
# bad input: they are clipped within this slack and refused beyond it.
_SLACK = 1e-3


@dataclass(frozen=True)
class TopKStats:
    """Per-token bounds of the entropy (nats) and grad_norm implied by top-k logprobs."""

    entropy_lower: np.ndarray
    entropy_upper: np.ndarray
    grad_norm_lower: np.ndarray
    grad_norm_upper: np.ndarray

    def estimate(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """(entropy, grad_norm) under ``concentrated_tail`` or ``uniform_tail``."""
        if which == "concentrated_tail":
            return self.entropy_lower, self.grad_norm_upper
        return self.entropy_upper, self.grad_norm_lower


def _plogp(p: np.ndarray, logp: np.ndarray) -> np.ndarray:
    return np.where(p > 0, p * logp, 0.0)


def top_k_stats(top_logprobs: Any, top_token_ids: Any, logprob: Any, token_ids: Any, vocab_size: int) -> TopKStats:
    """Bounds of H and G per token from [T, k] top logprobs and ids, the [T] logprob and id
    of each emitted token, and the vocabulary size."""
    top = np.asarray(top_logprobs, dtype=np.float64)
    top_ids = np.asarray(top_token_ids)
    lp = np.asarray(logprob, dtype=np.float64)
    ids = np.asarray(token_ids)
    if top.ndim != 2 or top_ids.shape != top.shape:
        raise ShapeError(f"top_logprobs and top_token_ids must both be [T, k], got {top.shape} and {top_ids.shape}")
    t, k = top.shape
    if lp.shape != (t,) or ids.shape != (t,):
        raise ShapeError(f"logprob and token_ids must be [{t}], got {lp.shape} and {ids.shape}")
    if k == 0:
        raise ShapeError("top_logprobs must hold at least one logprob per token (k >= 1)")
    for name, values in (("top_logprobs", top), ("logprob", lp)):
        bad = np.flatnonzero(~((values <= _SLACK) | np.isneginf(values)).reshape(t, -1 if t else 0).all(axis=1))
        if len(bad):
            raise InvalidValueError(
                f"{name} of token {bad[0]} is not a logprob (finite <= 0 or -inf): {values[bad[0]]}",
                field=name,
                index=int(bad[0]),
            )
    for name, values in (("top_token_ids", top_ids), ("token_ids", ids)):
        bad = np.flatnonzero(((values < 0) | (values >= vocab_size)).reshape(t, -1 if t else 0).any(axis=1))
        if len(bad):
            raise InvalidTokenError(
                f"{name} of token {bad[0]} lies outside the vocabulary [0, {vocab_size})", field=name, index=int(bad[0])
            )
    top = np.minimum(top, 0.0)
    lp = np.minimum(lp, 0.0)
    p_top = np.exp(top)
    p_y = np.exp(lp)
    is_y = top_ids == ids[:, None]
    in_top = is_y.any(axis=1)
    q = p_top.min(axis=1)

    mass = p_top.sum(axis=1)
    bad = np.flatnonzero(mass > 1 + _SLACK)
    if len(bad):
        raise InvalidValueError(
            f"top_logprobs of token {bad[0]} add up to probability {mass[bad[0]]:.6f} > 1", field="top_logprobs", index=int(bad[0])
        )
    bad = np.flatnonzero(~in_top & (p_y > q * (1 + _SLACK) + 1e-12))
    if len(bad):
        raise InvalidValueError(
            f"token {bad[0]} is not among its top-k ids, yet its logprob {lp[bad[0]]:.6g} exceeds the smallest top-k "
            f"logprob {np.log(q[bad[0]]):.6g}",
            field="logprob",
            index=int(bad[0]),
        )
    unseen = vocab_size - k - np.where(in_top, 0, 1)
    if np.any(unseen < 0):
        raise ShapeError(f"vocab_size {vocab_size} is smaller than the {k} top-k tokens plus the emitted token")

    # The tail after the top-k and (when outside it) the emitted token.
    tail_y = np.where(in_top, 0.0, p_y)
    rest = np.clip(1.0 - mass - tail_y, 0.0, None)
    n = np.maximum(unseen, 1)
    ln_q = np.log(np.maximum(q, np.finfo(np.float64).tiny))
    with np.errstate(divide="ignore", invalid="ignore"):
        h_seen = -_plogp(p_top, top).sum(axis=1) - _plogp(tail_y, lp)
        h_lower = h_seen - rest * ln_q
        h_upper = h_seen - _plogp(rest, np.log(rest / n))
    # sum_{j != y} p_j^2: the top-k without the emitted token, then the tail's range.
    seen_sq = np.where(is_y, 0.0, p_top**2).sum(axis=1)
    g_lower = np.sqrt((1.0 - p_y) ** 2 + seen_sq + rest**2 / n)
    g_upper = np.sqrt((1.0 - p_y) ** 2 + seen_sq + rest * q)
    return TopKStats(
        entropy_lower=np.maximum(h_lower, 0.0),
        entropy_upper=np.maximum(h_upper, h_lower),
        grad_norm_lower=g_lower,
        grad_norm_upper=np.maximum(g_upper, g_lower),
    )
