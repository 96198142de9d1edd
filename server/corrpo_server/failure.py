"""The status a request ends with when it cannot be answered."""

from __future__ import annotations

import grpc


class Failure(Exception):
    """Ends the request with ``code`` and ``message`` (sent to the client as they are)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> Failure:
    return Failure(grpc.StatusCode.INVALID_ARGUMENT, message)


def too_large(message: str) -> Failure:
    return Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
