"""One call from per-token statistics to CorR-PO rewards: what the reward server does with
every request, available in-process."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._arrays import count, group_sizes_vector, real, vector
from .correlation import Fingerprint, fingerprint, rollout_correlations
from .errors import ConfigError
from .measures import DEFAULT_K, ESTIMATORS, LOGIT_MEASURES, MEASURES, OBJECTIVES, PAYLOAD_DEFAULTS, check_combination
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
    measure: the strength S correlated with H (``corrpo.measures.MEASURES``): the paper's
        parameter-space ``l1_mean`` (also ``nuclear_qkvo``, ``frobenius``) or the logit-space
        ``logit_grad`` (G, not the paper's measure). None: the payload's default
        (``logit_grad``; ``l1_mean`` for tokens payloads).
    estimator: how S is obtained (``corrpo.measures.ESTIMATORS``); for stats, what produced
        the values sent. None: ``exact`` (``local`` for tokens, ``top_k`` for top-k).
    objective: ``logit`` (the paper's) or ``logprob``, the seed of each token's backward;
        parameter-space measures only. None: ``logit`` where it applies.
    estimator_k: tokens per rollout (subsample, default 16) or directions (jvp, default 32;
        jvp_cv, default 8).
    estimator_seed: seeds the draws of subsample and jvp.

    A config as sent names what it sets; ``resolve`` fills in what a payload gives, and the
    scores echo the resolved one.
    """

    method: str = "spearman"
    min_tokens: int = 8
    temperature: float = 1.0
    coef: float = 0.1
    gate: str = "none"
    threshold: float = 1.0
    advantage: str = "grpo"
    top_k_estimate: str = "concentrated_tail"
    measure: str | None = None
    estimator: str | None = None
    objective: str | None = None
    estimator_k: int | None = None
    estimator_seed: int = 0

    def __post_init__(self) -> None:
        for name, allowed in (
            ("method", METHODS),
            ("gate", GATES),
            ("advantage", ADVANTAGES),
            ("top_k_estimate", TOP_K_ESTIMATES),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}", field=name)
        for name, allowed in (("measure", MEASURES), ("estimator", ESTIMATORS), ("objective", OBJECTIVES)):
            if getattr(self, name) is not None and getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}", field=name)
        count(self.min_tokens, "min_tokens", 2)
        if self.estimator_k is not None:
            count(self.estimator_k, "estimator_k", 1)
        count(self.estimator_seed, "estimator_seed", 0)
        if self.estimator_seed >= 2**64:
            raise ConfigError(f"estimator_seed must be < 2**64, got {self.estimator_seed}", field="estimator_seed")
        for name in ("temperature", "coef", "threshold"):
            if not math.isfinite(real(getattr(self, name), name)):
                raise ConfigError(f"{name} must be finite, got {getattr(self, name)!r}", field=name)
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}", field="temperature")


    @property
    def resolved(self) -> bool:
        """Whether every strength setting is decided (as ``resolve`` leaves them)."""
        if self.measure is None or self.estimator is None:
            return False
        if self.objective is None and self.measure not in LOGIT_MEASURES:
            return False
        return self.estimator_k is not None or self.estimator not in DEFAULT_K

    def resolve(self, kinds: set[str] | frozenset[str]) -> ScoreConfig:
        """This config with every strength setting decided for a request whose rollouts
        carry the payload ``kinds`` (stats, logits, top_k, tokens): defaults filled in and
        the combination checked; a ConfigError says what cannot be given and why."""
        if "tokens" in kinds and len(kinds) > 1:
            raise ConfigError("tokens payloads cannot be mixed with other payload kinds in one request", field="groups")
        kinds = set(kinds) or {"stats"}
        # The kind whose defaults the echo reports: a request mixing logits or stats with
        # top-k rollouts reports top-k's (the bounded) estimator.
        primary = "tokens" if "tokens" in kinds else "top_k" if "top_k" in kinds else "stats"
        measure = self.measure or PAYLOAD_DEFAULTS[primary][0]

        def default_estimator(kind: str) -> str:
            if measure in LOGIT_MEASURES and kind in ("stats", "tokens"):
                return "exact"
            return PAYLOAD_DEFAULTS[kind][1]

        estimator = self.estimator or default_estimator(primary)
        for kind in sorted(kinds):
            why = check_combination(kind, measure, self.estimator or default_estimator(kind))
            if why:
                raise ConfigError(why, field="measure" if kind in ("logits", "top_k") else "estimator")
        objective = self.objective
        if measure in LOGIT_MEASURES:
            if objective is not None:
                raise ConfigError(
                    f"objective applies to parameter-space measures; {measure} is always of the log-prob's "
                    "gradient w.r.t. the logits: leave objective unset",
                    field="objective",
                )
        else:
            objective = objective or "logit"
        k = self.estimator_k
        if estimator in DEFAULT_K:
            k = k or DEFAULT_K[estimator]
        elif k is not None:
            raise ConfigError(f"estimator_k applies to the {', '.join(DEFAULT_K)} estimators, not {estimator!r}", field="estimator_k")
        return dataclasses.replace(self, measure=measure, estimator=estimator, objective=objective, estimator_k=k)


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

    rho: rho(H, S) per rollout (S of ``config.measure``), NaN where undefined, with
        ``reasons`` saying why.
    rewards: r~ = r - coef * rho where the term applied (``regularized``), else r.
    advantages: per-group advantages of ``rewards``.
    n_tokens, entropy_mean, grad_norm_mean: per rollout scored tokens, and the means of H
        and S over them (NaN for empty rollouts; S is G only for the logit_grad measure).
    group_sizes: rollouts per group, in order.
    fingerprint: the batch's figures, pooled and over distinct token ids.
    config: the settings used.
    request_id, backend: set on scores that came from a reward server.
    top_k: bounds of H and G for rollouts scored from top-k logprobs.
    logit_grad: when ``config.measure`` is not logit_grad and G was known for every token,
        the fingerprint of rho(H, G) beside ``fingerprint``, for comparison.
    weights_version: for tokens scored by a model-backed server, the weights that scored them.
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
    logit_grad: Fingerprint | None = None
    weights_version: str | None = None

    def __len__(self) -> int:
        return len(self.rho)

    def groups(self) -> list[slice]:
        """The slice of every group in the per-rollout arrays."""
        ends = np.cumsum(self.group_sizes)
        return [slice(int(e - n), int(e)) for e, n in zip(ends, self.group_sizes)]


#: Largest magnitude whose sums over any batch (fewer than 2**60 tokens) stay finite.
_SUM_SAFE = 2.0**960


def _rollout_means(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Mean of ``values`` over each rollout of a ragged batch; NaN for an empty rollout."""
    owner = np.repeat(np.arange(len(lengths)), lengths)
    # Values near the float64 limit would sum to inf: they are summed scaled by a power of
    # two (exact, so ordinary values, which are not scaled, keep the same bits).
    peak = float(np.abs(values).max()) if len(values) else 0.0
    exponent = int(np.frexp(peak)[1]) if peak > _SUM_SAFE else 0
    sums = np.bincount(owner, weights=np.ldexp(values, -exponent) if exponent else values, minlength=len(lengths))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.ldexp(sums / lengths, exponent) if exponent else sums / lengths


def score(
    entropy: Any,
    strength: Any,
    lengths: Any,
    group_sizes: Any,
    *,
    rewards: Any = None,
    token_ids: Any = None,
    config: ScoreConfig | None = None,
    top_k: TopKBounds | None = None,
    logit_grad: Any = None,
) -> Scores:
    """rho per rollout, CorR-PO rewards and advantages, and the batch fingerprint, from the
    per-token entropy and strength of a ragged batch.

    entropy, strength: [T] values of all rollouts concatenated: H (nats) and S of
    ``config.measure`` (by default logit_grad: G, ``token_stats(...).grad_norm``);
    lengths: tokens per rollout; group_sizes: rollouts per group (a sequence, or one int for
    equal groups); rewards: per rollout, or None (verifier-free); token_ids: optional [T]
    emitted ids, for the fingerprint over distinct tokens; logit_grad: optional [T] G when S
    is another measure, for the comparison fingerprint ``Scores.logit_grad``.
    """
    config = config or ScoreConfig()
    if not config.resolved:
        config = config.resolve({"stats"})
    h = vector(entropy, np.float64, "entropy")
    g = vector(strength, np.float64, "strength", len(h))
    spans = vector(lengths, np.int64, "lengths")
    sizes = group_sizes_vector(group_sizes, len(spans))
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
    compare = None
    if logit_grad is not None and config.measure != "logit_grad":
        lg = vector(logit_grad, np.float64, "logit_grad", len(h))
        compare = fingerprint(h, lg, token_ids, spans, method=config.method, min_tokens=config.min_tokens)
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
        logit_grad=compare,
    )
