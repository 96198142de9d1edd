"""Entropy-gradient correlations: per rollout, and the batch fingerprint (SPEC 4)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _native
from ._arrays import count, vector

#: Reasons a correlation is undefined, as reported beside its NaN.
REASONS = ("too_few_tokens", "constant_entropy", "constant_grad_norm")


def correlation(x: Any, y: Any, *, method: str = "spearman") -> float:
    """Correlation of two equally long samples: ``spearman`` (Pearson of average ranks, as
    scipy.stats.spearmanr) or ``pearson``. NaN when a sample is constant or has fewer than
    two points."""
    xs = vector(x, np.float64, "x")
    ys = vector(y, np.float64, "y")
    return _native.correlation(xs, ys, method)[0]


@dataclass(frozen=True)
class RolloutCorrelations:
    """rho(entropy, grad_norm) per rollout.

    rho: float64, NaN where undefined. n_tokens: int64 token counts. reasons: None where
    rho is defined, else one of ``REASONS``.
    """

    rho: np.ndarray
    n_tokens: np.ndarray
    reasons: list[str | None]

    @property
    def defined(self) -> np.ndarray:
        return ~np.isnan(self.rho)

    def __len__(self) -> int:
        return len(self.rho)


def rollout_correlations(
    entropy: Any,
    grad_norm: Any,
    lengths: Any,
    *,
    method: str = "spearman",
    min_tokens: int = 8,
) -> RolloutCorrelations:
    """rho(entropy, grad_norm) for every rollout of a ragged batch.

    entropy, grad_norm: per-token values of all rollouts, concatenated (no padding).
    lengths: tokens per rollout, summing to the number of tokens.
    min_tokens: fewer tokens (or a constant entropy or grad_norm) leaves rho undefined:
        NaN with a reason, never 0 and never an error.
    """
    h = vector(entropy, np.float64, "entropy")
    g = vector(grad_norm, np.float64, "grad_norm", len(h))
    spans = vector(lengths, np.int64, "lengths")
    rho, n, reasons = _native.rollout_correlations(h, g, spans, method, count(min_tokens, "min_tokens", 2))
    return RolloutCorrelations(rho=rho, n_tokens=n, reasons=reasons)


@dataclass(frozen=True)
class Fingerprint:
    """Batch-level figures of the entropy-gradient inversion, for tracking over training.

    rho_pooled: rho over every token of the batch.
    rho_unique: rho over distinct token ids of their mean entropy and mean grad_norm (the
        paper's view); None without token ids.
    rho_rollout_mean: mean of the defined per-rollout rho; None without lengths.
    entropy_mean, strength_mean: the means of H and of the strength S over the batch (of
        whichever measure the scores are of: logit_grad's G, or a parameter-space measure
        such as l1_mean).
    *_reason: why the figure beside it is NaN, else None.
    """

    method: str
    n_tokens: int
    rho_pooled: float
    rho_pooled_reason: str | None
    n_unique_tokens: int | None
    rho_unique: float | None
    rho_unique_reason: str | None
    n_rollouts: int | None
    n_rollouts_defined: int | None
    rho_rollout_mean: float | None
    entropy_mean: float
    strength_mean: float

    @property
    def grad_norm_mean(self) -> float:
        """Deprecated: ``strength_mean``, its name since it holds the mean of S, which is G
        (the logit gradient norm) only for the logit_grad measure."""
        warnings.warn(
            "Fingerprint.grad_norm_mean is deprecated: it is the mean of the strength S (the run's measure, e.g. "
            "l1_mean), not of G; read Fingerprint.strength_mean",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.strength_mean

    @property
    def entropy_mean_bits(self) -> float:
        """Mean entropy in bits, the unit the paper reports."""
        return self.entropy_mean / math.log(2)


def fingerprint(
    entropy: Any,
    grad_norm: Any,
    token_ids: Any = None,
    lengths: Any = None,
    *,
    method: str = "spearman",
    min_tokens: int = 8,
) -> Fingerprint:
    """The batch fingerprint: pooled rho, rho over distinct token ids (with ``token_ids``),
    the mean per-rollout rho (with ``lengths``), and the means of entropy and grad_norm
    (``strength_mean``)."""
    h = vector(entropy, np.float64, "entropy")
    g = vector(grad_norm, np.float64, "grad_norm", len(h))
    ids = None if token_ids is None else vector(token_ids, np.int64, "token_ids", len(h))
    spans = None if lengths is None else vector(lengths, np.int64, "lengths")
    figures = _native.fingerprint(h, g, ids, spans, method, count(min_tokens, "min_tokens", 2))
    # The native core keeps the wire's name (proto field grad_norm_mean) for this figure.
    figures["strength_mean"] = figures.pop("grad_norm_mean")
    return Fingerprint(**figures)
