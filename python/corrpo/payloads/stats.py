"""Stats payloads: per-token entropy with grad_norm (the logit_grad measure, from
corrpo.token_stats) or strength (of the measure named in ``measure=``, from
corrpo.gradients), optionally logprob and token_ids; one array of each per rollout."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import wire
from .._arrays import vector
from ..errors import ConfigError
from ..scoring import ScoreConfig
from ..v1 import reward_service_pb2 as pb
from ._fields import gather, ids_tensor

NAME = "stats"
KEY = "entropy"
#: Fields no other payload kind takes.
OWN = frozenset({"entropy", "grad_norm", "strength"})
NEEDS = "entropy and grad_norm (the logit_grad measure) or strength (of the measure named in measure=), one array per rollout"


def check(given: Mapping[str, Any], config: ScoreConfig) -> dict[str, Any]:
    payload = gather(
        given,
        kind=NAME,
        key=KEY,
        needs=NEEDS,
        required=("entropy",),
        optional=("grad_norm", "strength", "logprob", "token_ids"),
    )
    if "grad_norm" not in payload and "strength" not in payload:
        # The measure says which one carries S: grad_norm for logit_grad (the default), else strength.
        missing = "grad_norm" if (config.measure or "logit_grad") == "logit_grad" else "strength"
        raise ConfigError(f"`{missing}` is missing: {NAME} payloads need {NEEDS}", field=missing)
    return payload


def rollouts(payload: Mapping[str, Any], config: ScoreConfig) -> list[pb.Rollout]:
    out = []
    for k in range(len(payload[KEY])):
        message = pb.TokenStatsPayload(entropy=wire.encode(vector(payload["entropy"][k], np.float32, f"entropy[{k}]")))
        if "grad_norm" in payload:
            message.grad_norm.CopyFrom(wire.encode(vector(payload["grad_norm"][k], np.float32, f"grad_norm[{k}]")))
        if "strength" in payload:
            message.strength.CopyFrom(wire.encode(vector(payload["strength"][k], np.float64, f"strength[{k}]")))
        if "logprob" in payload:
            message.logprob.CopyFrom(wire.encode(vector(payload["logprob"][k], np.float32, f"logprob[{k}]")))
        if "token_ids" in payload:
            message.token_ids.CopyFrom(ids_tensor(vector(payload["token_ids"][k], np.int64, f"token_ids[{k}]")))
        out.append(pb.Rollout(stats=message))
    return out
