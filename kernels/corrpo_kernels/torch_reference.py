"""The same statistics in plain torch, as the peers of the kernels: what a trainer writes
without them (log_softmax + entropy + gather + sum p^2). Materializes [T, V] float32
log-probabilities and probabilities; the benchmarks' eager and torch.compile baseline.
Like the usual composition it assumes finite logits: a -inf entry makes the entropy NaN."""

from __future__ import annotations

import torch


def token_stats(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[4, T] float32: entropy, logprob, collision, grad_norm (no input checks)."""
    z = logits.float() if temperature == 1.0 else logits.float() / temperature
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    logprob = logp.gather(-1, token_ids[:, None].long()).squeeze(-1)
    collision = (p * p).sum(-1)
    grad_norm = (1.0 - 2.0 * logprob.exp() + collision).clamp_min(0.0).sqrt()
    return torch.stack([entropy, logprob, collision, grad_norm])


def token_stats_from_hidden(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """The unfused composition: the logits h W^T in the inputs' dtype, then token_stats."""
    return token_stats(hidden @ lm_head_weight.T, token_ids, temperature)
