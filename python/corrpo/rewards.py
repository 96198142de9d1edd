"""CorR-PO regularized rewards and group advantages (SPEC 5)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _native
from ._arrays import group_sizes_vector, real, vector


@dataclass(frozen=True)
class Regularized:
    """The result of ``regularize``, with the settings that produced it.

    rewards: r - coef * rho where the term applied, else r (float64).
    advantages: per-group advantages of those rewards (float64).
    applied: where the correlation term changed the reward.
    rho_undefined: where rho was NaN and so contributed nothing.
    """

    rewards: np.ndarray
    advantages: np.ndarray
    applied: np.ndarray
    rho_undefined: np.ndarray
    coef: float
    gate: str
    threshold: float
    advantage: str


def regularize(
    rewards: Any,
    rho: Any,
    group_sizes: Any,
    *,
    coef: float = 0.1,
    gate: str = "none",
    threshold: float = 1.0,
    advantage: str = "grpo",
) -> Regularized:
    """CorR-PO: r~ = r - coef * rho per rollout, then advantages per group.

    rewards: external (verifier) rewards per rollout, or None for verifier-free training.
    rho: per-rollout correlations; NaN (undefined) contributes 0 and is flagged.
    group_sizes: rollouts per group (the samples of one prompt), in order; one int for
        equal groups.
    gate: ``none`` applies the term everywhere; ``correct`` only where reward >= threshold.
    advantage: ``grpo`` (r~ - mean) / (std + 1e-6) with the unbiased std, ``drgrpo``
        r~ - mean, or ``none`` (r~ itself). A group of one gets advantage 0 under grpo and
        drgrpo.
    """
    r = vector(rho, np.float64, "rho")
    ext = None if rewards is None else vector(rewards, np.float64, "rewards", len(r))
    sizes = group_sizes_vector(group_sizes, len(r))
    coef, threshold = real(coef, "coef"), real(threshold, "threshold")
    out_r, adv, applied, undefined = _native.regularize(ext, r, sizes, coef, gate, threshold, advantage)
    return Regularized(out_r, adv, applied, undefined, coef, gate, threshold, advantage)
