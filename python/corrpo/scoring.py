"""One call from per-token statistics to CorR-PO rewards: what the reward server does with
every request, available in-process."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._arrays import count, real, vector
from .correlation import Fingerprint, fingerprint, rollout_correlations
from .errors import ConfigError
from .rewards import regularize

METHODS = ("spearman", "pearson")
GATES = ("none", "correct")
ADVANTAGES = ("grpo", "drgrpo", "none")
TOP_K_ESTIMATES = ("concentrated_tail", "uniform_tail")


@dataclass(frozen=True)
class ScoreConfig:
    """Every setting of a scoring request, with the defaults of SPEC 4-5.

    top_k_estimate: for top-k payloads, which bound stands in for the exact H and G
        (``concentrated_tail``: lowest entropy, highest G; ``uniform_tail``: the opposite).
    """

    method: str = "spearman"
    min_tokens: int = 8
    temperature: float = 1.0
    coef: float = 0.1
    gate: str = "none"
    threshold: float = 1.0
    advantage: str = "grpo"
    top_k_estimate: str = "concentrated_tail"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("method", METHODS),
            ("gate", GATES),
            ("advantage", ADVANTAGES),
            ("top_k_estimate", TOP_K_ESTIMATES),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}", field=name)
        count(self.min_tokens, "min_tokens", 2)
        for name in ("temperature", "coef", "threshold"):
            if not math.isfinite(real(getattr(self, name), name)):
                raise ConfigError(f"{name} must be finite, got {getattr(self, name)!r}", field=name)
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}", field="temperature")


@dataclass(frozen=True)
class TopKBounds:
    """Per-rollout means of the bounds of H and G, for rollouts scored from top-k logprobs
    (NaN for the other rollouts of a request)."""

    entropy_mean_lower: np.ndarray
    entropy_mean_upper: np.ndarray
    grad_norm_mean_lower: np.ndarray
    grad_norm_mean_upper: np.ndarray


@dataclass(frozen=True)
class Scores:
    """CorR-PO scores of a batch of rollouts, one entry per rollout in request order.

    rho: rho(H, G) per rollout, NaN where undefined, with ``reasons`` saying why.
    rewards: r~ = r - coef * rho where the term applied (``regularized``), else r.
    advantages: per-group advantages of ``rewards``.
    n_tokens, entropy_mean, grad_norm_mean: per rollout (means are NaN for empty rollouts).
    group_sizes: rollouts per group, in order.
    fingerprint: the batch's figures, pooled and over distinct token ids.
    config: the settings used.
    request_id, backend: set on scores that came from a reward server.
    top_k: bounds of H and G for rollouts scored from top-k logprobs.
    """

    rho: np.ndarray
    reasons: list[str | None]
    rewards: np.ndarray
    advantages: np.ndarray
    regularized: np.ndarray
    n_tokens: np.ndarray
    entropy_mean: np.ndarray
    grad_norm_mean: np.ndarray
    group_sizes: np.ndarray
    fingerprint: Fingerprint
    config: ScoreConfig
    request_id: str | None = None
    backend: str | None = None
    top_k: TopKBounds | None = None

    def __len__(self) -> int:
        return len(self.rho)

    def groups(self) -> list[slice]:
        """The slice of every group in the per-rollout arrays."""
        ends = np.cumsum(self.group_sizes)
        return [slice(int(e - n), int(e)) for e, n in zip(ends, self.group_sizes)]


def _rollout_means(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Mean of ``values`` over each rollout of a ragged batch; NaN for an empty rollout."""
    owner = np.repeat(np.arange(len(lengths)), lengths)
    sums = np.bincount(owner, weights=values, minlength=len(lengths))
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / lengths


def score(
    entropy: Any,
    grad_norm: Any,
    lengths: Any,
    group_sizes: Any,
    *,
    rewards: Any = None,
    token_ids: Any = None,
    config: ScoreConfig | None = None,
    top_k: TopKBounds | None = None,
) -> Scores:
    """rho per rollout, CorR-PO rewards and advantages, and the batch fingerprint, from the
    per-token entropy and grad_norm of a ragged batch.

    entropy, grad_norm: [T] values of all rollouts concatenated; lengths: tokens per
    rollout; group_sizes: rollouts per group; rewards: per rollout, or None (verifier-free);
    token_ids: optional [T] emitted ids, for the fingerprint over distinct tokens.
    """
    config = config or ScoreConfig()
    h = vector(entropy, np.float64, "entropy")
    g = vector(grad_norm, np.float64, "grad_norm", len(h))
    spans = vector(lengths, np.int64, "lengths")
    sizes = vector(group_sizes, np.int64, "group_sizes")
    rc = rollout_correlations(h, g, spans, method=config.method, min_tokens=config.min_tokens)
    out = regularize(
        rewards,
        rc.rho,
        sizes,
        coef=config.coef,
        gate=config.gate,
        threshold=config.threshold,
        advantage=config.advantage,
    )
    # The per-rollout figures of the fingerprint come from rc rather than a second pass.
    fp = fingerprint(h, g, token_ids, method=config.method, min_tokens=config.min_tokens)
    defined = rc.rho[rc.defined]
    fp = dataclasses.replace(
        fp,
        n_rollouts=len(rc),
        n_rollouts_defined=len(defined),
        rho_rollout_mean=float(defined.mean()) if len(defined) else math.nan,
    )
    return Scores(
        rho=rc.rho,
        reasons=rc.reasons,
        rewards=out.rewards,
        advantages=out.advantages,
        regularized=out.applied,
        n_tokens=rc.n_tokens,
        entropy_mean=_rollout_means(h, spans),
        grad_norm_mean=_rollout_means(g, spans),
        group_sizes=sizes,
        fingerprint=fp,
        config=config,
        top_k=top_k,
    )
