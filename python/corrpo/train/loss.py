"""Per-token losses. Callers sum them over the tokens a rank holds and divide by the
global token count, so every token of the batch weighs the same whatever the ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[token] per position, in float32."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@dataclass
class PolicyTerms:
    loss: torch.Tensor  # per token
    clipped: torch.Tensor  # per token, 1.0 where the clipped branch was taken
    kl: torch.Tensor  # per token k3 estimate, zero without a reference


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> PolicyTerms:
    """PPO's clipped surrogate, -min(r A, clip(r, 1 - eps, 1 + eps) A) with r = p / p_old,
    plus ``kl_coef`` times the k3 estimate exp(ref - logp) - (ref - logp) - 1 of
    KL(policy || reference) (as in GRPO)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    loss = -torch.minimum(unclipped, clipped)
    if ref_logp is not None:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        loss = loss + kl_coef * kl
    else:
        kl = torch.zeros_like(loss)
    return PolicyTerms(loss=loss, clipped=(clipped < unclipped).float(), kl=kl.detach())
