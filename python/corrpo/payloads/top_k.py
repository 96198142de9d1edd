"""Top-k payloads: what an inference engine returns (top_logprobs [T, k] with their
top_token_ids, the sampled token's logprob and token_ids per rollout, and the vocabulary
size), from which the server bounds H and G."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import wire
from .._arrays import vector
from ..scoring import ScoreConfig
from ..v1 import reward_service_pb2 as pb
from ._fields import gather, ids_tensor

NAME = "top-k"
KEY = "top_logprobs"
#: Fields no other payload kind takes.
OWN = frozenset({"top_logprobs", "top_token_ids", "vocab_size"})
NEEDS = "top_logprobs, top_token_ids, logprob and token_ids per rollout, and vocab_size"


def check(given: Mapping[str, Any], config: ScoreConfig) -> dict[str, Any]:
    payload = gather(
        given,
        kind=NAME,
        key=KEY,
        needs=NEEDS,
        required=("top_logprobs", "top_token_ids", "logprob", "token_ids", "vocab_size"),
        scalars=("vocab_size",),
    )
    # Top-k logprobs give G alone: refuse another measure before anything is sent.
    config.resolve({"top_k"})
    return payload


def rollouts(payload: Mapping[str, Any], config: ScoreConfig) -> list[pb.Rollout]:
    out = []
    for k in range(len(payload[KEY])):
        message = pb.TopKPayload(
            top_logprobs=wire.encode(np.asarray(payload["top_logprobs"][k], dtype=np.float32)),
            top_token_ids=wire.encode(np.asarray(payload["top_token_ids"][k], dtype=np.int64)),
            logprob=wire.encode(vector(payload["logprob"][k], np.float32, f"logprob[{k}]")),
            token_ids=ids_tensor(vector(payload["token_ids"][k], np.int64, f"token_ids[{k}]")),
            vocab_size=int(payload["vocab_size"]),
        )
        out.append(pb.Rollout(top_k=message))
    return out
