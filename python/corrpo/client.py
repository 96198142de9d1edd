"""gRPC clients of corrpo's reward server (``pip install '.[grpc]' in the corrpo checkout``).

    from corrpo.client import RewardClient

    with RewardClient("127.0.0.1:50051") as client:
        scores = client.score(logits=[...], token_ids=[...], rewards=[...], group_sizes=[4, 4])
    scores.rewards, scores.advantages, scores.rho, scores.fingerprint

Given logits, the client reduces them to per-token statistics locally with corrpo's
kernels (the native core, or the Triton kernels for CUDA tensors) and sends ~12 bytes per
token (the default); ``send="logits"`` streams the logits
themselves in blocks for the server to reduce. Several targets are balanced round-robin by
gRPC, and UNAVAILABLE is retried (requests are idempotent, so retries are safe).
"""

from __future__ import annotations

import asyncio
import difflib
import inspect
import ipaddress
import json
import socket
import time
import uuid
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import payloads, wire
from ._arrays import group_sizes_vector, vector
from .errors import ConfigError, ShapeError
from .scoring import ScoreConfig, Scores
from .v1 import reward_service_pb2 as pb
from .v1 import reward_service_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
SERVICE = "corrpo.v1.RewardService"


# gRPC's own target schemes (name resolvers), passed to gRPC unchanged.
_GRPC_SCHEMES = ("dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds")
# URL schemes people paste from other tools, and the TLS each implies.
_URL_TLS = {"http": False, "grpc": False, "https": True, "grpcs": True}


def _split_target(target: str) -> tuple[str, bool | None]:
    """``target`` as gRPC reads it, and the TLS its URL scheme implies (None: it names none).

    ``host:port`` and gRPC URIs (``dns:///name:port``, ``unix:/path``, ``ipv4:a:p,b:p``) pass
    unchanged. ``http://`` and ``grpc://`` are stripped and mean no TLS; ``https://`` and
    ``grpcs://`` are stripped and mean TLS. gRPC targets have no path, and a port left out
    is better asked for than guessed, so a URL with a path or without a port is refused, as
    is any other scheme.
    """
    if not isinstance(target, str) or not target:
        raise ConfigError(f"a target must be a non-empty 'host:port' string, got {target!r}", field="targets")
    scheme, sep, rest = target.partition("://")
    if not sep:
        return target, None
    scheme = scheme.lower()
    if scheme in _GRPC_SCHEMES:
        return target, None
    if scheme not in _URL_TLS:
        raise ConfigError(
            f"target {target!r}: unknown scheme {scheme}://; give host:port, or http://, grpc:// (no TLS), https://, "
            f"grpcs:// (TLS) before it, or a gRPC URI ({', '.join(s + ':' for s in _GRPC_SCHEMES)})",
            field="targets",
        )
    address = rest[:-1] if rest.endswith("/") else rest
    host, colon, port = address.rpartition(":")
    if "/" in address or not colon or not host or not port.isdigit() or (":" in host and not host.startswith("[")):
        raise ConfigError(
            f"target {target!r}: after {scheme}:// gRPC needs host:port and nothing else (no path), "
            f"e.g. {scheme}://127.0.0.1:50051",
            field="targets",
        )
    return address, _URL_TLS[scheme]


def _implied_tls(targets: str | Sequence[str]) -> bool | None:
    """The TLS the targets' URL schemes imply (None: none names any); a mix is refused."""
    listed = [targets] if isinstance(targets, str) else list(targets)
    implied = {tls for tls in (_split_target(t)[1] for t in listed) if tls is not None}
    if len(implied) > 1:
        raise ConfigError(f"targets {listed} mix TLS (https://, grpcs://) and plaintext (http://, grpc://)", field="targets")
    return implied.pop() if implied else None


def _resolve(target: str) -> str:
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        return target
    except ValueError:
        family, *_, sockaddr = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
        return f"[{sockaddr[0]}]:{port}" if family == socket.AF_INET6 else f"{sockaddr[0]}:{port}"


def channel_target(targets: str | Sequence[str]) -> str:
    """One gRPC target for one or several servers. One target is passed as it is (any gRPC
    URI, e.g. ``dns:///rewards.internal:50051`` for DNS round-robin); several ``host:port``
    become an ``ipv4:``/``ipv6:`` address list that gRPC balances over. A URL prefix
    (``http://``, ``https://``, ``grpc://``, ``grpcs://``) is stripped first."""
    if isinstance(targets, str):
        return _split_target(targets)[0]
    if not targets:
        raise ValueError("no target given")
    stripped = [_split_target(t)[0] for t in targets]
    if len(stripped) == 1:
        return stripped[0]
    addresses = [_resolve(t) for t in stripped]
    if all(a.startswith("[") for a in addresses):
        return "ipv6:" + ",".join(addresses)
    if any(a.startswith("[") for a in addresses):
        raise ValueError(f"cannot balance over a mix of IPv4 and IPv6 addresses: {addresses}")
    return "ipv4:" + ",".join(addresses)


def service_config(max_attempts: int) -> str:
    """round_robin over every resolved address; UNAVAILABLE retried with backoff (gRPC takes
    a retry policy only for 2 attempts or more)."""
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    method: dict[str, Any] = {"name": [{"service": SERVICE}]}
    if max_attempts > 1:
        method["retryPolicy"] = {
            "maxAttempts": max_attempts,
            "initialBackoff": "0.05s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [method]})


def _pem(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


@dataclass(frozen=True)
class _Channel:
    target: str
    credentials: grpc.ChannelCredentials | None
    options: list[tuple[str, Any]]
    metadata: tuple[tuple[str, str], ...]
    #: The targets as the user gave them, for messages.
    given: str


def _channel(
    targets: str | Sequence[str],
    tls: bool,
    root_certificates: bytes | str | Path | None,
    client_certificate: bytes | str | Path | None,
    client_key: bytes | str | Path | None,
    server_name: str | None,
    token: str | None,
    max_attempts: int,
    max_message_bytes: int,
) -> _Channel:
    if (client_certificate is None) != (client_key is None):
        raise ValueError("mutual TLS needs both client_certificate and client_key")
    secure = tls or root_certificates is not None or client_certificate is not None
    implied = _implied_tls(targets)
    if implied is False and secure:
        raise ConfigError(
            f"target {targets!r} says plaintext (http://, grpc://), but TLS was asked for (tls, root_certificates or "
            "client_certificate): write https://host:port, or host:port alone",
            field="targets",
        )
    secure = secure or bool(implied)
    credentials = None
    if secure:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_pem(root_certificates),
            private_key=_pem(client_key),
            certificate_chain=_pem(client_certificate),
        )
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", service_config(max_attempts)),
        ("grpc.enable_retries", 1),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Unary requests up to this size stay replayable for retries.
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        ("grpc.retry_buffer_size", 4 * max_message_bytes),
    ]
    if server_name is not None:
        options.append(("grpc.ssl_target_name_override", server_name))
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    given = targets if isinstance(targets, str) else ", ".join(targets)
    return _Channel(channel_target(targets), credentials, options, metadata, given)


#: The deadline of a call, in seconds, while the client's timeout is "auto" (its default).
AUTO_TIMEOUT_S = 60.0
#: What "auto" adds per response token of a tokens payload, each of which costs a
#: model-backed server a forward and a backward pass through its model: 64 tokens of
#: SmolLM2-135M took 138 s on a 2-core CPU (2.2 s a token); twice that leaves room for slower
#: CPUs. A GPU takes a small fraction of this.
AUTO_TIMEOUT_S_PER_MODEL_TOKEN = 4.0


def _checked_timeout(timeout: Any) -> float | str | None:
    if timeout is None or timeout == "auto":
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ConfigError(f"timeout must be a number of seconds > 0, None (no deadline) or 'auto', got {timeout!r}", field="timeout")
    return float(timeout)


def _deadline(timeout: float | str | None, prepared: _Prepared) -> float | None:
    """The seconds a Score call may take: ``timeout`` as given, or for "auto",
    AUTO_TIMEOUT_S plus AUTO_TIMEOUT_S_PER_MODEL_TOKEN per token a server's model scores."""
    if timeout != "auto":
        return timeout
    return AUTO_TIMEOUT_S + AUTO_TIMEOUT_S_PER_MODEL_TOKEN * prepared.model_tokens


class ScoreDeadlineError(TimeoutError, grpc.RpcError):
    """A Score call passed the client's deadline (DEADLINE_EXCEEDED): the message says what
    the request held, how long such work takes, and how to pass a longer ``timeout=``.

    Also a ``grpc.RpcError`` whose ``code()`` is DEADLINE_EXCEEDED and ``details()`` gRPC's
    own words, so code that catches those keeps working. ``rpc``: the call;
    ``timeout``: the deadline in seconds; ``kind``: the payload kind; ``model_tokens``: the
    tokens the server's model scores (tokens payloads, else 0).
    """

    def __init__(self, rpc: str, target: str, timeout: float, prepared: _Prepared, details: str) -> None:
        if prepared.kind == payloads.tokens.NAME:
            work = (
                f"scoring a tokens payload of {prepared.model_tokens} response tokens, each a forward and backward "
                "pass through the server's model: 64 tokens of SmolLM2-135M took 138 s on a 2-core CPU, a GPU takes "
                "a fraction of that"
            )
        else:
            work = f"scoring a {prepared.kind} payload"
        super().__init__(
            f"{rpc} to the corrpo-server at {target} passed its deadline of {timeout:g} s (DEADLINE_EXCEEDED: "
            f"{details}) while {work}. "
            "Give it more time with timeout= in seconds: RewardClient(target, timeout=600) for every call, or "
            "client.score(..., timeout=600) for this one; timeout=None waits without a deadline, and timeout='auto' "
            f"(the default) allows {AUTO_TIMEOUT_S:g} s plus {AUTO_TIMEOUT_S_PER_MODEL_TOKEN:g} s per response token "
            "of a tokens payload"
        )
        self.rpc, self.target, self.timeout = rpc, target, timeout
        self.kind, self.model_tokens = prepared.kind, prepared.model_tokens
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return self._details


class ServerUnavailableError(ConnectionError, grpc.RpcError):
    """A call got UNAVAILABLE after the client's retries: no corrpo-server could be reached
    at the target (nothing listening there, a wrong host or port, TLS on one side only, a
    name that does not resolve), or the server itself refused new work (still loading its
    model, draining).

    Also a ``grpc.RpcError`` whose ``code()`` is UNAVAILABLE and ``details()`` gRPC's own
    words, so code that catches those keeps working. ``target``: the target as given;
    ``rpc``: the call that failed.
    """

    def __init__(self, rpc: str, target: str, tls: bool, details: str) -> None:
        super().__init__(
            f"{rpc} to the corrpo-server at {target} failed: UNAVAILABLE: {details}. Check that a server is running "
            "there (corrpo-server serve listens on 127.0.0.1:50051 unless given --host and --port; --host 0.0.0.0 "
            "to be reached from other machines), that host and port are right, and that TLS matches on both sides "
            f"(this client uses {'TLS' if tls else 'no TLS'}; the server uses TLS only when started with --tls-cert)"
        )
        self.rpc, self.target, self._details = rpc, target, details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details


def _group_sizes(n: int, group_sizes: Sequence[int] | int | None) -> list[int]:
    """Rollouts per group. Advantages are normalised within each group, so several rollouts
    without ``group_sizes`` are refused rather than silently scored as one group."""
    if group_sizes is None:
        if n > 1:
            raise ConfigError(
                f"`group_sizes` is missing: {n} rollouts need their grouping, since advantages are normalised "
                "within each group; pass rollouts per group, one int for equal groups (group_sizes=8: groups of 8 "
                f"in order) or a list (group_sizes=[4, 4]); group_sizes={n} scores them all as one group",
                field="group_sizes",
            )
        return [n]
    sizes = [int(s) for s in group_sizes_vector(group_sizes, n)]
    if sum(sizes) != n or any(s <= 0 for s in sizes):
        raise ShapeError(f"group_sizes {sizes} must be positive and add up to the {n} rollouts", field="group_sizes")
    return sizes


@dataclass
class _Prepared:
    """A request ready to send: unary, or a stream whose messages are made on demand.
    ``kind``: its payload kind; ``model_tokens``: the response tokens a model-backed
    server scores (tokens payloads), which set its default deadline."""

    request_id: str
    kind: str
    model_tokens: int = 0
    unary: pb.ScoreRequest | None = None
    header: pb.LogitsStreamHeader | None = None
    logits: list[np.ndarray] | None = None
    block_bytes: int = 0

    def stream(self) -> Iterator[pb.ScoreLogitsStreamRequest]:
        yield pb.ScoreLogitsStreamRequest(header=self.header)
        row_bytes = self.logits[0].shape[1] * self.logits[0].itemsize
        per_block = max(1, self.block_bytes // row_bytes)
        pending: list[np.ndarray] = []
        rows = 0
        for array in self.logits:
            start = 0
            while start < len(array):
                take = min(per_block - rows, len(array) - start)
                pending.append(array[start : start + take])
                rows, start = rows + take, start + take
                if rows == per_block:
                    yield _block(pending)
                    pending, rows = [], 0
        if pending:
            yield _block(pending)


def _block(chunks: list[np.ndarray]) -> pb.ScoreLogitsStreamRequest:
    data = b"".join(memoryview(np.ascontiguousarray(c)).cast("B") for c in chunks)
    return pb.ScoreLogitsStreamRequest(block=pb.LogitsBlock(data=data))


def prepare(
    *,
    logits: Sequence[Any] | None = None,
    token_ids: Sequence[Any] | None = None,
    entropy: Sequence[Any] | None = None,
    grad_norm: Sequence[Any] | None = None,
    strength: Sequence[Any] | None = None,
    prompt_ids: Sequence[Any] | None = None,
    logprob: Sequence[Any] | None = None,
    top_logprobs: Sequence[Any] | None = None,
    top_token_ids: Sequence[Any] | None = None,
    vocab_size: int | None = None,
    rewards: Sequence[float] | None = None,
    group_sizes: Sequence[int] | int | None = None,
    send: str = "stats",
    block_bytes: int = 4 << 20,
    request_id: str | None = None,
    weights_version: str | None = None,
    config: ScoreConfig,
) -> _Prepared:
    """Builds the request of ``RewardClient.score`` (see there): picks the payload kind's
    module (corrpo.payloads), which checks and packs its fields, and lays its rollouts out
    in groups with their rewards."""
    given = {
        name: value
        for name, value in (
            ("logits", logits),
            ("token_ids", token_ids),
            ("entropy", entropy),
            ("grad_norm", grad_norm),
            ("strength", strength),
            ("prompt_ids", prompt_ids),
            ("logprob", logprob),
            ("top_logprobs", top_logprobs),
            ("top_token_ids", top_token_ids),
            ("vocab_size", vocab_size),
        )
        if value is not None
    }
    kind = payloads.kind_of(given)
    if weights_version is not None and kind is not payloads.tokens:
        raise ConfigError(
            f"weights_version applies to tokens payloads (prompt_ids and token_ids), not {kind.NAME} payloads",
            field="weights_version",
        )
    if send not in ("stats", "logits"):
        raise ConfigError(f"send must be 'stats' or 'logits', got {send!r}", field="send")
    if send == "logits" and kind is not payloads.logits:
        raise ConfigError(f"send='logits' streams logits: it needs a logits payload, not a {kind.NAME} payload", field="send")
    payload = kind.check(given, config)
    n = len(payload[kind.KEY])
    sizes = _group_sizes(n, group_sizes)
    reward_list = None if rewards is None else [float(r) for r in vector(rewards, np.float64, "rewards")]
    if reward_list is not None and len(reward_list) != n:
        raise ShapeError(f"{len(reward_list)} rewards for {n} rollouts", field="rewards")
    request_id = request_id or uuid.uuid4().hex

    if send == "logits":
        header, arrays = payloads.logits.stream(payload, config, request_id)
        it = iter(zip(arrays, reward_list or [None] * n))
        for size in sizes:
            group = header.groups.add()
            for _ in range(size):
                array, reward = next(it)
                layout = group.rollouts.add(num_tokens=len(array))
                if reward is not None:
                    layout.reward = reward
        return _Prepared(request_id, kind.NAME, header=header, logits=arrays, block_bytes=block_bytes)

    rollouts = kind.rollouts(payload, config)
    if reward_list is not None:
        for rollout, reward in zip(rollouts, reward_list):
            rollout.reward = reward
    request = pb.ScoreRequest(request_id=request_id, config=wire.config_to_proto(config), weights_version=weights_version)
    it = iter(rollouts)
    for size in sizes:
        request.groups.add().rollouts.extend(next(it) for _ in range(size))
    model_tokens = payloads.tokens.response_tokens(rollouts) if kind is payloads.tokens else 0
    return _Prepared(request_id, kind.NAME, model_tokens=model_tokens, unary=request)


_SCORE_DOC = """Scores rollouts through the server: rho per rollout, CorR-PO rewards and
        advantages, and the batch fingerprint, in request order.

        Give one array per rollout of exactly one kind:
          logits [T_i, V] (NumPy, ml_dtypes.bfloat16 or torch; CUDA tensors are reduced on
            their GPU by corrpo's Triton kernels) with token_ids [T_i];
          entropy and grad_norm [T_i] (optionally logprob and token_ids) from corrpo.token_stats;
            for another measure (measure="l1_mean", ...), entropy and strength [T_i] from
            corrpo.gradients, and grad_norm too for the comparison figures of logit_grad;
          top_logprobs [T_i, k] with top_token_ids, logprob, token_ids and vocab_size;
          prompt_ids [P_i] with token_ids [T_i] (the response): a server started with
            --model scores them with its own policy (default measure "l1_mean", the paper's,
            by estimator "local"); weights_version: the weights the server must hold.
        rewards: per rollout (verifier), or None for verifier-free training.
        group_sizes: rollouts per group: a list, or one int for equal groups in order
            (group_sizes=8: groups of 8). Needed with more than one rollout, since advantages
            are normalised within each group.
        send: with logits, "stats" reduces them here (about 12 bytes per token on the wire),
            "logits" streams them in blocks of block_bytes for the server to reduce.
        request_id: the same id and request give the same answer; default a fresh UUID.
        timeout: seconds for this call, None for no deadline, or "auto" (default: the
            client's; see RewardClient).
        settings: method, min_tokens, temperature, coef, gate, threshold, advantage,
            top_k_estimate, measure, estimator, objective, estimator_k, estimator_seed
            (see corrpo.ScoreConfig); the scores echo the values used."""


def _refuse_unknown(where: str, given: Iterable[str], allowed: Collection[str]) -> None:
    """The TypeError Python raises for an unknown keyword, naming the public call (the
    keywords travel through **kwargs to internal functions) and the nearest known one."""
    for name in given:
        if name not in allowed:
            close = difflib.get_close_matches(name, sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{where} got an unexpected keyword argument {name!r}{hint}")


class _Client:
    def __init__(
        self,
        targets: str | Sequence[str] = DEFAULT_TARGET,
        *,
        tls: bool = False,
        root_certificates: bytes | str | Path | None = None,
        client_certificate: bytes | str | Path | None = None,
        client_key: bytes | str | Path | None = None,
        server_name: str | None = None,
        token: str | None = None,
        timeout: float | str | None = "auto",
        max_attempts: int = 5,
        max_message_bytes: int = 64 << 20,
        block_bytes: int = 4 << 20,
    ) -> None:
        self._spec = _channel(
            targets,
            tls,
            root_certificates,
            client_certificate,
            client_key,
            server_name,
            token,
            max_attempts,
            max_message_bytes,
        )
        self.timeout = _checked_timeout(timeout)
        self.max_attempts = max_attempts
        self.block_bytes = block_bytes

    def _prepare(self, kwargs: dict[str, Any]) -> tuple[_Prepared, float | None]:
        _refuse_unknown(f"{type(self).__name__}.score()", kwargs, _SCORE_KEYWORDS)
        timeout = _checked_timeout(kwargs.pop("timeout", self.timeout))
        config = ScoreConfig(**{f.name: kwargs.pop(f.name) for f in fields(ScoreConfig) if f.name in kwargs})
        kwargs.setdefault("block_bytes", self.block_bytes)
        prepared = prepare(config=config, **kwargs)
        return prepared, _deadline(timeout, prepared)

    def _reload_timeout(self, timeout: float | None) -> float | None:
        timeout = self.timeout if timeout is None else _checked_timeout(timeout)
        return AUTO_TIMEOUT_S if timeout == "auto" else timeout

    def _backoff(self, attempt: int) -> float:
        return min(2.0, 0.05 * 2**attempt)

    @contextmanager
    def _reaching(self, rpc: str) -> Iterator[None]:
        """UNAVAILABLE, once the retries are spent, as a ServerUnavailableError that names
        the target and what to check."""
        try:
            yield
        except grpc.RpcError as err:
            if isinstance(err, ServerUnavailableError) or err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            raise ServerUnavailableError(rpc, self._spec.given, self._spec.credentials is not None, err.details()) from err

    @contextmanager
    def _in_time(self, rpc: str, timeout: float | None, prepared: _Prepared) -> Iterator[None]:
        """DEADLINE_EXCEEDED once this client's deadline has passed as a ScoreDeadlineError
        that says how long the work takes and how to pass timeout=. Before it, the status is
        the server's (its --stream-idle-timeout), whose message names its own flag."""
        start = time.monotonic()
        try:
            yield
        except grpc.RpcError as err:
            if (
                isinstance(err, ScoreDeadlineError)
                or err.code() != grpc.StatusCode.DEADLINE_EXCEEDED
                or timeout is None
                or time.monotonic() - start < timeout
            ):
                raise
            raise ScoreDeadlineError(rpc, self._spec.given, timeout, prepared, err.details()) from err


# Every keyword RewardClient.score takes: the request's, the settings of ScoreConfig, timeout.
_SCORE_KEYWORDS = frozenset(inspect.signature(prepare).parameters) - {"config"} | {f.name for f in fields(ScoreConfig)} | {"timeout"}
_CLIENT_KEYWORDS = frozenset(inspect.signature(_Client.__init__).parameters) - {"self", "targets"}


def _result(response: pb.ScoreResponse | pb.ScoreLogitsStreamResponse) -> Scores:
    return wire.scores_from_proto(response.result)


class RewardClient(_Client):
    """Blocking client of one reward server or several (round_robin).

    targets: "host:port", a gRPC URI, or a list of "host:port" replicas. A prefix http:// or
        grpc:// is stripped; https:// or grpcs:// is stripped and turns TLS on.
    tls / root_certificates: TLS (system roots, or this CA's PEM); client_certificate and
        client_key: mutual TLS; server_name: the name to verify the certificate against.
    token: bearer token, sent as ``authorization: Bearer <token>``.
    timeout: default deadline of a call: seconds, None for none, or "auto" (the default):
        AUTO_TIMEOUT_S (60 s), plus AUTO_TIMEOUT_S_PER_MODEL_TOKEN (4 s) per response token
        of a tokens payload, which a model-backed server scores with a forward and backward
        pass each (64 tokens of SmolLM2-135M took 138 s on a 2-core CPU). A Score call past
        its deadline raises ScoreDeadlineError, which says so.
    max_attempts: tries on UNAVAILABLE; when they are spent, calls raise
        ServerUnavailableError, which names the target.
    """

    def __init__(self, targets: str | Sequence[str] = DEFAULT_TARGET, **kwargs: Any) -> None:
        _refuse_unknown("RewardClient()", kwargs, _CLIENT_KEYWORDS)
        super().__init__(targets, **kwargs)
        spec = self._spec
        if spec.credentials is None:
            self._channel = grpc.insecure_channel(spec.target, options=spec.options)
        else:
            self._channel = grpc.secure_channel(spec.target, spec.credentials, options=spec.options)
        self._stub = pb_grpc.RewardServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def score(self, **kwargs: Any) -> Scores:
        prepared, timeout = self._prepare(kwargs)
        if prepared.unary is not None:
            with self._in_time("Score", timeout, prepared), self._reaching("Score"):
                return _result(self._stub.Score(prepared.unary, timeout=timeout, metadata=self._spec.metadata))
        # A stream outgrows gRPC's retry buffer, so retries of UNAVAILABLE happen here.
        with self._in_time("ScoreLogitsStream", timeout, prepared), self._reaching("ScoreLogitsStream"):
            for attempt in range(self.max_attempts):
                try:
                    response = self._stub.ScoreLogitsStream(prepared.stream(), timeout=timeout, metadata=self._spec.metadata)
                    return _result(response)
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.UNAVAILABLE or attempt + 1 == self.max_attempts:
                        raise
                    time.sleep(self._backoff(attempt))
        raise AssertionError("unreachable")

    score.__doc__ = _SCORE_DOC

    def reload_weights(self, path: str, weights_version: str, timeout: float | None = None) -> float:
        """Loads new weights into a model-backed server (``path`` on the server's file
        system); returns once they serve, with the seconds the load took."""
        request = pb.ReloadWeightsRequest(path=str(path), weights_version=weights_version)
        with self._reaching("ReloadWeights"):
            response = self._stub.ReloadWeights(request, timeout=self._reload_timeout(timeout), metadata=self._spec.metadata)
        return response.load_seconds

    def health(self, service: str = SERVICE, timeout: float = 5.0) -> str:
        """The server's health status for ``service``: SERVING, NOT_SERVING, ..."""
        with self._reaching("the health check"):
            response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRewardClient(_Client):
    """asyncio client for async rollout loops; the same arguments as ``RewardClient``.
    Local reductions of logits run in a worker thread, off the event loop."""

    def __init__(self, targets: str | Sequence[str] = DEFAULT_TARGET, **kwargs: Any) -> None:
        _refuse_unknown("AsyncRewardClient()", kwargs, _CLIENT_KEYWORDS)
        super().__init__(targets, **kwargs)
        spec = self._spec
        if spec.credentials is None:
            self._channel = grpc.aio.insecure_channel(spec.target, options=spec.options)
        else:
            self._channel = grpc.aio.secure_channel(spec.target, spec.credentials, options=spec.options)
        self._stub = pb_grpc.RewardServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def score(self, **kwargs: Any) -> Scores:
        prepared, timeout = await asyncio.to_thread(self._prepare, kwargs)
        if prepared.unary is not None:
            with self._in_time("Score", timeout, prepared), self._reaching("Score"):
                return _result(await self._stub.Score(prepared.unary, timeout=timeout, metadata=self._spec.metadata))
        with self._in_time("ScoreLogitsStream", timeout, prepared), self._reaching("ScoreLogitsStream"):
            for attempt in range(self.max_attempts):
                try:
                    call = self._stub.ScoreLogitsStream(prepared.stream(), timeout=timeout, metadata=self._spec.metadata)
                    return _result(await call)
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.UNAVAILABLE or attempt + 1 == self.max_attempts:
                        raise
                    await asyncio.sleep(self._backoff(attempt))
        raise AssertionError("unreachable")

    score.__doc__ = _SCORE_DOC

    async def reload_weights(self, path: str, weights_version: str, timeout: float | None = None) -> float:
        request = pb.ReloadWeightsRequest(path=str(path), weights_version=weights_version)
        with self._reaching("ReloadWeights"):
            response = await self._stub.ReloadWeights(request, timeout=self._reload_timeout(timeout), metadata=self._spec.metadata)
        return response.load_seconds

    reload_weights.__doc__ = RewardClient.reload_weights.__doc__

    async def health(self, service: str = SERVICE, timeout: float = 5.0) -> str:
        with self._reaching("the health check"):
            response = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
