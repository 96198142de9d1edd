"""Each scored token's seed, and the logit-space statistics that come with it.

Token t is predicted from row t-1 of the LM head's input h. Its seed is the target logit
``z_y = head(h)[y]`` (objective "logit", the paper's) or ``log softmax(head(h))[y]``
("logprob"), with the model's final logit soft-capping when it has one. Only the seed's
own row of h feeds it, so its cotangent on h is one row, computed here for all seeds at
once by one small backward through the head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .architecture import Architecture, ArchitectureError


@dataclass
class RowStats:
    """Per scored token: entropy (bits), G = ||p - e_y||, ||h||, and d seed / d h [S, d]."""

    entropy_bits: torch.Tensor
    logit_grad: torch.Tensor
    hidden_norm: torch.Tensor
    cotangent: torch.Tensor


def _logits(arch: Architecture, h: torch.Tensor) -> torch.Tensor:
    z = arch.head(h)
    if arch.softcap:
        z = torch.tanh(z / arch.softcap) * arch.softcap
    return z


def seed_values(z: torch.Tensor, targets: torch.Tensor, objective: str) -> torch.Tensor:
    """The seeds of rows of logits ``z`` [S, V] for their ``targets`` [S]."""
    if objective == "logprob":
        z = torch.log_softmax(z, dim=-1)
    return z.gather(1, targets[:, None])[:, 0]


def row_stats(
    arch: Architecture, h: torch.Tensor, model_logits: torch.Tensor, targets: torch.Tensor, objective: str
) -> RowStats:
    """``h`` [S, d]: the head's input at the seeds' rows; ``model_logits`` [S, V]: the model's
    own logits there, which the recomputation must reproduce (else the seed would not be
    the model's logit: a head this module does not understand)."""
    with torch.enable_grad():
        hd = h.detach().requires_grad_()
        z = _logits(arch, hd)
        (cot,) = torch.autograd.grad(seed_values(z, targets, objective).sum(), hd)
    z = z.detach()
    scale = model_logits.detach().abs().amax().clamp(min=1.0)
    tol = 1e-3 if z.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if z.shape != model_logits.shape or (z - model_logits).abs().amax() > tol * scale:
        raise ArchitectureError(
            "the model's logits are not its LM head applied to the head's input "
            f"(max difference {float((z - model_logits).abs().amax()):.3g}); corrpo cannot seed its target logits"
        )
    z64 = model_logits.detach().double()
    logp = torch.log_softmax(z64, dim=-1)
    p = logp.exp()
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(dim=-1) / math.log(2)
    # ||p - e_y||^2 = (1 - p_y)^2 + sum_{j != y} p_j^2, with 1 - p_y summed from the other
    # entries: no cancellation when p_y is close to 1.
    others = p.scatter(1, targets[:, None], 0.0)
    grad = (others.sum(dim=-1).square() + others.square().sum(dim=-1)).sqrt()
    return RowStats(entropy, grad, hd.detach().double().norm(dim=-1), cot)
