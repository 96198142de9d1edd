"""What ``token_strengths`` returns, and the names of its settings (SPEC 3)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..measures import MEASURES

#: How ``token_strengths`` obtains the measures (see ``corrpo.gradients.estimators``):
#: "logit_grad" computes only the logit-space measures, from the logits.
ESTIMATORS = ("exact", "subsample", "jvp", "last_block", "local", "jvp_cv", "logit_grad")


@dataclass(frozen=True)
class TokenStrengths:
    """Per-token entropy and gradient strengths, in the order of the scored tokens (rows in
    order, positions ascending within a row).

    rows, positions, token_ids: int64 [N]; token ``token_ids[i] = input_ids[rows[i],
        positions[i]]``, predicted from position ``positions[i] - 1``.
    lengths: int64 [n_rows], scored tokens per row (for per-rollout correlations).
    entropy_bits: float64 [N], entropy of softmax(logits[t - 1]) in bits.
    l1_mean, nuclear_qkvo, frobenius, logit_grad, head_logit_grad: float64 [N] for the
        measures that were asked for, else None.
    per_block: measure -> float64 [N, n_blocks], the per-block terms behind ``l1_mean``
        (L1 of the block), ``nuclear_qkvo`` (sum over its q, k, v, o) and ``frobenius``
        (the block's squared Frobenius norm); for the blocks the estimator covers.
    block_names: module path of every block, e.g. ``model.layers.0``.
    """

    objective: str
    estimator: str
    measures: tuple[str, ...]
    rows: np.ndarray
    positions: np.ndarray
    token_ids: np.ndarray
    lengths: np.ndarray
    entropy_bits: np.ndarray
    l1_mean: np.ndarray | None = None
    nuclear_qkvo: np.ndarray | None = None
    frobenius: np.ndarray | None = None
    logit_grad: np.ndarray | None = None
    head_logit_grad: np.ndarray | None = None
    per_block: dict[str, np.ndarray] = field(default_factory=dict)
    block_names: tuple[str, ...] = ()

    def measure(self, name: str) -> np.ndarray:
        """The per-token values of one measure that was computed."""
        values = getattr(self, name, None) if name in MEASURES else None
        if values is None:
            raise KeyError(f"measure {name!r} was not computed; this result has {list(self.measures)}")
        return values

    def __len__(self) -> int:
        return len(self.positions)
