"""What both kernels share on the host side: argument checks and the result buffers."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from . import online

LOGITS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Names of the fault codes of corrpo_kernels.online, by code.
FAULTS = {
    code.value: name.lower()
    for name, code in vars(online).items()
    if name in ("OK", "NON_FINITE", "ALL_NEG_INF", "TOKEN_OUT_OF_RANGE", "IMPOSSIBLE_TOKEN")
}


class KernelStats(NamedTuple):
    """Results on the device: stats [4, T] float32 (entropy, logprob, collision, grad_norm;
    NaN in faulty rows) and fault [T] int8 (0 = ok, else a key of FAULTS)."""

    stats: torch.Tensor
    fault: torch.Tensor

    @property
    def entropy(self) -> torch.Tensor:
        return self.stats[0]

    @property
    def logprob(self) -> torch.Tensor:
        return self.stats[1]

    @property
    def collision(self) -> torch.Tensor:
        return self.stats[2]

    @property
    def grad_norm(self) -> torch.Tensor:
        return self.stats[3]

    def fault_name(self, row: int) -> str:
        return FAULTS[int(self.fault[row])]


def empty_results(rows: int, device: torch.device) -> KernelStats:
    return KernelStats(
        torch.empty((4, rows), dtype=torch.float32, device=device),
        torch.empty(rows, dtype=torch.int8, device=device),
    )


def inverse_temperature(temperature: float) -> float:
    """1/tau as the float32 the kernels multiply by; the same domain as the native core."""
    valid = temperature > 0 and math.isfinite(temperature)
    inv = 1.0 / temperature if valid else math.nan
    if not (valid and inv <= float(np.finfo(np.float32).max) and np.float32(inv) > 0):
        raise ValueError(
            f"temperature must be a finite number > 0 whose inverse is a finite float32, got {temperature}"
        )
    return float(np.float32(inv))


def check_logits(logits: torch.Tensor) -> None:
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [tokens, vocab] with vocab > 0, got shape {tuple(logits.shape)}")
    if logits.shape[0] and logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits rows must be unit-stride, got strides {logits.stride()}")


def check_ids(token_ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """token_ids as a contiguous int64 vector matching the rows of `like`."""
    if token_ids.dim() != 1 or token_ids.shape[0] != like.shape[0]:
        raise ValueError(f"token_ids must be [{like.shape[0]}], got shape {tuple(token_ids.shape)}")
    if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
        raise TypeError(f"token_ids must hold integers, got {token_ids.dtype}")
    if token_ids.device != like.device:
        raise ValueError(f"token_ids are on {token_ids.device}, but the logits are on {like.device}")
    return token_ids.to(torch.int64).contiguous()
