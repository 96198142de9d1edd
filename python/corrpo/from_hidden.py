"""Token statistics from final hidden states and the LM-head weight, for trainers that
never want the [T, V] logits in memory."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from . import _cpu, _triton
from ._arrays import is_torch, lengths_vector, real, vector
from .errors import ConfigError, ShapeError
from .stats import TokenStats, uses_triton

# Logits the CPU path holds at once (float32), whatever T is.
_CHUNK_BYTES = 64 << 20


def token_stats_from_hidden(
    hidden: Any,
    lm_head_weight: Any,
    token_ids: Any,
    *,
    temperature: float = 1.0,
    lengths: Any = None,
    backend: str = "auto",
) -> TokenStats:
    """The statistics of ``token_stats`` for the logits ``hidden @ lm_head_weight.T``,
    formed with float32 accumulation and never held whole, plus ``head_grad_norm``
    = G * ||h||, the nuclear norm of each token's LM-head weight gradient (p - e_y) h^T.

    hidden: [T, d] final hidden states (after the last norm), torch float32, float16 or
        bfloat16 (float64 is read as float32). lm_head_weight: [V, d], the same dtype and device (a slice such as
        ``weight[:vocab]`` drops padded vocabulary rows without a copy).
    token_ids: [T] ids of the emitted tokens; temperature, lengths: as in token_stats.
    backend: "auto" runs CUDA tensors through the fused Triton kernel (vocabulary tiles,
        online moments, memory O(T)); CPU tensors go through the native core in row chunks
        of at most 64 MiB of float32 logits (holding a float32 copy of a half-precision
        weight). "cpu" or "triton" force one, as in token_stats.

    Forward only: no gradient flows back to hidden or the weight. Needs torch (the rest of
    corrpo's in-process API needs only NumPy).
    """
    try:
        import torch
    except ImportError:
        raise ImportError(
            "corrpo.token_stats_from_hidden takes torch tensors and needs torch: pip install '.[torch]' in the corrpo checkout "
            "(token_stats, score and the rest of corrpo's in-process API need only NumPy)"
        ) from None
    rows = _check(hidden, lm_head_weight)
    hidden, weight = hidden.detach(), lm_head_weight.detach()
    if hidden.dtype == torch.float64:  # as for logits: read as float32
        hidden, weight = hidden.float(), weight.float()
    if uses_triton(hidden, backend):
        reduce = partial(_triton.token_stats_from_hidden, *_triton.stage_hidden(hidden, weight))
    elif hidden.device.type != "cpu":
        raise ConfigError(f"backend 'cpu' reads CPU memory, but the tensors are on {hidden.device}; pass tensor.cpu()")
    else:
        reduce = partial(_cpu.token_stats_from_hidden, hidden, weight, chunk_bytes=_CHUNK_BYTES)
    ids = vector(token_ids, np.int64, "token_ids", rows)
    spans = None if lengths is None else lengths_vector(lengths, rows, "hidden")
    return TokenStats(*reduce(ids, real(temperature, "temperature"), spans))


def _check(hidden: Any, weight: Any) -> int:
    """T of a valid pair of hidden states and LM-head weight."""
    for name, x in (("hidden", hidden), ("lm_head_weight", weight)):
        if not is_torch(x):
            raise ConfigError(f"{name} must be a torch tensor, got {type(x).__name__}")
    import torch

    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ShapeError(
            f"hidden [T, d] and lm_head_weight [V, d] must be 2-D and share d, got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}; flatten [batch, time, d] hidden states with .reshape(-1, d)"
        )
    if weight.shape[0] == 0:
        raise ShapeError("lm_head_weight has a vocabulary of size 0")
    floats = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    if hidden.dtype not in floats or weight.dtype != hidden.dtype:
        raise ConfigError(
            f"hidden and lm_head_weight must share one float dtype, got {hidden.dtype} and {weight.dtype}; "
            "cast one with .to(dtype)"
        )
    if hidden.device != weight.device:
        raise ConfigError(f"hidden is on {hidden.device}, but lm_head_weight is on {weight.device}")
    return hidden.shape[0]
