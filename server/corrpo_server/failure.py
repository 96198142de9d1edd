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


#: Longest request id or weights version, in characters.
MAX_NAME = 128


def checked_name(value: str, path: str, purpose: str) -> str:
    """A client-chosen name (a request id, a weights version): set, and short. ``purpose``
    says in the error what the name is for."""
    if not value:
        raise invalid(f"{path} must be set: {purpose}")
    if len(value) > MAX_NAME:
        raise invalid(f"{path} has {len(value)} characters; at most {MAX_NAME} are allowed")
    return value
