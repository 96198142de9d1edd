"""corrpo: Entropy-Gradient Inversion measurement and CorR-PO rewards for RL on LLMs.

In-process API (the native core, GIL released, SIMD and multi-threaded; CUDA tensors go
to the Triton kernels of corrpo-kernels):

    stats = corrpo.token_stats(logits, token_ids)            # per-token H, logprob, c, G
    stats = corrpo.token_stats_from_hidden(hidden, lm_head.weight, token_ids)  # no [T, V] logits
    rc = corrpo.rollout_correlations(stats.entropy, stats.grad_norm, lengths)
    out = corrpo.regularize(rewards, rc.rho, group_sizes)    # CorR-PO rewards, advantages
    fp = corrpo.fingerprint(stats.entropy, stats.grad_norm, token_ids, lengths)
    scores = corrpo.score(stats.entropy, stats.grad_norm, lengths, group_sizes, rewards=r)  # all of the above

``corrpo.client.RewardClient`` sends the same work to a reward server (``corrpo-server``).

``corrpo.reference`` holds a float64 NumPy implementation of the same functions.
"""

from . import reference
from ._native import __version__, simd_isa, supported_isas
from .correlation import REASONS, Fingerprint, RolloutCorrelations, correlation, fingerprint, rollout_correlations
from .errors import (
    ConfigError,
    CorrpoError,
    InvalidLogitsError,
    InvalidTokenError,
    InvalidValueError,
    ShapeError,
)
from .from_hidden import token_stats_from_hidden
from .rewards import Regularized, regularize
from .scoring import ScoreConfig, Scores, TopKBounds, score
from .stats import TokenStats, token_stats
from .stats import check_simd_env as _check_simd_env
from .top_k import TopKStats, top_k_stats

_check_simd_env()

__all__ = [
    "__version__",
    "REASONS",
    "ConfigError",
    "CorrpoError",
    "Fingerprint",
    "InvalidLogitsError",
    "InvalidTokenError",
    "InvalidValueError",
    "Regularized",
    "RolloutCorrelations",
    "ScoreConfig",
    "Scores",
    "ShapeError",
    "TokenStats",
    "TopKBounds",
    "TopKStats",
    "correlation",
    "fingerprint",
    "reference",
    "regularize",
    "rollout_correlations",
    "score",
    "simd_isa",
    "supported_isas",
    "token_stats",
    "token_stats_from_hidden",
    "top_k_stats",
]
