"""What every payload kind checks the same way: the fields it takes, the ones it needs,
and one array per rollout in each."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from .. import wire
from .._arrays import is_torch
from ..errors import ConfigError, ShapeError
from ..v1 import tensor_pb2


def per_rollout(values: Any, name: str) -> list[Any]:
    """``values`` as a list of one array per rollout; a single array is refused, since
    iterating it would turn its rows into rollouts."""
    if isinstance(values, np.ndarray) or is_torch(values):
        raise ShapeError(
            f"{name} must be a sequence with one array per rollout, got a single {type(values).__name__}", field=name
        )
    return list(values)


def gather(
    given: Mapping[str, Any],
    *,
    kind: str,
    key: str,
    needs: str,
    required: Collection[str],
    optional: Collection[str] = (),
    scalars: Collection[str] = (),
) -> dict[str, Any]:
    """The payload's fields, per-rollout ones as lists of one array per rollout of ``key``.

    A field of another kind, a missing required one, or a per-rollout field whose count
    differs from ``key``'s is refused with a message that names it and says what ``kind``
    payloads need (``needs``)."""
    takes = [*required, *optional, *scalars]
    for name in given:
        if name not in takes:
            raise ConfigError(f"`{name}` is not part of a {kind} payload, which takes {', '.join(takes)}", field=name)
    for name in required:
        if name not in given:
            raise ConfigError(f"`{name}` is missing: {kind} payloads need {needs}", field=name)
    out = {name: (value if name in scalars else per_rollout(value, name)) for name, value in given.items()}
    n = len(out[key])
    for name, value in out.items():
        if name not in scalars and len(value) != n:
            raise ShapeError(
                f"{name} has {len(value)} array{'s' * (len(value) != 1)} for the {n} rollouts of {key}: {kind} payloads "
                f"need {needs}",
                field=name,
            )
    return out


def ids_tensor(ids: np.ndarray) -> tensor_pb2.Tensor:
    """Token ids on the wire: int32 when every id fits, else int64."""
    narrow = len(ids) == 0 or (ids.min() >= 0 and ids.max() < 2**31)
    return wire.encode(ids, tensor_pb2.DTYPE_INT32 if narrow else tensor_pb2.DTYPE_INT64)
