"""Bearer-token authentication: every RPC but the health check needs
``authorization: Bearer <token>`` with one of the tokens of the server's token file. The
scheme is case-insensitive (RFC 7235: ``bearer`` and ``BEARER`` work too); the token is not."""

from __future__ import annotations

import hmac
import time
from pathlib import Path

import grpc

from .observe import Metrics, Record, finish

_EXEMPT = "/grpc.health.v1.Health/"


def read_tokens(path: Path) -> list[bytes]:
    """One token per non-empty line (several allow rotation without downtime)."""
    tokens = [line.strip().encode() for line in path.read_text().splitlines() if line.strip()]
    if not tokens:
        raise ValueError(f"the auth token file {path} holds no token")
    return tokens


def _credentials(value: bytes) -> tuple[bytes, bytes]:
    """The scheme and the token of an authorization value: ``<scheme> 1*SP <token>``."""
    scheme, _, token = value.strip(b" ").partition(b" ")
    return scheme, token.lstrip(b" ")


class TokenAuth(grpc.ServerInterceptor):
    def __init__(self, tokens: list[bytes], metrics: Metrics) -> None:
        self.expected = tokens
        self.metrics = metrics

    def _check(self, presented: bytes) -> str | None:
        """None for valid credentials, else why they are not."""
        if not presented:
            return "missing token"
        scheme, token = _credentials(presented)
        if scheme.lower() != b"bearer":
            return "unsupported authorization scheme (only Bearer is accepted)"
        # Compare against every token, without an early exit, in constant time each.
        if sum(hmac.compare_digest(token, t) for t in self.expected) > 0:
            return None
        return "invalid token"

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_EXEMPT):
            return handler
        presented = next((v for k, v in handler_call_details.invocation_metadata if k == "authorization"), "")
        reason = self._check(presented.encode() if isinstance(presented, str) else presented)
        if reason is None:
            return handler
        rpc = method.rsplit("/", 1)[-1]

        def refuse(_request, context: grpc.ServicerContext):
            start = time.perf_counter()
            message = f"{reason}: send metadata 'authorization: Bearer <token>'"
            record = Record(rpc=rpc, peer=context.peer(), status="UNAUTHENTICATED", message=message)
            finish(record, self.metrics, time.perf_counter() - start)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        # The refusal must read requests the way the real handler would.
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(refuse)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)
