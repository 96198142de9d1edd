"""The ``corrpo.v1.RewardService`` handlers."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from google.protobuf.message import DecodeError, Message

from corrpo import wire
from corrpo.v1 import reward_service_pb2 as pb

from .batch import Limits, LogitsStream, Reducer, from_score_request
from .failure import invalid
from .observe import Metrics, alive_check, observed, settled

SERVICE = "corrpo.v1.RewardService"
_MAX_REQUEST_ID = 128


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
    if not value:
        raise invalid(f"{path} must be set: a client-chosen id that retries of the same request reuse")
    if len(value) > _MAX_REQUEST_ID:
        raise invalid(f"{path} has {len(value)} characters; at most {_MAX_REQUEST_ID} are allowed")
    return value


class RewardService:
    def __init__(self, reduce: Reducer, backend: str, limits: Limits, metrics: Metrics) -> None:
        self.reduce = reduce
        self.backend = backend
        self.limits = limits
        self.metrics = metrics

    def score(self, raw: bytes, context: grpc.ServicerContext) -> pb.ScoreResponse:
        with observed("Score", context, self.metrics) as record:
            request = _parse(pb.ScoreRequest, raw)
            record.request_id = _request_id(request.request_id, "request_id")
            config = wire.config_from_proto(request.config)
            batch = from_score_request(request, config, self.limits, self.reduce, alive_check(context))
            record.rollouts, record.tokens = len(batch.lengths), len(batch.entropy)
            scores = batch.score(config)
            return pb.ScoreResponse(result=wire.scores_to_proto(scores, record.request_id, self.backend))

    def score_logits_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.ScoreLogitsStreamResponse:
        with observed("ScoreLogitsStream", context, self.metrics) as record:
            alive = alive_check(context)
            first = next(requests, None)
            if first is None:
                settled(context)
                raise invalid("the stream is empty: send a header, then the logits blocks")
            message = _parse(pb.ScoreLogitsStreamRequest, first)
            if message.WhichOneof("message") != "header":
                raise invalid("the first message of a ScoreLogitsStream must be its header; got a block")
            header = message.header
            record.request_id = _request_id(header.request_id, "header.request_id")
            config = wire.config_from_proto(header.config, "header.config")
            stream = LogitsStream(header, config, self.limits, self.reduce)
            record.rollouts = len(stream.lengths)
            for raw in requests:
                alive()
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
            scores = stream.finish().score(config)
            return pb.ScoreLogitsStreamResponse(result=wire.scores_to_proto(scores, record.request_id, self.backend))

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Score": grpc.unary_unary_rpc_method_handler(
                    self.score, response_serializer=pb.ScoreResponse.SerializeToString
                ),
                "ScoreLogitsStream": grpc.stream_unary_rpc_method_handler(
                    self.score_logits_stream, response_serializer=pb.ScoreLogitsStreamResponse.SerializeToString
                ),
            },
        )
