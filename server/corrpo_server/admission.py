"""Which calls the server takes on, and how long a stream may keep one waiting.

gRPC's own ``maximum_concurrent_rpcs`` counts every call of the server, health checks
included, and refuses them alike once clients that stall fill it: a probe would then kill a
healthy replica. corrpo counts its own calls instead, per kind:

- at most ``max_calls`` RewardService calls at once (``--max-concurrent-rpcs``); more are
  refused at once with RESOURCE_EXHAUSTED. Health checks are not counted, and are answered
  on threads of their own (app.py);
- of those, at most ``max_streams`` calls whose messages are still arriving
  (``--max-concurrent-streams``): ScoreLogitsStream calls, and unary calls whose one
  message did not arrive with their headers (service.py reads those itself, so that a
  stalled upload waits here and not in a gRPC thread); at most ``max_streams_per_peer`` of
  them from one client host (``--max-streams-per-peer``, 0: no such limit). The calls left
  over are capacity that stalled clients cannot take from a fresh Score;
- at most ``workers`` calls compute at once (``--workers``): decoding, reducing logits,
  scoring. A stream waiting for its next block holds no worker;
- a call that sends nothing for ``--stream-idle-timeout`` seconds while corrpo waits for a
  message is ended with DEADLINE_EXCEEDED, which frees its slot.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from .failure import Failure, too_large


def peer_host(peer: str) -> str:
    """The client host of a gRPC peer string: ``ipv4:10.0.0.7:5123`` -> ``ipv4:10.0.0.7``,
    ``ipv6:[::1]:5123`` -> ``ipv6:[::1]``; anything else (``unix:...``) as it is."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in address:
        return f"{kind}:{address.rsplit(':', 1)[0]}"
    return peer


class Admission:
    """Counts the RewardService calls in progress and refuses those past the limits."""

    def __init__(self, max_calls: int, max_streams: int, max_streams_per_peer: int, workers: int) -> None:
        self.max_calls = max_calls
        self.max_streams = max_streams
        self.max_streams_per_peer = max_streams_per_peer
        self._lock = threading.Lock()
        self._calls = 0
        self._streams: Counter[str] = Counter()
        self._workers = threading.BoundedSemaphore(workers)

    @contextmanager
    def admitted(self, peer: str, stream: bool) -> Iterator[None]:
        """Holds a slot for one call (a stream slot too for a stream) while it runs, or
        raises RESOURCE_EXHAUSTED saying which limit is full."""
        host = peer_host(peer)
        with self._lock:
            if self._calls >= self.max_calls:
                raise too_large(
                    f"the server is serving {self._calls} requests, its limit (--max-concurrent-rpcs "
                    f"{self.max_calls}): retry later"
                )
            if stream:
                streams = sum(self._streams.values())
                if streams >= self.max_streams:
                    raise too_large(
                        f"the server holds {streams} logits streams and uploads in progress, its limit "
                        f"(--max-concurrent-streams {self.max_streams}; calls that arrive whole are still served): retry later"
                    )
                if self.max_streams_per_peer and self._streams[host] >= self.max_streams_per_peer:
                    raise too_large(
                        f"this client ({host}) holds {self._streams[host]} logits streams, the server's limit per "
                        f"client (--max-streams-per-peer {self.max_streams_per_peer}): retry once one has ended"
                    )
                self._streams[host] += 1
            self._calls += 1
        try:
            yield
        finally:
            with self._lock:
                self._calls -= 1
                if stream:
                    self._streams[host] -= 1
                    if not self._streams[host]:
                        del self._streams[host]

    @contextmanager
    def working(self, alive: Callable[[], None]) -> Iterator[None]:
        """Holds one of the workers while the block runs; waits for one while the client is
        still there (``alive`` raises once it has gone)."""
        while not self._workers.acquire(timeout=0.05):
            alive()
        try:
            yield
        finally:
            self._workers.release()


_END = object()
#: IdleLimited.poll's answer while the next message has not arrived.
PENDING = object()


class IdleLimited:
    """The messages of a client stream, ended with DEADLINE_EXCEEDED once none has arrived
    for ``timeout_s`` seconds while the handler waited for one.

    gRPC's request iterator blocks without a timeout, so a reader thread receives the
    messages and hands them over one at a time: besides the one being reduced, the stream
    holds at most the one handed over and the one the reader has in hand. ``close()`` (when
    the call ends) lets the reader go; it ends by itself once gRPC ends the call.
    """

    def __init__(self, requests: Iterator[Any], timeout_s: float, advice: str = "send the header and then the blocks without pauses that long") -> None:
        self._requests = requests
        self.timeout_s = timeout_s
        self.advice = advice
        self._handover: queue.Queue = queue.Queue(maxsize=1)
        self._closed = threading.Event()
        self._ended = False
        threading.Thread(target=self._read, name="corrpo-stream-reader", daemon=True).start()

    def _read(self) -> None:
        try:
            for message in self._requests:
                if not self._put((message, None)):
                    return
            self._put((_END, None))
        except Exception as err:  # noqa: BLE001 - handed to the handler, which maps it to a status
            # The client cancelled, or its deadline passed (grpc.RpcError).
            self._put((None, err))

    def _put(self, item: tuple[Any, BaseException | None]) -> bool:
        while not self._closed.is_set():
            try:
                self._handover.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> IdleLimited:
        return self

    def __next__(self) -> Any:
        message = self.poll(self.timeout_s)
        if message is PENDING:
            raise Failure(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no message arrived for {self.timeout_s:g} s (the server's --stream-idle-timeout), so the call "
                f"was ended: {self.advice}",
            )
        return message

    def poll(self, timeout_s: float) -> Any:
        """The next message if one arrives within ``timeout_s``, else PENDING; StopIteration
        once the client has sent its last."""
        if self._ended:
            raise StopIteration
        try:
            message, err = self._handover.get(timeout=timeout_s)
        except queue.Empty:
            return PENDING
        if err is not None:
            raise err
        if message is _END:
            self._ended = True  # the reader has gone: a later next() must not wait for it
            raise StopIteration
        return message

    def close(self) -> None:
        self._closed.set()
