"""Synthetic rollouts for the server tests: logits whose sharpness varies token by token,
the tokens sampled from them, and verifier rewards."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Rollouts:
    logits: list[np.ndarray]
    token_ids: list[np.ndarray]
    rewards: list[float]
    group_sizes: list[int]

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.token_ids])


def make_rollouts(
    rng: np.random.Generator, group_sizes: list[int], vocab: int = 512, tokens: tuple[int, int] = (4, 60)
) -> Rollouts:
    logits, ids = [], []
    for _ in range(sum(group_sizes)):
        t = int(rng.integers(*tokens))
        sharp = rng.gamma(2.0, 1.5, size=(t, 1))
        z = (sharp * rng.standard_normal((t, vocab))).astype(np.float32)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        logits.append(z)
        ids.append(np.array([rng.choice(vocab, p=row) for row in p], dtype=np.int64))
    rewards = rng.integers(0, 2, size=sum(group_sizes)).astype(float).tolist()
    return Rollouts(logits, ids, rewards, list(group_sizes))
