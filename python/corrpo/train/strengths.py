"""Per-token entropy and gradient strength of the policy on its own rollouts, as the trainer
sends them to the reward server.

``--strength logit_grad`` reduces the training forward pass's hidden states and LM head
with ``corrpo.token_stats_from_hidden`` (G, SPEC 2). Every other choice is the paper's
parameter-space measure (``l1_mean``, SPEC 3) by an estimator of ``corrpo.gradients``,
computed on a ``LlamaForCausalLM`` mirror of the policy whose weights are synced before
each use (the same logits; the trainer's fused layers are split as the paper's measure
needs q, k, v apart)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import MEASURE


@dataclass
class Strengths:
    """Scored tokens of a batch of rollouts, concatenated in rollout order: H (nats), S of the
    run's measure, G (= S for logit_grad), ids, and scored tokens per rollout."""

    entropy: np.ndarray
    strength: np.ndarray
    grad_norm: np.ndarray
    token_ids: np.ndarray
    lengths: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "entropy": self.entropy,
            "strength": self.strength,
            "grad_norm": self.grad_norm,
            "token_ids": self.token_ids,
            "lengths": self.lengths,
        }


class ParameterStrengths:
    """The paper's measure of the policy's response tokens by an estimator of
    ``corrpo.gradients``, on a Llama mirror of the policy synced at every call."""

    def __init__(self, policy: torch.nn.Module, objective: str) -> None:
        from .hf import to_llama

        self.policy = policy
        self.objective = objective
        device = next(policy.parameters()).device
        self.mirror = to_llama(policy).to(device).requires_grad_(False)

    def __call__(
        self,
        prompts: torch.Tensor,
        responses: torch.Tensor,
        lengths: torch.Tensor,
        *,
        estimator: str,
        k: int | None,
        seeds: list[int],
    ) -> Strengths:
        """prompts [B, P], responses [B, S] (padded after each row's length), lengths [B];
        B splits into ``len(seeds)`` groups of rows, each drawn with its own seed (so a
        group's draws do not depend on which rank or batch it is in)."""
        from corrpo.gradients import token_strengths

        from .hf import sync_llama

        sync_llama(self.policy, self.mirror)
        ids = torch.cat([prompts, responses], dim=1)
        start = prompts.shape[1]
        # Causal attention: the padding after a response never reaches its own positions.
        positions = [np.arange(start, start + int(n)) for n in lengths.tolist()]
        size = len(positions) // len(seeds)
        outs = [
            token_strengths(
                self.mirror,
                ids[g * size : (g + 1) * size],
                positions[g * size : (g + 1) * size],
                objective=self.objective,
                measures=(MEASURE, "logit_grad"),
                estimator=estimator,
                k=k,
                seed=seed,
            )
            for g, seed in enumerate(seeds)
        ]
        cat = lambda f: np.concatenate([f(o) for o in outs])  # noqa: E731
        return Strengths(
            entropy=cat(lambda o: o.entropy_bits) * math.log(2),
            strength=cat(lambda o: o.l1_mean),
            grad_norm=cat(lambda o: o.logit_grad),
            token_ids=cat(lambda o: o.token_ids),
            lengths=cat(lambda o: o.lengths),
        )
