from corrpo.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_UNSPECIFIED: _ClassVar[Method]
    METHOD_SPEARMAN: _ClassVar[Method]
    METHOD_PEARSON: _ClassVar[Method]

class Gate(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GATE_UNSPECIFIED: _ClassVar[Gate]
    GATE_NONE: _ClassVar[Gate]
    GATE_CORRECT: _ClassVar[Gate]

class AdvantageMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADVANTAGE_MODE_UNSPECIFIED: _ClassVar[AdvantageMode]
    ADVANTAGE_MODE_GRPO: _ClassVar[AdvantageMode]
    ADVANTAGE_MODE_DRGRPO: _ClassVar[AdvantageMode]
    ADVANTAGE_MODE_NONE: _ClassVar[AdvantageMode]

class TopKEstimate(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOP_K_ESTIMATE_UNSPECIFIED: _ClassVar[TopKEstimate]
    TOP_K_ESTIMATE_CONCENTRATED_TAIL: _ClassVar[TopKEstimate]
    TOP_K_ESTIMATE_UNIFORM_TAIL: _ClassVar[TopKEstimate]

class Measure(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEASURE_UNSPECIFIED: _ClassVar[Measure]
    MEASURE_LOGIT_GRAD: _ClassVar[Measure]
    MEASURE_HEAD_LOGIT_GRAD: _ClassVar[Measure]
    MEASURE_L1_MEAN: _ClassVar[Measure]
    MEASURE_NUCLEAR_QKVO: _ClassVar[Measure]
    MEASURE_FROBENIUS: _ClassVar[Measure]

class Estimator(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ESTIMATOR_UNSPECIFIED: _ClassVar[Estimator]
    ESTIMATOR_EXACT: _ClassVar[Estimator]
    ESTIMATOR_SUBSAMPLE: _ClassVar[Estimator]
    ESTIMATOR_JVP: _ClassVar[Estimator]
    ESTIMATOR_LAST_BLOCK: _ClassVar[Estimator]
    ESTIMATOR_TOP_K_BOUND: _ClassVar[Estimator]
    ESTIMATOR_LOCAL: _ClassVar[Estimator]
    ESTIMATOR_JVP_CV: _ClassVar[Estimator]

class Objective(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OBJECTIVE_UNSPECIFIED: _ClassVar[Objective]
    OBJECTIVE_LOGIT: _ClassVar[Objective]
    OBJECTIVE_LOGPROB: _ClassVar[Objective]

class RhoStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RHO_STATUS_UNSPECIFIED: _ClassVar[RhoStatus]
    RHO_STATUS_DEFINED: _ClassVar[RhoStatus]
    RHO_STATUS_TOO_FEW_TOKENS: _ClassVar[RhoStatus]
    RHO_STATUS_CONSTANT_ENTROPY: _ClassVar[RhoStatus]
    RHO_STATUS_CONSTANT_GRAD_NORM: _ClassVar[RhoStatus]
METHOD_UNSPECIFIED: Method
METHOD_SPEARMAN: Method
METHOD_PEARSON: Method
GATE_UNSPECIFIED: Gate
GATE_NONE: Gate
GATE_CORRECT: Gate
ADVANTAGE_MODE_UNSPECIFIED: AdvantageMode
ADVANTAGE_MODE_GRPO: AdvantageMode
ADVANTAGE_MODE_DRGRPO: AdvantageMode
ADVANTAGE_MODE_NONE: AdvantageMode
TOP_K_ESTIMATE_UNSPECIFIED: TopKEstimate
TOP_K_ESTIMATE_CONCENTRATED_TAIL: TopKEstimate
TOP_K_ESTIMATE_UNIFORM_TAIL: TopKEstimate
MEASURE_UNSPECIFIED: Measure
MEASURE_LOGIT_GRAD: Measure
MEASURE_HEAD_LOGIT_GRAD: Measure
MEASURE_L1_MEAN: Measure
MEASURE_NUCLEAR_QKVO: Measure
MEASURE_FROBENIUS: Measure
ESTIMATOR_UNSPECIFIED: Estimator
ESTIMATOR_EXACT: Estimator
ESTIMATOR_SUBSAMPLE: Estimator
ESTIMATOR_JVP: Estimator
ESTIMATOR_LAST_BLOCK: Estimator
ESTIMATOR_TOP_K_BOUND: Estimator
ESTIMATOR_LOCAL: Estimator
ESTIMATOR_JVP_CV: Estimator
OBJECTIVE_UNSPECIFIED: Objective
OBJECTIVE_LOGIT: Objective
OBJECTIVE_LOGPROB: Objective
RHO_STATUS_UNSPECIFIED: RhoStatus
RHO_STATUS_DEFINED: RhoStatus
RHO_STATUS_TOO_FEW_TOKENS: RhoStatus
RHO_STATUS_CONSTANT_ENTROPY: RhoStatus
RHO_STATUS_CONSTANT_GRAD_NORM: RhoStatus

class ScoreConfig(_message.Message):
    __slots__ = ("method", "min_tokens", "temperature", "coef", "gate", "threshold", "advantage", "top_k_estimate", "measure", "estimator", "objective", "estimator_k", "estimator_seed")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    COEF_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    MEASURE_FIELD_NUMBER: _ClassVar[int]
    ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    ESTIMATOR_K_FIELD_NUMBER: _ClassVar[int]
    ESTIMATOR_SEED_FIELD_NUMBER: _ClassVar[int]
    method: Method
    min_tokens: int
    temperature: float
    coef: float
    gate: Gate
    threshold: float
    advantage: AdvantageMode
    top_k_estimate: TopKEstimate
    measure: Measure
    estimator: Estimator
    objective: Objective
    estimator_k: int
    estimator_seed: int
    def __init__(self, method: _Optional[_Union[Method, str]] = ..., min_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., coef: _Optional[float] = ..., gate: _Optional[_Union[Gate, str]] = ..., threshold: _Optional[float] = ..., advantage: _Optional[_Union[AdvantageMode, str]] = ..., top_k_estimate: _Optional[_Union[TopKEstimate, str]] = ..., measure: _Optional[_Union[Measure, str]] = ..., estimator: _Optional[_Union[Estimator, str]] = ..., objective: _Optional[_Union[Objective, str]] = ..., estimator_k: _Optional[int] = ..., estimator_seed: _Optional[int] = ...) -> None: ...

class TokenStatsPayload(_message.Message):
    __slots__ = ("entropy", "grad_norm", "logprob", "token_ids", "strength")
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    entropy: _tensor_pb2.Tensor
    grad_norm: _tensor_pb2.Tensor
    logprob: _tensor_pb2.Tensor
    token_ids: _tensor_pb2.Tensor
    strength: _tensor_pb2.Tensor
    def __init__(self, entropy: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., grad_norm: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., logprob: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., token_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., strength: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class TokensPayload(_message.Message):
    __slots__ = ("prompt_ids", "response_ids")
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_IDS_FIELD_NUMBER: _ClassVar[int]
    prompt_ids: _tensor_pb2.Tensor
    response_ids: _tensor_pb2.Tensor
    def __init__(self, prompt_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., response_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class LogitsPayload(_message.Message):
    __slots__ = ("logits", "token_ids")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    logits: _tensor_pb2.Tensor
    token_ids: _tensor_pb2.Tensor
    def __init__(self, logits: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., token_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class TopKPayload(_message.Message):
    __slots__ = ("top_logprobs", "top_token_ids", "logprob", "token_ids", "vocab_size")
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    top_logprobs: _tensor_pb2.Tensor
    top_token_ids: _tensor_pb2.Tensor
    logprob: _tensor_pb2.Tensor
    token_ids: _tensor_pb2.Tensor
    vocab_size: int
    def __init__(self, top_logprobs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., top_token_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., logprob: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., token_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., vocab_size: _Optional[int] = ...) -> None: ...

class Rollout(_message.Message):
    __slots__ = ("reward", "stats", "logits", "top_k", "tokens")
    REWARD_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    reward: float
    stats: TokenStatsPayload
    logits: LogitsPayload
    top_k: TopKPayload
    tokens: TokensPayload
    def __init__(self, reward: _Optional[float] = ..., stats: _Optional[_Union[TokenStatsPayload, _Mapping]] = ..., logits: _Optional[_Union[LogitsPayload, _Mapping]] = ..., top_k: _Optional[_Union[TopKPayload, _Mapping]] = ..., tokens: _Optional[_Union[TokensPayload, _Mapping]] = ...) -> None: ...

class Group(_message.Message):
    __slots__ = ("rollouts",)
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    rollouts: _containers.RepeatedCompositeFieldContainer[Rollout]
    def __init__(self, rollouts: _Optional[_Iterable[_Union[Rollout, _Mapping]]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "config", "groups", "weights_version")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    config: ScoreConfig
    groups: _containers.RepeatedCompositeFieldContainer[Group]
    weights_version: str
    def __init__(self, request_id: _Optional[str] = ..., config: _Optional[_Union[ScoreConfig, _Mapping]] = ..., groups: _Optional[_Iterable[_Union[Group, _Mapping]]] = ..., weights_version: _Optional[str] = ...) -> None: ...

class ReloadWeightsRequest(_message.Message):
    __slots__ = ("path", "weights_version")
    PATH_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    path: str
    weights_version: str
    def __init__(self, path: _Optional[str] = ..., weights_version: _Optional[str] = ...) -> None: ...

class ReloadWeightsResponse(_message.Message):
    __slots__ = ("weights_version", "load_seconds")
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    weights_version: str
    load_seconds: float
    def __init__(self, weights_version: _Optional[str] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: ScoreResult
    def __init__(self, result: _Optional[_Union[ScoreResult, _Mapping]] = ...) -> None: ...

class LogitsStreamHeader(_message.Message):
    __slots__ = ("request_id", "config", "dtype", "vocab_size", "groups", "token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    config: ScoreConfig
    dtype: _tensor_pb2.DType
    vocab_size: int
    groups: _containers.RepeatedCompositeFieldContainer[GroupLayout]
    token_ids: _tensor_pb2.Tensor
    def __init__(self, request_id: _Optional[str] = ..., config: _Optional[_Union[ScoreConfig, _Mapping]] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., vocab_size: _Optional[int] = ..., groups: _Optional[_Iterable[_Union[GroupLayout, _Mapping]]] = ..., token_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class GroupLayout(_message.Message):
    __slots__ = ("rollouts",)
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    rollouts: _containers.RepeatedCompositeFieldContainer[RolloutLayout]
    def __init__(self, rollouts: _Optional[_Iterable[_Union[RolloutLayout, _Mapping]]] = ...) -> None: ...

class RolloutLayout(_message.Message):
    __slots__ = ("num_tokens", "reward")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    reward: float
    def __init__(self, num_tokens: _Optional[int] = ..., reward: _Optional[float] = ...) -> None: ...

class LogitsBlock(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ScoreLogitsStreamRequest(_message.Message):
    __slots__ = ("header", "block")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    header: LogitsStreamHeader
    block: LogitsBlock
    def __init__(self, header: _Optional[_Union[LogitsStreamHeader, _Mapping]] = ..., block: _Optional[_Union[LogitsBlock, _Mapping]] = ...) -> None: ...

class ScoreLogitsStreamResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: ScoreResult
    def __init__(self, result: _Optional[_Union[ScoreResult, _Mapping]] = ...) -> None: ...

class TopKBounds(_message.Message):
    __slots__ = ("entropy_mean_lower", "entropy_mean_upper", "grad_norm_mean_lower", "grad_norm_mean_upper")
    ENTROPY_MEAN_LOWER_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_MEAN_UPPER_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_MEAN_LOWER_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_MEAN_UPPER_FIELD_NUMBER: _ClassVar[int]
    entropy_mean_lower: float
    entropy_mean_upper: float
    grad_norm_mean_lower: float
    grad_norm_mean_upper: float
    def __init__(self, entropy_mean_lower: _Optional[float] = ..., entropy_mean_upper: _Optional[float] = ..., grad_norm_mean_lower: _Optional[float] = ..., grad_norm_mean_upper: _Optional[float] = ...) -> None: ...

class RolloutResult(_message.Message):
    __slots__ = ("rho", "rho_status", "reward", "advantage", "regularized", "num_tokens", "entropy_mean", "grad_norm_mean", "top_k_bounds")
    RHO_FIELD_NUMBER: _ClassVar[int]
    RHO_STATUS_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGE_FIELD_NUMBER: _ClassVar[int]
    REGULARIZED_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_MEAN_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_MEAN_FIELD_NUMBER: _ClassVar[int]
    TOP_K_BOUNDS_FIELD_NUMBER: _ClassVar[int]
    rho: float
    rho_status: RhoStatus
    reward: float
    advantage: float
    regularized: bool
    num_tokens: int
    entropy_mean: float
    grad_norm_mean: float
    top_k_bounds: TopKBounds
    def __init__(self, rho: _Optional[float] = ..., rho_status: _Optional[_Union[RhoStatus, str]] = ..., reward: _Optional[float] = ..., advantage: _Optional[float] = ..., regularized: _Optional[bool] = ..., num_tokens: _Optional[int] = ..., entropy_mean: _Optional[float] = ..., grad_norm_mean: _Optional[float] = ..., top_k_bounds: _Optional[_Union[TopKBounds, _Mapping]] = ...) -> None: ...

class GroupResult(_message.Message):
    __slots__ = ("rollouts",)
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    rollouts: _containers.RepeatedCompositeFieldContainer[RolloutResult]
    def __init__(self, rollouts: _Optional[_Iterable[_Union[RolloutResult, _Mapping]]] = ...) -> None: ...

class Fingerprint(_message.Message):
    __slots__ = ("num_tokens", "rho_pooled", "rho_pooled_status", "rho_unique", "rho_unique_status", "num_unique_tokens", "rho_rollout_mean", "num_rollouts", "num_rollouts_defined", "entropy_mean", "entropy_mean_bits", "grad_norm_mean")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RHO_POOLED_FIELD_NUMBER: _ClassVar[int]
    RHO_POOLED_STATUS_FIELD_NUMBER: _ClassVar[int]
    RHO_UNIQUE_FIELD_NUMBER: _ClassVar[int]
    RHO_UNIQUE_STATUS_FIELD_NUMBER: _ClassVar[int]
    NUM_UNIQUE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RHO_ROLLOUT_MEAN_FIELD_NUMBER: _ClassVar[int]
    NUM_ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    NUM_ROLLOUTS_DEFINED_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_MEAN_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_MEAN_BITS_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_MEAN_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    rho_pooled: float
    rho_pooled_status: RhoStatus
    rho_unique: float
    rho_unique_status: RhoStatus
    num_unique_tokens: int
    rho_rollout_mean: float
    num_rollouts: int
    num_rollouts_defined: int
    entropy_mean: float
    entropy_mean_bits: float
    grad_norm_mean: float
    def __init__(self, num_tokens: _Optional[int] = ..., rho_pooled: _Optional[float] = ..., rho_pooled_status: _Optional[_Union[RhoStatus, str]] = ..., rho_unique: _Optional[float] = ..., rho_unique_status: _Optional[_Union[RhoStatus, str]] = ..., num_unique_tokens: _Optional[int] = ..., rho_rollout_mean: _Optional[float] = ..., num_rollouts: _Optional[int] = ..., num_rollouts_defined: _Optional[int] = ..., entropy_mean: _Optional[float] = ..., entropy_mean_bits: _Optional[float] = ..., grad_norm_mean: _Optional[float] = ...) -> None: ...

class ScoreResult(_message.Message):
    __slots__ = ("request_id", "config", "groups", "fingerprint", "backend", "logit_grad_fingerprint", "weights_version")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    LOGIT_GRAD_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    config: ScoreConfig
    groups: _containers.RepeatedCompositeFieldContainer[GroupResult]
    fingerprint: Fingerprint
    backend: str
    logit_grad_fingerprint: Fingerprint
    weights_version: str
    def __init__(self, request_id: _Optional[str] = ..., config: _Optional[_Union[ScoreConfig, _Mapping]] = ..., groups: _Optional[_Iterable[_Union[GroupResult, _Mapping]]] = ..., fingerprint: _Optional[_Union[Fingerprint, _Mapping]] = ..., backend: _Optional[str] = ..., logit_grad_fingerprint: _Optional[_Union[Fingerprint, _Mapping]] = ..., weights_version: _Optional[str] = ...) -> None: ...
