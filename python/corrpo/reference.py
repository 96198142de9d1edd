"""A plain float64 NumPy implementation of corrpo's functions, written from the
definitions: the oracle the tests hold the native core to. Slow and memory-hungry
(it materializes softmax(z) in float64); not for production use.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ConfigError, InvalidLogitsError, InvalidTokenError, InvalidValueError, ShapeError


def _as_f64(logits: Any) -> np.ndarray:
    if type(logits).__module__.split(".")[0] == "torch":
        logits = logits.detach().cpu().float().numpy()
    return np.asarray(logits).astype(np.float64)


def token_stats(logits: Any, token_ids: Any, *, temperature: float = 1.0, hidden_norms: Any = None) -> dict:
    """entropy, logprob, collision, grad_norm (and head_grad_norm) as float64 arrays."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature}")
    z = _as_f64(logits)
    ids = np.asarray(token_ids, dtype=np.int64)
    rows, vocab = z.shape
    if ids.shape != (rows,):
        raise ShapeError(f"{ids.shape[0]} token ids for {rows} rows of logits")
    for r in range(rows):
        bad = np.flatnonzero(np.isnan(z[r]) | (z[r] == np.inf))
        if bad.size:
            raise InvalidLogitsError(f"row {r}: vocabulary index {bad[0]} is {z[r, bad[0]]}", row=r)
        if np.all(z[r] == -np.inf):
            raise InvalidLogitsError(f"row {r}: every entry is -inf", row=r)
        if not 0 <= ids[r] < vocab:
            raise InvalidTokenError(f"row {r}: token {ids[r]} outside [0, {vocab})", row=r)
        if z[r, ids[r]] == -np.inf:
            raise InvalidTokenError(f"row {r}: the logit of token {ids[r]} is -inf", row=r)
    z = z / temperature
    m = z.max(axis=1, keepdims=True) if rows else np.zeros((0, 1))
    lse = m + np.log(np.exp(z - m).sum(axis=1, keepdims=True))
    logp = z - lse
    p = np.exp(logp)
    plogp = np.where(p > 0, p * np.where(p > 0, logp, 0.0), 0.0)
    onehot = np.zeros_like(p)
    onehot[np.arange(rows), ids] = 1.0
    out = {
        "entropy": -plogp.sum(axis=1),
        "logprob": logp[np.arange(rows), ids],
        "collision": (p * p).sum(axis=1),
        "grad_norm": np.sqrt(((p - onehot) ** 2).sum(axis=1)),
    }
    if hidden_norms is not None:
        out["head_grad_norm"] = out["grad_norm"] * np.asarray(hidden_norms, dtype=np.float64)
    return out


def average_ranks(x: Any) -> np.ndarray:
    """1-based ranks; ties share the mean of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2
    return ranks


def correlation_with_reason(x: Any, y: Any, method: str = "spearman", min_len: int = 2) -> tuple[float, str | None]:
    """(rho, None), or (NaN, reason) when undefined."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y):
        raise ShapeError(f"x has {len(x)} values but y has {len(y)}")
    for name, v in (("x", x), ("y", y)):
        if not np.all(np.isfinite(v)):
            raise InvalidValueError(f"{name} holds a non-finite value", field=name)
    if method not in ("spearman", "pearson"):
        raise ConfigError(f"unknown method {method!r}")
    if len(x) < max(min_len, 2):
        return float("nan"), "too_few_tokens"
    if np.all(x == x[0]):
        return float("nan"), "constant_entropy"
    if np.all(y == y[0]):
        return float("nan"), "constant_grad_norm"
    if method == "spearman":
        x, y = average_ranks(x), average_ranks(y)
    dx, dy = x - x.mean(), y - y.mean()
    rho = (dx @ dy) / np.sqrt((dx @ dx) * (dy @ dy))
    return float(np.clip(rho, -1.0, 1.0)), None


def correlation(x: Any, y: Any, *, method: str = "spearman") -> float:
    return correlation_with_reason(x, y, method)[0]


def _spans(lengths: Any, total: int) -> list[slice]:
    lengths = [int(n) for n in lengths]
    if any(n < 0 for n in lengths) or sum(lengths) != total:
        raise ShapeError(f"rollout lengths {lengths} do not partition {total} tokens")
    bounds = np.r_[0, np.cumsum(lengths)].astype(int)
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def rollout_correlations(
    entropy: Any, grad_norm: Any, lengths: Any, *, method: str = "spearman", min_tokens: int = 8
) -> dict:
    """rho (NaN where undefined), n_tokens and reasons per rollout."""
    h, g = np.asarray(entropy, dtype=np.float64), np.asarray(grad_norm, dtype=np.float64)
    results = [correlation_with_reason(h[s], g[s], method, min_tokens) for s in _spans(lengths, len(h))]
    return {
        "rho": np.array([r for r, _ in results], dtype=np.float64),
        "n_tokens": np.array([int(n) for n in lengths], dtype=np.int64),
        "reasons": [why for _, why in results],
    }


def fingerprint(
    entropy: Any,
    grad_norm: Any,
    token_ids: Any = None,
    lengths: Any = None,
    *,
    method: str = "spearman",
    min_tokens: int = 8,
) -> dict:
    """The batch figures of SPEC 4 under the same names as ``corrpo.Fingerprint``."""
    h, g = np.asarray(entropy, dtype=np.float64), np.asarray(grad_norm, dtype=np.float64)
    pooled, pooled_reason = correlation_with_reason(h, g, method, min_tokens)
    out = {
        "method": method,
        "n_tokens": len(h),
        "rho_pooled": pooled,
        "rho_pooled_reason": pooled_reason,
        "n_unique_tokens": None,
        "rho_unique": None,
        "rho_unique_reason": None,
        "n_rollouts": None,
        "n_rollouts_defined": None,
        "rho_rollout_mean": None,
        "entropy_mean": float(h.mean()) if len(h) else float("nan"),
        "strength_mean": float(g.mean()) if len(g) else float("nan"),
    }
    if token_ids is not None:
        ids = np.asarray(token_ids, dtype=np.int64)
        unique, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
        mean_h = np.bincount(inverse, weights=h) / counts
        mean_g = np.bincount(inverse, weights=g) / counts
        out["n_unique_tokens"] = len(unique)
        out["rho_unique"], out["rho_unique_reason"] = correlation_with_reason(mean_h, mean_g, method, min_tokens)
    if lengths is not None:
        rho = rollout_correlations(h, g, lengths, method=method, min_tokens=min_tokens)["rho"]
        defined = rho[~np.isnan(rho)]
        out["n_rollouts"] = len(rho)
        out["n_rollouts_defined"] = len(defined)
        out["rho_rollout_mean"] = float(defined.mean()) if len(defined) else float("nan")
    return out


def regularize(
    rewards: Any,
    rho: Any,
    group_sizes: Any,
    *,
    coef: float = 0.1,
    gate: str = "none",
    threshold: float = 1.0,
    advantage: str = "grpo",
) -> dict:
    """rewards, advantages, applied and rho_undefined, as float64 / bool arrays."""
    rho = np.asarray(rho, dtype=np.float64)
    r = np.zeros_like(rho) if rewards is None else np.asarray(rewards, dtype=np.float64)
    if gate == "correct" and rewards is None:
        raise ConfigError("gate 'correct' needs rewards")
    undefined = np.isnan(rho)
    applied = ~undefined & (coef != 0)
    if gate == "correct":
        applied &= r >= threshold
    out = np.where(applied, r - coef * np.nan_to_num(rho), r)
    advantages = np.empty_like(out)
    for s in _spans(group_sizes, len(out)):
        group = out[s]
        if advantage == "none":
            advantages[s] = group
        elif len(group) == 1:
            advantages[s] = 0.0
        elif advantage == "drgrpo":
            advantages[s] = group - group.mean()
        else:
            advantages[s] = (group - group.mean()) / (group.std(ddof=1) + 1e-6)
    return {"rewards": out, "advantages": advantages, "applied": applied, "rho_undefined": undefined}
