"""Tokens payloads: prompt_ids and token_ids (the response) per rollout, for a server
started with ``--model`` to score with its own policy (the paper's parameter-space
measure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .._arrays import vector
from ..scoring import ScoreConfig
from ..v1 import reward_service_pb2 as pb
from ._fields import gather, ids_tensor

NAME = "tokens"
KEY = "prompt_ids"
#: Fields no other payload kind takes.
OWN = frozenset({"prompt_ids"})
NEEDS = "prompt_ids and token_ids (the response ids) per rollout"


def check(given: Mapping[str, Any], config: ScoreConfig) -> dict[str, Any]:
    return gather(given, kind=NAME, key=KEY, needs=NEEDS, required=("prompt_ids", "token_ids"))


def rollouts(payload: Mapping[str, Any], config: ScoreConfig) -> list[pb.Rollout]:
    return [
        pb.Rollout(
            tokens=pb.TokensPayload(
                prompt_ids=ids_tensor(vector(prompt, np.int64, f"prompt_ids[{k}]")),
                response_ids=ids_tensor(vector(response, np.int64, f"token_ids[{k}]")),
            )
        )
        for k, (prompt, response) in enumerate(zip(payload["prompt_ids"], payload["token_ids"]))
    ]


def response_tokens(rollouts: list[pb.Rollout]) -> int:
    """The tokens the server's model scores: each costs it a forward and backward pass."""
    return sum(r.tokens.response_ids.shape[0] for r in rollouts)
