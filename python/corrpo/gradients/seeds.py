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

    def values(self) -> dict[str, torch.Tensor]:
        """The per-token values every estimator returns beside its strengths."""
        return {"entropy_bits": self.entropy_bits, "logit_grad": self.logit_grad, "hidden_norm": self.hidden_norm}


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
    arch: Architecture,
    h: torch.Tensor,
    model_logits: torch.Tensor,
    targets: torch.Tensor,
    objective: str,
    autocast: torch.dtype | None = None,
) -> RowStats:
    """``h`` [S, d]: the head's input at the seeds' rows; ``model_logits`` [S, V]: the model's
    own logits there, which the recomputation must reproduce (else the seed would not be
    the model's logit: a head this module does not understand). ``autocast``: the dtype
    torch.autocast ran the head in during the model's forward (``Capture.head_autocast``)."""
    with torch.enable_grad():
        hd = h.detach().requires_grad_()
        z = _logits(arch, hd)
        (cot,) = torch.autograd.grad(seed_values(z, targets, objective).sum(), hd)
    _check_head(arch, hd.detach(), z.detach(), model_logits.detach(), autocast)
    z64 = model_logits.detach().double()
    logp = torch.log_softmax(z64, dim=-1)
    p = logp.exp()
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(dim=-1) / math.log(2)
    # ||p - e_y||^2 = (1 - p_y)^2 + sum_{j != y} p_j^2, with 1 - p_y summed from the other
    # entries: no cancellation when p_y is close to 1.
    others = p.scatter(1, targets[:, None], 0.0)
    grad = (others.sum(dim=-1).square() + others.square().sum(dim=-1)).sqrt()
    return RowStats(entropy, grad, hd.detach().double().norm(dim=-1), cot)


_REDUCED = (torch.float16, torch.bfloat16)


def _check_head(arch: Architecture, h: torch.Tensor, z: torch.Tensor, model_logits: torch.Tensor, autocast: torch.dtype | None) -> None:
    """Raises unless ``model_logits`` is the head applied to ``h``, within the rounding of the
    precision the model's forward used (its weights' dtype, or the autocast dtype)."""
    if autocast is not None:
        # Recompute as the forward did, so only kernel-order differences remain.
        with torch.no_grad(), torch.autocast(h.device.type, dtype=autocast):
            z = _logits(arch, h)
    if z.shape != model_logits.shape:
        raise ArchitectureError(
            f"the model's logits have shape {tuple(model_logits.shape)}, its LM head gives {tuple(z.shape)} at the same rows; "
            "corrpo cannot seed its target logits"
        )
    diff = (z.float() - model_logits.float()).abs()
    scale = model_logits.abs().amax().float().clamp(min=1.0)
    allowed = 1e-4 * scale
    reduced = [d for d in (autocast, z.dtype, model_logits.dtype, h.dtype, arch.head.weight.dtype) if d in _REDUCED]
    if reduced:
        # Rounding the factors of h . w_j to a format of unit roundoff u moves each product by
        # at most 2u of its size, and rounding the result adds u |z_j|: a bound of
        # 2u |h|_2 |w_j|_2 + u |z_j| (Cauchy-Schwarz), taken with a factor 2 of margin.
        u = max(torch.finfo(d).eps / 2 for d in reduced)
        w = arch.head.weight.detach().float().norm(dim=1)
        bound = 4 * u * h.float().norm(dim=1, keepdim=True) * w[None, :] + 2 * u * model_logits.float().abs()
        if arch.softcap:
            bound = bound + 4 * u * arch.softcap
        allowed = torch.maximum(bound, allowed)
    if not (diff <= allowed).all():
        worst = float(diff.amax())
        seen = (
            f"head input {h.dtype}, head weight {arch.head.weight.dtype}, logits {model_logits.dtype}, "
            f"autocast {autocast if autocast is not None else 'off'} at the head"
        )
        raise ArchitectureError(
            f"the model's logits are not its LM head applied to the head's input (max difference {worst:.3g}, "
            f"beyond the rounding of the precision seen: {seen}); corrpo cannot seed its target logits. "
            "If the forward runs in reduced precision in a way corrpo cannot see (a manual cast, a custom "
            "autocast around part of the model), score a float32 copy or call token_strengths outside that "
            "cast; otherwise the head is not a plain linear map of its input (a scale, bias or post-processing "
            "corrpo does not model)"
        )
