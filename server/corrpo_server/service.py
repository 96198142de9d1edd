"""The ``corrpo.v1.RewardService`` handlers."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message

from corrpo import wire
from corrpo.scoring import ScoreConfig
from corrpo.v1 import reward_service_pb2 as pb

from .admission import PENDING, Admission, IdleLimited
from .batch import Limits, LogitsStream, Reducer, ScoredTokens, TokenScorer, from_score_request
from .failure import Failure, checked_name, invalid
from .model import PolicyModel, check_version
from .observe import Metrics, Record, alive_check, observed, settled

SERVICE = "corrpo.v1.RewardService"


def _parse(kind: type[Message], raw: bytes) -> Message:
    # Requests arrive as bytes and are parsed here, so that garbage is INVALID_ARGUMENT with
    # a reason rather than gRPC's generic deserialization failure.
    try:
        return kind.FromString(raw)
    except (DecodeError, RuntimeError) as err:
        raise invalid(f"the request is not a valid {kind.DESCRIPTOR.full_name}: {err}") from None


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(raw) and shift < 64:
        byte = raw[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
    return -1, pos


def block_view(raw: bytes) -> memoryview | None:
    """The logits of a serialized ScoreLogitsStreamRequest that is one plain block, as a view
    into the message (the protobuf parser would copy them twice); None for anything else,
    which then takes the parser's path."""
    # Tag of field 2 (block) then of field 1 (data), both length-delimited.
    if raw[:1] != b"\x12":
        return None
    outer, pos = _varint(raw, 1)
    if pos + outer != len(raw):
        return None
    if outer == 0:
        return memoryview(raw)[pos:]
    if raw[pos : pos + 1] != b"\x0a":
        return None
    inner, pos = _varint(raw, pos + 1)
    if pos + inner != len(raw):
        return None
    return memoryview(raw)[pos:]


def _request_id(value: str, path: str) -> str:
    return checked_name(value, path, "a client-chosen id that retries of the same request reuse")


#: How long a unary call's message may take to arrive before the call counts as an upload in
#: progress: a client sends the message right behind the call's headers.
_PROMPT_S = 0.05


def _loading(*_args: object, **_kwargs: object) -> None:
    raise Failure(grpc.StatusCode.UNAVAILABLE, "the model is still loading: health says SERVING once it is ready")


def _counted(model: PolicyModel, record: Record, expected_version: str | None) -> TokenScorer:
    """``model.score`` that first puts the rollouts and response tokens it is given in the
    request's log line, so that the line counts them however the call ends: model-backed
    work can run for minutes and end past its deadline."""

    def score_tokens(
        rollouts: list[tuple[np.ndarray, np.ndarray]], config: ScoreConfig, paths: list[str], alive: Callable[[], None]
    ) -> ScoredTokens:
        record.rollouts, record.tokens = len(rollouts), sum(len(response) for _, response in rollouts)
        return model.score(rollouts, config, paths, alive, expected_version=expected_version)

    return score_tokens


class RewardService:
    """``model``: the policy of a model-backed server, set once it has loaded;
    ``model_expected``: the server was started with --model (tokens wait for it);
    ``admission``: the calls it takes on (admission.py); ``idle_timeout_s``: how long a
    stream may send nothing."""

    def __init__(
        self,
        reduce: Reducer,
        backend: str,
        limits: Limits,
        metrics: Metrics,
        model_expected: bool,
        *,
        admission: Admission,
        idle_timeout_s: float,
    ) -> None:
        self.reduce = reduce
        self.backend = backend
        self.limits = limits
        self.metrics = metrics
        self.model: PolicyModel | None = None
        self.model_expected = model_expected
        self.admission = admission
        self.idle_timeout_s = idle_timeout_s

    def _message(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        """The one message of a unary call. The unary RPCs are registered as client streams
        (the same on the wire) so that corrpo, not a gRPC thread outside its admission, waits
        for it: a message that did not come with the call's headers makes the call an upload
        in progress, admitted like a stream (so stalled uploads cannot take the capacity
        fresh calls need) and ended after --stream-idle-timeout without a byte."""
        messages = IdleLimited(requests, self.idle_timeout_s, "send the request without pauses that long")
        try:
            raw = messages.poll(_PROMPT_S)
            if raw is PENDING:
                with self.admission.admitted(context.peer(), stream=True):
                    raw = next(messages, None)
            if raw is None:
                raise invalid("the call carried no request message")
            return raw
        except StopIteration:
            raise invalid("the call carried no request message") from None
        finally:
            messages.close()

    def score(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.ScoreResponse:
        with observed("Score", context, self.metrics) as record:
            raw = self._message(requests, context)
            with self.admission.admitted(context.peer(), stream=False), self.admission.working(alive_check(context)):
                return self._score(raw, record, context)

    def _score(self, raw: bytes, record: Record, context: grpc.ServicerContext) -> pb.ScoreResponse:
        request = _parse(pb.ScoreRequest, raw)
        record.request_id = _request_id(request.request_id, "request_id")
        config = wire.config_from_proto(request.config)
        score_tokens = _loading if self.model_expected else None
        if self.model is not None:
            expected = check_version(request.weights_version, "weights_version") if request.HasField("weights_version") else None
            score_tokens = _counted(self.model, record, expected)
        batch = from_score_request(request, config, self.limits, self.reduce, alive_check(context), score_tokens)
        record.rollouts, record.tokens = len(batch.lengths), len(batch.entropy)
        backend = self.model.backend if batch.weights_version is not None and self.model else self.backend
        return pb.ScoreResponse(result=wire.scores_to_proto(batch.score(), record.request_id, backend))

    def reload_weights(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.ReloadWeightsResponse:
        with observed("ReloadWeights", context, self.metrics) as record:
            raw = self._message(requests, context)
            with self.admission.admitted(context.peer(), stream=False):
                return self._reload(raw, record)

    def _reload(self, raw: bytes, record: Record) -> pb.ReloadWeightsResponse:
        request = _parse(pb.ReloadWeightsRequest, raw)
        if self.model is None:
            if self.model_expected:
                _loading()
            raise Failure(
                grpc.StatusCode.FAILED_PRECONDITION, "this server holds no model: start it with --model to reload weights"
            )
        version = check_version(request.weights_version, "weights_version")
        record.request_id = version
        if not request.path:
            raise invalid("path must be set: the weights to load, on the server's file system")
        seconds = self.model.reload(request.path, version)
        return pb.ReloadWeightsResponse(weights_version=version, load_seconds=seconds)

    def score_logits_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.ScoreLogitsStreamResponse:
        with (
            observed("ScoreLogitsStream", context, self.metrics) as record,
            self.admission.admitted(context.peer(), stream=True),
        ):
            alive = alive_check(context)
            messages = IdleLimited(requests, self.idle_timeout_s)
            try:
                first = next(messages, None)
                if first is None:
                    settled(context)
                    raise invalid("the stream is empty: send a header, then the logits blocks")
                with self.admission.working(alive):
                    message = _parse(pb.ScoreLogitsStreamRequest, first)
                    if message.WhichOneof("message") != "header":
                        raise invalid("the first message of a ScoreLogitsStream must be its header; got a block")
                    header = message.header
                    record.request_id = _request_id(header.request_id, "header.request_id")
                    config = wire.config_from_proto(header.config, "header.config")
                    stream = LogitsStream(header, config, self.limits, self.reduce)
                record.rollouts = len(stream.lengths)
                # A worker is held while a block is reduced, never while the next is awaited.
                for raw in messages:
                    alive()
                    with self.admission.working(alive):
                        data = block_view(raw)
                        if data is None:
                            message = _parse(pb.ScoreLogitsStreamRequest, raw)
                            if message.WhichOneof("message") != "block":
                                raise invalid(
                                    f"message {stream.blocks + 1} of the stream is not a logits block; only the first is a header"
                                )
                            data = message.block.data
                        self.metrics.logits_bytes.inc(len(data))
                        stream.add(data)
                    record.tokens = stream.filled
                if stream.filled < stream.total:
                    settled(context)
                with self.admission.working(alive):
                    scores = stream.finish().score()
                    return pb.ScoreLogitsStreamResponse(result=wire.scores_to_proto(scores, record.request_id, self.backend))
            finally:
                messages.close()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                # The unary RPCs as client streams: the same on the wire, read by _message.
                "Score": grpc.stream_unary_rpc_method_handler(
                    self.score, response_serializer=pb.ScoreResponse.SerializeToString
                ),
                "ScoreLogitsStream": grpc.stream_unary_rpc_method_handler(
                    self.score_logits_stream, response_serializer=pb.ScoreLogitsStreamResponse.SerializeToString
                ),
                "ReloadWeights": grpc.stream_unary_rpc_method_handler(
                    self.reload_weights, response_serializer=pb.ReloadWeightsResponse.SerializeToString
                ),
            },
        )
