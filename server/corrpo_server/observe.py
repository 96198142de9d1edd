"""What the server tells its operators: one JSON log line per request, Prometheus metrics,
and the gRPC status every request ends with (never UNKNOWN, never a stack trace)."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TextIO

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

import corrpo
from corrpo.errors import shorten

from .failure import Failure

log = logging.getLogger("corrpo_server")
_DEADLINE_SLACK_S = 0.1
#: Longest status message, in UTF-8 bytes: far below gRPC's metadata limit (8-16 KiB), which
#: a message quoting a large input (a path, a shape) would pass, turning the status into a
#: transport error on the client.
MAX_DETAILS = 512


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "level": record.levelname.lower(), "event": record.getMessage()}
        line.update(getattr(record, "fields", {}))
        return json.dumps(line)


class _StderrAsLog(io.TextIOBase):
    """The process's ``sys.stderr`` while it serves: what libraries write there (tqdm's bars
    while a GGUF model is dequantized, warnings, transformers' log) becomes ``stderr`` log
    lines, one per line of text, so that the server's stderr stays JSON lines. A progress
    bar redraws itself after a carriage return; only what a terminal would show last is
    kept, so a finished bar is one line and a running one never grows the buffer."""

    def __init__(self, real: TextIO) -> None:
        super().__init__()
        self.real = real
        self._pending = ""
        self._lock = threading.Lock()
        self._inside = threading.local()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        # For what writes below Python (faulthandler, native code): the real stderr.
        return self.real.fileno()

    def write(self, text: str) -> int:
        if getattr(self._inside, "yes", False):
            # The log handler itself failed and is reporting it: a line to stderr as it is.
            return self.real.write(text)
        with self._lock:
            *lines, rest = (self._pending + text).split("\n")
            self._pending = _shown(rest)
        self._inside.yes = True
        try:
            for line in lines:
                shown = _shown(line).strip()
                if shown:
                    event("stderr", text=shown)
        finally:
            self._inside.yes = False
        return len(text)


def _shown(line: str) -> str:
    """What a terminal shows of a line that carriage returns redraw: the text after the last
    one (a line ending in CR LF is whole)."""
    return line.rstrip("\r").rsplit("\r", 1)[-1]


def setup_logging(level: str) -> None:
    """The server's log: JSON lines on stderr, and only those (``_StderrAsLog``)."""
    real = sys.stderr.real if isinstance(sys.stderr, _StderrAsLog) else sys.stderr
    handler = logging.StreamHandler(real)
    handler.setFormatter(_JsonLines())
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
    sys.stderr = _StderrAsLog(real)


def event(name: str, level: int = logging.INFO, **fields: object) -> None:
    log.log(level, name, extra={"fields": fields})


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "corrpo_requests", "Requests by RPC and final status code.", ["rpc", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "corrpo_request_duration_seconds",
            "Time from the start of a request to its status.",
            ["rpc"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.tokens = Counter("corrpo_tokens_scored", "Tokens scored, by RPC.", ["rpc"], registry=self.registry)
        self.logits_bytes = Counter(
            "corrpo_logits_bytes_received", "Bytes of logits blocks received by streams.", registry=self.registry
        )
        self.in_flight = Gauge("corrpo_requests_in_flight", "Requests being served.", ["rpc"], registry=self.registry)


@dataclass
class Record:
    """One request's log line. ``rollouts`` and ``tokens``: those scored; for a tokens payload,
    set as the model is handed the work (its response tokens), so that a call that ends
    early, past its deadline say, still says how much it was asked to do."""

    rpc: str
    peer: str
    request_id: str = ""
    rollouts: int = 0
    tokens: int = 0
    status: str = "OK"
    ms: float = 0.0
    message: str = ""


class Stopped(Exception):
    """The client cancelled or its deadline passed: stop working on its request."""


def alive_check(context: grpc.ServicerContext):
    def alive() -> None:
        if not context.is_active():
            raise Stopped()

    return alive


def settled(context: grpc.ServicerContext, wait_s: float = 0.2) -> None:
    """Raises Stopped if the call turns out to be cancelled within ``wait_s``. A cancelled
    client stream can end its request iterator a moment before the call reads as
    cancelled; a stream that ended short waits this long before being called malformed."""
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        if not context.is_active():
            raise Stopped()
        time.sleep(0.005)


def _outcome(err: BaseException | None, context: grpc.ServicerContext, record: Record) -> tuple[grpc.StatusCode, str]:
    """The status a request ends with; every message, whatever raised it, is shortened here."""
    code, message = _status(err, context, record)
    return code, shorten(message, MAX_DETAILS)


def _status(err: BaseException | None, context: grpc.ServicerContext, record: Record) -> tuple[grpc.StatusCode, str]:
    if err is None:
        return grpc.StatusCode.OK, ""
    if isinstance(err, Failure):
        return err.code, err.message
    if isinstance(err, corrpo.CorrpoError):
        return grpc.StatusCode.INVALID_ARGUMENT, err.message
    if isinstance(err, (Stopped, grpc.RpcError)):
        # Raised when the client has gone: a cancelled call, or one past its deadline. A client
        # whose own deadline fires cancels the call a few ms before the server's copy expires.
        remaining = context.time_remaining()
        if remaining is not None and remaining < _DEADLINE_SLACK_S:
            return grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the request was scored"
        return grpc.StatusCode.CANCELLED, "the client cancelled the request"
    event(
        "internal_error",
        logging.ERROR,
        request_id=record.request_id,
        rpc=record.rpc,
        traceback="".join(traceback.format_exception(err)),
    )
    return grpc.StatusCode.INTERNAL, f"internal error while scoring request {record.request_id!r}; see the server log"


@contextmanager
def observed(rpc: str, context: grpc.ServicerContext, metrics: Metrics) -> Iterator[Record]:
    """Serves one request: yields its log record, then logs it, counts it and ends the call
    with the status its outcome maps to (``context.abort`` unless it succeeded)."""
    record = Record(rpc=rpc, peer=context.peer())
    start = time.perf_counter()
    metrics.in_flight.labels(rpc).inc()
    err: BaseException | None = None
    try:
        yield record
    except Exception as caught:  # noqa: BLE001 - every failure becomes a status, never UNKNOWN
        err = caught
    finally:
        metrics.in_flight.labels(rpc).dec()
    code, message = _outcome(err, context, record)
    elapsed = time.perf_counter() - start
    record.status, record.message, record.ms = code.name, message, round(elapsed * 1e3, 3)
    finish(record, metrics, elapsed)
    if code is not grpc.StatusCode.OK:
        context.abort(code, message)


def finish(record: Record, metrics: Metrics, elapsed: float) -> None:
    metrics.requests.labels(record.rpc, record.status).inc()
    metrics.latency.labels(record.rpc).observe(elapsed)
    if record.status == "OK":
        metrics.tokens.labels(record.rpc).inc(record.tokens)
    fields = asdict(record)
    if not record.message:
        del fields["message"]
    event("request", **fields)
