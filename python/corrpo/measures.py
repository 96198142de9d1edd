"""The names of the strength measures, their estimators and objectives (SPEC 3), and which
combinations each payload can give. Torch-free: the client, the server and
``corrpo.gradients`` read the same tables."""

from __future__ import annotations

#: The seed of each token's backward: the target logit (the paper's) or its log-prob.
OBJECTIVES = ("logit", "logprob")

#: Parameter-space measures (one backward per token) and the cheap logit-space ones.
PARAMETER_MEASURES = ("l1_mean", "nuclear_qkvo", "frobenius")
LOGIT_MEASURES = ("logit_grad", "head_logit_grad")
MEASURES = PARAMETER_MEASURES + LOGIT_MEASURES

#: How a request's strength values were obtained. ``top_k`` is the bound of G that a top-k
#: payload allows (``ScoreConfig.top_k_estimate`` picks which).
ESTIMATORS = ("exact", "subsample", "jvp", "last_block", "local", "jvp_cv", "top_k")

#: The parameter-space measures each model-based estimator can give.
PRODUCES = {
    "exact": PARAMETER_MEASURES,
    "subsample": PARAMETER_MEASURES,
    "jvp": ("frobenius", "l1_mean"),
    "last_block": PARAMETER_MEASURES,
    "local": PARAMETER_MEASURES,
    "jvp_cv": ("frobenius",),
}

#: Default k of the estimators that take one: tokens per rollout, or random directions.
DEFAULT_K = {"subsample": 16, "jvp": 32, "jvp_cv": 8}

#: What a payload kind gives when a request names no measure or estimator. Tokens payloads
#: default to the paper's measure by ``local``: one forward and one backward (under one
#: training forward+backward on SmolLM2 and Gemma-3-270M), every token scored, its
#: per-rollout rho as close to exact's as subsample k=16's at a sixth of the cost
#: (docs/fingerprint.md, "Estimators").
PAYLOAD_DEFAULTS = {
    "stats": ("logit_grad", "exact"),
    "logits": ("logit_grad", "exact"),
    "top_k": ("logit_grad", "top_k"),
    "tokens": ("l1_mean", "local"),
}

#: Why a logit-space-only payload cannot give a parameter-space measure.
_LOGIT_ONLY = (
    "{kind} payloads give only the logit_grad measure; the paper's parameter-space measures need "
    "the model: send tokens to a server started with --model, or stats computed with corrpo.gradients"
)


def check_combination(kind: str, measure: str, estimator: str) -> str | None:
    """None when a payload of ``kind`` can give ``measure`` by ``estimator``, else why not."""
    if kind in ("logits", "top_k"):
        if measure != "logit_grad":
            return _LOGIT_ONLY.format(kind=kind.replace("_", "-"))
        wanted = PAYLOAD_DEFAULTS[kind][1]
        if estimator != wanted:
            return f"{kind.replace('_', '-')} payloads give logit_grad by the {wanted!r} estimator, not {estimator!r}"
        return None
    if estimator == "top_k":
        return f"the 'top_k' estimator is for top-k payloads, not {kind}"
    if measure in LOGIT_MEASURES:
        if estimator != "exact":
            return f"{measure} is computed exactly from the logits; its estimator is 'exact', not {estimator!r}"
        return None
    if measure not in PRODUCES[estimator]:
        return f"estimator {estimator!r} cannot give {measure!r}; it gives {list(PRODUCES[estimator])}"
    return None
