"""Turns user input (NumPy arrays, ml_dtypes.bfloat16, torch tensors, lists) into the
arrays the native core reads, without copying contiguous logits."""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import numpy as np

from .errors import ConfigError, ShapeError


def is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _cpu_tensor(x: Any) -> Any:
    if x.device.type != "cpu":
        raise ConfigError(
            f"corrpo's native core reads CPU memory, but the tensor is on {x.device}; "
            "use backend='auto' (the Triton kernels) or pass tensor.cpu()"
        )
    return x.detach()


def logits_buffer(logits: Any) -> tuple[np.ndarray, str]:
    """A 2-D array the core reads in place, and the dtype name it is read as.

    float32, float16 and bfloat16 (``ml_dtypes.bfloat16`` or torch) are read without a copy
    when rows are unit-stride; float64 is converted to float32.
    """
    if is_torch(logits):
        import torch

        tensor = _cpu_tensor(logits)
        if tensor.dtype == torch.bfloat16:
            # NumPy has no bfloat16: hand over the bits, which the core widens itself.
            return _checked(tensor.view(torch.int16).numpy().view(np.uint16), "bfloat16")
        array = tensor.numpy()
    else:
        array = np.asarray(logits)
    if array.dtype == np.float32:
        return _checked(array, "float32")
    if array.dtype == np.float16:
        return _checked(array.view(np.uint16), "float16")
    if array.dtype.name == "bfloat16":
        return _checked(array.view(np.uint16), "bfloat16")
    if array.dtype == np.float64:
        return _checked(array.astype(np.float32), "float32")
    raise ConfigError(f"logits must be float32, float16 or bfloat16, got {array.dtype}")


def check_logits_shape(shape: tuple[int, ...]) -> None:
    if len(shape) != 2:
        raise ShapeError(
            f"logits must be 2-D [tokens, vocab], got shape {tuple(shape)}; "
            "flatten a [batch, time, vocab] tensor with .reshape(-1, vocab)"
        )
    if shape[1] == 0:
        raise ShapeError("logits have a vocabulary of size 0")


def _checked(array: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
    check_logits_shape(array.shape)
    if (array.shape[1] > 1 and array.strides[1] != array.itemsize) or array.strides[0] < 0:
        array = np.ascontiguousarray(array)
    return array, dtype


def vector(values: Any, dtype: type, name: str, length: int | None = None) -> np.ndarray:
    """A 1-D contiguous array of `dtype`, checked against an expected length."""
    if is_torch(values):
        # Per-token vectors are small: read them from any device.
        tensor = values.detach().cpu()
        values = (tensor.float() if tensor.dtype.is_floating_point else tensor).numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise ShapeError(f"{name} must be 1-D, got shape {array.shape}")
    if np.issubdtype(dtype, np.integer):
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise ConfigError(f"{name} must hold integers, got {array.dtype}")
    elif not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise ConfigError(f"{name} must hold numbers, got {array.dtype}")
    if length is not None and array.shape[0] != length:
        raise ShapeError(f"{name} has {array.shape[0]} entries, expected {length}")
    return np.ascontiguousarray(array, dtype=dtype)


def lengths_vector(lengths: Any, tokens: int, rows_of: str) -> np.ndarray:
    """Rollout lengths as int64, checked to split the `tokens` rows of `rows_of` exactly
    (a sum that differs would name the wrong rollout in every error)."""
    spans = vector(lengths, np.int64, "lengths")
    negative = np.flatnonzero(spans < 0)
    if len(negative):
        i = int(negative[0])
        raise ShapeError(f"lengths[{i}] is negative: {spans[i]}", field="lengths", index=i)
    # Python ints: an int64 sum of huge lengths wraps around and could match `tokens`.
    total = sum(int(n) for n in spans)
    if total != tokens:
        raise ShapeError(
            f"lengths add up to {total} tokens, but {rows_of} has {tokens} rows (one per token)", field="lengths"
        )
    return spans


def group_sizes_vector(value: Any, rollouts: int) -> np.ndarray:
    """Rollouts per group as an int64 vector: a sequence as given (the core checks that its
    sizes are positive and add up), or one int for equal groups of that size."""
    if isinstance(value, Integral) and not isinstance(value, bool):
        size = int(value)
        if size < 1 or rollouts % size:
            raise ShapeError(f"group_sizes={size}: {rollouts} rollouts do not split into groups of {size}", field="group_sizes")
        return np.full(rollouts // size, size, np.int64)
    if np.ndim(value) == 0:
        raise ConfigError(f"group_sizes must be an int or a sequence of ints, got {value!r}", field="group_sizes")
    return vector(value, np.int64, "group_sizes")


def real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ConfigError(f"{name} must be a real number, got {value!r}")
    return float(value)


def count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
