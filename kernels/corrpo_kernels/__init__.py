"""corrpo's Triton kernels: per-token entropy, logprob, collision and grad_norm (SPEC 2)
from [T, V] logits in one read, or straight from hidden states and the LM-head weight.

    from corrpo_kernels import token_stats, token_stats_from_hidden
    out = token_stats(logits, token_ids, temperature=1.0)    # KernelStats on the device
    out.entropy, out.grad_norm, out.fault                     # no host sync until read

Importable without a GPU; with ``TRITON_INTERPRET=1`` they run on CPU tensors through
Triton's interpreter (how CI tests them). Most users call ``corrpo.token_stats`` and
``corrpo.token_stats_from_hidden``, which validate input, dispatch here for CUDA tensors,
and raise corrpo's errors for faulty rows.
"""

from .from_hidden import token_stats_from_hidden
from .launch import FAULTS, KernelStats
from .from_logits import token_stats

__all__ = ["FAULTS", "KernelStats", "token_stats", "token_stats_from_hidden"]
