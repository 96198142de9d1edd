"""Logits payloads: logits [T_i, V] with token_ids [T_i] per rollout (NumPy,
ml_dtypes.bfloat16 or torch; CUDA tensors are reduced on their GPU). ``rollouts`` reduces
them here to per-token statistics (send="stats"); ``stream`` lays them out for the server to
reduce (send="logits")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import wire
from .._arrays import is_torch, logits_buffer, vector
from ..errors import ConfigError, ShapeError
from ..scoring import ScoreConfig
from ..stats import token_stats
from ..v1 import reward_service_pb2 as pb
from ..v1 import tensor_pb2
from ._fields import gather, ids_tensor

NAME = "logits"
KEY = "logits"
#: Fields no other payload kind takes.
OWN = frozenset({"logits"})
NEEDS = "logits and token_ids (the sampled ids) per rollout"
_DTYPES = {
    "float32": tensor_pb2.DTYPE_FLOAT32,
    "float16": tensor_pb2.DTYPE_FLOAT16,
    "bfloat16": tensor_pb2.DTYPE_BFLOAT16,
}


def check(given: Mapping[str, Any], config: ScoreConfig) -> dict[str, Any]:
    payload = gather(given, kind=NAME, key=KEY, needs=NEEDS, required=("logits", "token_ids"))
    # Logits give G alone, reduced here or by the server: refuse another measure now.
    config.resolve({"logits"})
    return payload


def rollouts(payload: Mapping[str, Any], config: ScoreConfig) -> list[pb.Rollout]:
    out = []
    for k, (x, ids) in enumerate(zip(payload["logits"], payload["token_ids"])):
        ids = vector(ids, np.int64, f"token_ids[{k}]")
        stats = token_stats(x, ids, temperature=config.temperature)
        message = pb.TokenStatsPayload(
            entropy=wire.encode(stats.entropy), grad_norm=wire.encode(stats.grad_norm), token_ids=ids_tensor(ids)
        )
        out.append(pb.Rollout(stats=message))
    return out


def stream(payload: Mapping[str, Any], config: ScoreConfig, request_id: str) -> tuple[pb.LogitsStreamHeader, list[np.ndarray]]:
    """The stream's header (without its group layout) and the logits as host arrays that
    share one dtype and vocabulary, sent in blocks after it."""
    if any(is_torch(x) and x.device.type != "cpu" for x in payload["logits"]):
        raise ConfigError(
            "send='logits' streams host memory; send='stats' (the default) reduces CUDA logits on their GPU "
            "and sends 12 bytes per token, or pass tensor.cpu()",
            field="send",
        )
    buffers = [logits_buffer(x) for x in payload["logits"]]
    dtypes = {d for _, d in buffers}
    vocabs = {a.shape[1] for a, _ in buffers}
    if len(dtypes) > 1 or len(vocabs) > 1:
        raise ShapeError(f"streamed logits must share one dtype and vocabulary, got {sorted(dtypes)} and {sorted(vocabs)}")
    arrays = [a for a, _ in buffers]
    ids = [vector(i, np.int64, f"token_ids[{k}]") for k, i in enumerate(payload["token_ids"])]
    for k, (a, i) in enumerate(zip(arrays, ids)):
        if len(a) != len(i):
            raise ShapeError(f"rollout {k}: {len(a)} logits rows but {len(i)} token ids", rollout=k)
    header = pb.LogitsStreamHeader(
        request_id=request_id,
        config=wire.config_to_proto(config),
        dtype=_DTYPES[dtypes.pop()],
        vocab_size=vocabs.pop(),
        token_ids=ids_tensor(np.concatenate(ids) if ids else np.empty(0, np.int64)),
    )
    return header, arrays
