"""The paper's gradient strength: per-token parameter-space gradients (SPEC 3).

    from corrpo.gradients import token_strengths
    out = token_strengths(model, input_ids)        # any Hugging Face causal LM
    out.entropy_bits, out.l1_mean, out.nuclear_qkvo

Needs torch and transformers (``pip install '.[gradients]' in the corrpo checkout``); ``import corrpo`` does
not import this package.
"""

from .architecture import ArchitectureError
from ..measures import MEASURES, OBJECTIVES
from .result import ESTIMATORS, TokenStrengths
from .strengths import check_settings, measured_strengths, response_strengths, token_strengths

__all__ = [
    "ESTIMATORS",
    "MEASURES",
    "OBJECTIVES",
    "ArchitectureError",
    "TokenStrengths",
    "check_settings",
    "measured_strengths",
    "response_strengths",
    "token_strengths",
]
