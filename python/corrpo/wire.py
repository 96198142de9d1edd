"""Between corrpo's Python objects and the ``corrpo.v1`` messages: tensors, settings and
scores. Shared by the client and the server, so both read the contract the same way."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._arrays import is_torch
from .correlation import Fingerprint
from .errors import ConfigError, ShapeError
from .measures import ESTIMATORS, MEASURES, OBJECTIVES
from .scoring import ScoreConfig, Scores, TopKBounds
from .v1 import reward_service_pb2 as pb
from .v1 import tensor_pb2

_LITTLE_ENDIAN = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DTYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
}
FLOATS = (tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_FLOAT64)
INTEGERS = (tensor_pb2.DTYPE_INT32, tensor_pb2.DTYPE_INT64)
LOGITS = (tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_FLOAT16, tensor_pb2.DTYPE_BFLOAT16)


def dtype_name(dtype: int) -> str:
    return tensor_pb2.DType.Name(dtype) if dtype in tensor_pb2.DType.values() else f"DType {dtype}"


def element(dtype: int) -> np.dtype:
    """The NumPy dtype of a wire dtype; bfloat16 needs ml_dtypes (``pip install '.[bf16]' in the corrpo checkout``)."""
    if dtype == tensor_pb2.DTYPE_BFLOAT16:
        try:
            import ml_dtypes
        except ImportError:
            raise ConfigError("bfloat16 tensors need ml_dtypes: pip install '.[bf16]' in the corrpo checkout") from None
        return np.dtype(ml_dtypes.bfloat16)
    return _LITTLE_ENDIAN[dtype]


def encode(values: Any, dtype: int | None = None) -> tensor_pb2.Tensor:
    """A Tensor holding ``values`` (NumPy, torch CPU or ml_dtypes.bfloat16), converted to
    ``dtype`` when given."""
    if is_torch(values):
        import torch

        tensor = values.detach().cpu()
        if tensor.dtype == torch.bfloat16 and dtype in (None, tensor_pb2.DTYPE_BFLOAT16):
            bits = tensor.contiguous().view(torch.int16).numpy()
            return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_BFLOAT16, shape=bits.shape, data=bits.tobytes())
        values = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    array = np.asarray(values)
    if dtype is None:
        dtype = _wire_dtype(array.dtype)
    return tensor_pb2.Tensor(
        dtype=dtype, shape=array.shape, data=np.ascontiguousarray(array, dtype=element(dtype)).tobytes()
    )


def _wire_dtype(dtype: np.dtype) -> int:
    if dtype.name == "bfloat16":
        return tensor_pb2.DTYPE_BFLOAT16
    for wire, np_dtype in _LITTLE_ENDIAN.items():
        if dtype.newbyteorder("<") == np_dtype:
            return wire
    raise ConfigError(f"no wire dtype for {dtype}")


#: The largest size or count a message may carry: a vocabulary (INT32 token ids address
#: 2**31 tokens), a token count, and the elements that a tensor's non-zero dimensions
#: describe (no gRPC message holds 2 GiB). Checked before anything is allocated from them.
MAX_SIZE = 1 << 31


def size(
    value: int, path: str, minimum: int = 0, maximum: int = MAX_SIZE, what: str = "", field: str | None = None
) -> int:
    """A size or count from the wire (a shape dimension, a vocabulary size, a token count)
    as a Python int, checked to lie in [minimum, maximum] before NumPy or the native core
    sees it: every number of a message that sizes an allocation or a conversion goes through
    here. Otherwise a ShapeError that names ``path`` (the field, or what was computed from
    it: then ``field`` is the field) and says ``what`` the bound is."""
    value = int(value)
    if not minimum <= value <= maximum:
        why = f" ({what})" if what else ""
        raise ShapeError(f"{path} is {value}; it must be in [{minimum}, {maximum}]{why}", field=field or path)
    return value


def shape_text(shape: tuple[int, ...]) -> str:
    """A shape as an error message quotes it: whole when short, else its first dimensions
    and its rank (a 10,000-dimension shape would make a 30 KB message)."""
    if len(shape) <= 8:
        return str(list(shape))
    return f"[{', '.join(map(str, shape[:8]))}, ...] ({len(shape)} dimensions)"


def decode(tensor: tensor_pb2.Tensor, path: str, dtypes: tuple[int, ...], rank: int) -> np.ndarray:
    """The array a Tensor holds (a read-only view of its bytes), after checking its dtype
    against ``dtypes``, its rank, its dimensions and its byte count. Errors name the field
    ``path``."""
    if tensor.dtype == tensor_pb2.DTYPE_UNSPECIFIED and not tensor.shape and not tensor.data:
        # What an unset message field reads as: say so rather than blame its dtype.
        raise ConfigError(f"{path} must be set: the request leaves it out", field=path)
    if tensor.dtype not in dtypes:
        allowed = " or ".join(dtype_name(d) for d in dtypes)
        raise ConfigError(f"{path}.dtype must be {allowed}, got {dtype_name(tensor.dtype)}", field=path)
    shape = tuple(tensor.shape)
    if len(shape) != rank:
        raise ShapeError(f"{path}.shape must have {rank} dimension(s), got {shape_text(shape)}", field=path)
    if any(d < 0 for d in shape):
        raise ShapeError(f"{path}.shape has a negative dimension: {shape_text(shape)}", field=path)
    # An empty tensor's other dimensions are not bounded by its bytes: NumPy refuses a
    # [0, 2**62] view as too big, and a [0, V] block would declare a vocabulary of V.
    size(
        math.prod(d for d in shape if d),
        f"the product of the non-zero dimensions of {path}.shape {shape_text(shape)}",
        what="no message holds more elements",
        field=path,
    )
    np_dtype = element(tensor.dtype)
    expected = math.prod(shape) * np_dtype.itemsize
    if len(tensor.data) != expected:
        raise ShapeError(
            f"{path}.data holds {len(tensor.data)} bytes, but {dtype_name(tensor.dtype)} {shape_text(shape)} "
            f"needs {expected}",
            field=path,
        )
    return np.frombuffer(tensor.data, dtype=np_dtype).reshape(shape)


_METHODS = {"spearman": pb.METHOD_SPEARMAN, "pearson": pb.METHOD_PEARSON}
_GATES = {"none": pb.GATE_NONE, "correct": pb.GATE_CORRECT}
_ADVANTAGES = {"grpo": pb.ADVANTAGE_MODE_GRPO, "drgrpo": pb.ADVANTAGE_MODE_DRGRPO, "none": pb.ADVANTAGE_MODE_NONE}
_ESTIMATES = {
    "concentrated_tail": pb.TOP_K_ESTIMATE_CONCENTRATED_TAIL,
    "uniform_tail": pb.TOP_K_ESTIMATE_UNIFORM_TAIL,
}
_MEASURES = {name: pb.Measure.Value(f"MEASURE_{name.upper()}") for name in MEASURES}
_ESTIMATORS = {name: pb.Estimator.Value("ESTIMATOR_TOP_K_BOUND" if name == "top_k" else f"ESTIMATOR_{name.upper()}") for name in ESTIMATORS}
_OBJECTIVES = {name: pb.Objective.Value(f"OBJECTIVE_{name.upper()}") for name in OBJECTIVES}
_ENUMS = {
    "method": _METHODS,
    "gate": _GATES,
    "advantage": _ADVANTAGES,
    "top_k_estimate": _ESTIMATES,
    "measure": _MEASURES,
    "estimator": _ESTIMATORS,
    "objective": _OBJECTIVES,
}
_ENUM_NAMES = {name: {v: k for k, v in table.items()} for name, table in _ENUMS.items()}
_OPTIONAL = ("min_tokens", "temperature", "coef", "threshold", "estimator_k", "estimator_seed")
_STATUS = {
    None: pb.RHO_STATUS_DEFINED,
    "too_few_tokens": pb.RHO_STATUS_TOO_FEW_TOKENS,
    "constant_entropy": pb.RHO_STATUS_CONSTANT_ENTROPY,
    "constant_grad_norm": pb.RHO_STATUS_CONSTANT_GRAD_NORM,
}
_REASON = {status: reason for reason, status in _STATUS.items()}


def config_to_proto(config: ScoreConfig) -> pb.ScoreConfig:
    fields = {name: table[getattr(config, name)] for name, table in _ENUMS.items() if getattr(config, name) is not None}
    fields.update({name: getattr(config, name) for name in _OPTIONAL if getattr(config, name) is not None})
    return pb.ScoreConfig(**fields)


def config_from_proto(message: pb.ScoreConfig, path: str = "config") -> ScoreConfig:
    """The settings of a request: unset fields take their defaults; bad values raise a
    ConfigError naming the field."""
    settings: dict[str, Any] = {}
    for name, names in _ENUM_NAMES.items():
        value = getattr(message, name)
        if value == 0:
            continue
        if value not in names:
            raise ConfigError(f"{path}.{name}: unknown enum value {value}", field=f"{path}.{name}")
        settings[name] = names[value]
    for name in _OPTIONAL:
        if message.HasField(name):
            settings[name] = getattr(message, name)
    try:
        return ScoreConfig(**settings)
    except ConfigError as err:
        # Every message of ScoreConfig starts with the name of the setting at fault.
        raise ConfigError(f"{path}.{err.message}", field=path) from None


def status(reason: str | None) -> int:
    return _STATUS[reason]


def _fingerprint_to_proto(fp: Fingerprint) -> pb.Fingerprint:
    message = pb.Fingerprint(
        num_tokens=fp.n_tokens,
        rho_pooled=fp.rho_pooled,
        rho_pooled_status=status(fp.rho_pooled_reason),
        rho_rollout_mean=fp.rho_rollout_mean,
        num_rollouts=fp.n_rollouts or 0,
        num_rollouts_defined=fp.n_rollouts_defined or 0,
        entropy_mean=fp.entropy_mean,
        entropy_mean_bits=fp.entropy_mean_bits,
        grad_norm_mean=fp.strength_mean,
    )
    if fp.rho_unique is not None:
        message.rho_unique = fp.rho_unique
        message.rho_unique_status = status(fp.rho_unique_reason)
        message.num_unique_tokens = fp.n_unique_tokens
    return message


def _fingerprint_from_proto(message: pb.Fingerprint, method: str) -> Fingerprint:
    unique = message.HasField("rho_unique")
    return Fingerprint(
        method=method,
        n_tokens=message.num_tokens,
        rho_pooled=message.rho_pooled,
        rho_pooled_reason=_REASON[message.rho_pooled_status],
        n_unique_tokens=message.num_unique_tokens if unique else None,
        rho_unique=message.rho_unique if unique else None,
        rho_unique_reason=_REASON[message.rho_unique_status] if unique else None,
        n_rollouts=message.num_rollouts,
        n_rollouts_defined=message.num_rollouts_defined,
        rho_rollout_mean=message.rho_rollout_mean,
        entropy_mean=message.entropy_mean,
        strength_mean=message.grad_norm_mean,
    )


def scores_to_proto(scores: Scores, request_id: str, backend: str) -> pb.ScoreResult:
    result = pb.ScoreResult(
        request_id=request_id,
        config=config_to_proto(scores.config),
        fingerprint=_fingerprint_to_proto(scores.fingerprint),
        backend=backend,
        weights_version=scores.weights_version,
    )
    if scores.logit_grad is not None:
        result.logit_grad_fingerprint.CopyFrom(_fingerprint_to_proto(scores.logit_grad))
    top_k = scores.top_k
    for group in scores.groups():
        out = result.groups.add()
        for i in range(group.start, group.stop):
            rollout = out.rollouts.add(
                rho=scores.rho[i],
                rho_status=status(scores.reasons[i]),
                reward=scores.rewards[i],
                advantage=scores.advantages[i],
                regularized=bool(scores.regularized[i]),
                num_tokens=int(scores.n_tokens[i]),
                entropy_mean=scores.entropy_mean[i],
                grad_norm_mean=scores.grad_norm_mean[i],
            )
            if top_k is not None and not math.isnan(top_k.entropy_mean_lower[i]):
                rollout.top_k_bounds.CopyFrom(
                    pb.TopKBounds(
                        entropy_mean_lower=top_k.entropy_mean_lower[i],
                        entropy_mean_upper=top_k.entropy_mean_upper[i],
                        grad_norm_mean_lower=top_k.grad_norm_mean_lower[i],
                        grad_norm_mean_upper=top_k.grad_norm_mean_upper[i],
                    )
                )
    return result


def scores_from_proto(result: pb.ScoreResult) -> Scores:
    rollouts = [r for group in result.groups for r in group.rollouts]
    column = lambda name, dtype=np.float64: np.array([getattr(r, name) for r in rollouts], dtype=dtype)  # noqa: E731
    config = config_from_proto(result.config)
    top_k = None
    if any(r.HasField("top_k_bounds") for r in rollouts):
        bound = lambda name: np.array(  # noqa: E731
            [getattr(r.top_k_bounds, name) if r.HasField("top_k_bounds") else math.nan for r in rollouts]
        )
        top_k = TopKBounds(*(bound(f.name) for f in pb.TopKBounds.DESCRIPTOR.fields))
    return Scores(
        rho=column("rho"),
        reasons=[_REASON[r.rho_status] for r in rollouts],
        rewards=column("reward"),
        advantages=column("advantage"),
        regularized=column("regularized", bool),
        n_tokens=column("num_tokens", np.int64),
        entropy_mean=column("entropy_mean"),
        grad_norm_mean=column("grad_norm_mean"),
        group_sizes=np.array([len(g.rollouts) for g in result.groups], dtype=np.int64),
        fingerprint=_fingerprint_from_proto(result.fingerprint, config.method),
        config=config,
        request_id=result.request_id,
        backend=result.backend,
        top_k=top_k,
        logit_grad=_fingerprint_from_proto(result.logit_grad_fingerprint, config.method)
        if result.HasField("logit_grad_fingerprint")
        else None,
        weights_version=result.weights_version if result.HasField("weights_version") else None,
    )
