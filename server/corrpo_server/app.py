"""Builds and runs the server: credentials, health, reflection, metrics, drain on signal."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import corrpo
from corrpo import wire
from corrpo.v1 import reward_service_pb2 as pb

from .admission import Admission
from .auth import TokenAuth, read_tokens
from .batch import Limits, Reducer
from .model import ModelLoadError, PolicyModel
from .observe import Metrics, event
from .service import SERVICE, RewardService


@dataclass
class Options:
    host: str = "127.0.0.1"
    port: int = 50051
    backend: str = "cpu"
    workers: int = 32
    max_message_bytes: int = 64 << 20
    max_concurrent_rpcs: int = 128
    #: None: three quarters of max_concurrent_rpcs (at least 1).
    max_concurrent_streams: int | None = None
    #: 0: no limit per client host.
    max_streams_per_peer: int = 0
    stream_idle_timeout_s: float = 30.0
    max_tokens: int = 1 << 22
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token_file: Path | None = None
    reflection: bool = False
    metrics_port: int | None = None
    grace_s: float = 30.0
    port_file: Path | None = None
    parent_pid: int | None = None
    model: str | None = None
    #: Requests that may wait for the model while it scores another; more are refused.
    max_queued: int = 8
    device: str = "auto"
    dtype: str = "float32"
    weights_version: str = "initial"


class StartupError(Exception):
    """The server cannot start as configured; the message says why."""


def backend(name: str) -> tuple[Reducer, str]:
    """The logits reducer of a backend and the name the responses report. ``auto`` is
    triton where the kernels are installed and a CUDA device is visible, else cpu."""
    if name == "auto":
        name = "triton" if _cuda_kernels() else "cpu"
    if name == "triton":
        from corrpo import _triton

        try:
            where = _triton.describe()
        except corrpo.ConfigError as err:
            raise StartupError(err.message) from None

        def triton(logits: np.ndarray, token_ids: np.ndarray, temperature: float) -> corrpo.TokenStats:
            return corrpo.token_stats(logits, token_ids, temperature=temperature, backend="triton")

        return triton, f"triton/{where}"

    def cpu(logits: np.ndarray, token_ids: np.ndarray, temperature: float) -> corrpo.TokenStats:
        return corrpo.token_stats(logits, token_ids, temperature=temperature, backend="cpu")

    return cpu, f"cpu/{corrpo.simd_isa()}"


def _cuda_kernels() -> bool:
    # torch is imported only where the kernels are installed: a CPU-only server stays light.
    if importlib.util.find_spec("corrpo_kernels") is None:
        return False
    import torch

    return torch.cuda.is_available()


def _credentials(options: Options) -> grpc.ServerCredentials | None:
    if options.tls_cert is None and options.tls_key is None:
        if options.tls_client_ca is not None:
            raise StartupError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        return None
    if options.tls_cert is None or options.tls_key is None:
        raise StartupError("TLS needs both --tls-cert and --tls-key")
    client_ca = options.tls_client_ca.read_bytes() if options.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(options.tls_key.read_bytes(), options.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _warm_up(reduce: Reducer) -> None:
    # Loads the native extension, starts its thread pool and compiles the Triton kernel for
    # every wire dtype before the first real request.
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((64, 1024), dtype=np.float32)
    for dtype in wire.LOGITS:
        stats = reduce(logits.astype(wire.element(dtype)), rng.integers(0, 1024, 64), 1.0)
    corrpo.score(stats.entropy, stats.grad_norm, [32, 32], [2])


def _watch_parent(pid: int, stop: threading.Event) -> None:
    """Stops the server (a drain, as on SIGTERM) once the process ``pid`` that started it has
    died, however it died: an orphan is re-parented, so its parent id changes. Polling
    rather than Linux's parent-death signal, which is tied to the thread that forked and
    was seen not to arrive."""
    while not stop.wait(0.25):
        if os.getppid() != pid:
            event("parent_exited", parent_pid=pid)
            stop.set()


#: RPC threads beyond --max-concurrent-rpcs: an admitted call has a thread of its own from
#: start to end, and these refuse the calls past the limits.
_SPARE_THREADS = 8
#: Threads of the health service alone, so that probes are answered whatever the other
#: calls do.
_HEALTH_THREADS = 4


def _streams_limit(options: Options) -> int:
    """--max-concurrent-streams, checked against the other limits; by default three quarters
    of --max-concurrent-rpcs, so a quarter stays for unary calls that streams cannot take."""
    calls = options.max_concurrent_rpcs
    if calls < 1:
        raise StartupError(f"--max-concurrent-rpcs must be >= 1, got {calls}")
    streams = options.max_concurrent_streams
    if streams is None:
        return max(1, calls - calls // 4)
    if not 1 <= streams <= calls:
        raise StartupError(f"--max-concurrent-streams must be in [1, --max-concurrent-rpcs {calls}], got {streams}")
    return streams


def _check_limits(options: Options) -> None:
    if options.workers < 1:
        raise StartupError(f"--workers must be >= 1, got {options.workers}")
    if options.max_streams_per_peer < 0:
        raise StartupError(f"--max-streams-per-peer must be >= 0 (0: no limit), got {options.max_streams_per_peer}")
    if not options.stream_idle_timeout_s > 0:
        raise StartupError(f"--stream-idle-timeout must be > 0 seconds, got {options.stream_idle_timeout_s}")
    if options.max_queued < 0:
        raise StartupError(
            f"--max-queued must be >= 0 (0: a request that finds the model busy is refused), got {options.max_queued}"
        )
    if not 1 <= options.max_tokens <= wire.MAX_SIZE:
        raise StartupError(f"--max-tokens must be in [1, {wire.MAX_SIZE}], got {options.max_tokens}")
    if not 1 <= options.max_message_bytes < 1 << 31:
        mib = options.max_message_bytes / (1 << 20)
        raise StartupError(f"--max-message-mib must be above 0 and below 2048 (gRPC's limit), got {mib:g}")


class _Health(health.HealthServicer):
    """grpc.health.v1 on threads of its own (gRPC runs a handler on the pool its
    ``experimental_thread_pool`` names): a probe is answered while clients stall every
    RPC thread of the server."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        super().__init__(experimental_thread_pool=pool)

        def check(request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
            return health.HealthServicer.Check(self, request, context)

        check.experimental_thread_pool = pool  # type: ignore[attr-defined]
        self.Check = check  # type: ignore[method-assign]


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serve(options: Options) -> int:
    """Runs until SIGTERM or SIGINT, then drains: in-flight requests get up to the grace
    period to finish, new ones are refused, and the process exits 0."""
    _check_limits(options)
    streams = _streams_limit(options)
    reduce, backend_name = backend(options.backend)
    metrics = Metrics()
    credentials = _credentials(options)
    interceptors = []
    if options.auth_token_file is not None:
        interceptors.append(TokenAuth(read_tokens(options.auth_token_file), metrics))
    service = RewardService(
        reduce,
        backend_name,
        Limits(max_tokens=options.max_tokens, max_message_bytes=options.max_message_bytes),
        metrics,
        options.model is not None,
        admission=Admission(options.max_concurrent_rpcs, streams, options.max_streams_per_peer, options.workers),
        idle_timeout_s=options.stream_idle_timeout_s,
    )
    if options.parent_pid is not None and options.parent_pid != os.getppid():
        raise StartupError(f"--parent-pid {options.parent_pid} is not this server's parent ({os.getppid()})")
    if options.model is not None and not options.weights_version:
        raise StartupError("--weights-version must not be empty")
    # gRPC's own maximum_concurrent_rpcs stays off: it would count health checks too. The
    # service admits its calls itself (admission.py), each on a thread of this pool.
    server = grpc.server(
        ThreadPoolExecutor(max_workers=options.max_concurrent_rpcs + _SPARE_THREADS, thread_name_prefix="corrpo-rpc"),
        handlers=[service.handler()],
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", options.max_message_bytes),
            ("grpc.max_send_message_length", options.max_message_bytes),
            # A second server on a taken port must fail, not share it.
            ("grpc.so_reuseport", 0),
        ],
    )
    health_servicer = _Health(ThreadPoolExecutor(max_workers=_HEALTH_THREADS, thread_name_prefix="corrpo-health"))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = ["", SERVICE]

    def set_health(serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in names:
            health_servicer.set(name, status)

    set_health(False)
    if options.reflection:
        reflection.enable_server_reflection(
            [pb.DESCRIPTOR.services_by_name["RewardService"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME],
            server,
        )
    address = _address(options.host, options.port)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as err:
        raise StartupError(f"cannot listen on {address}: {err}") from None

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop.set())
    if options.parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(options.parent_pid, stop), name="corrpo-parent", daemon=True).start()
    server.start()
    metrics_port = None
    if options.metrics_port is not None:
        from prometheus_client import start_http_server

        http, _ = start_http_server(options.metrics_port, addr=options.host, registry=metrics.registry)
        metrics_port = http.server_port
    _warm_up(reduce)
    if options.model is not None:
        # Loaded while health says NOT_SERVING, so a probe sees a replica that is loading.
        try:
            service.model = PolicyModel(
                options.model,
                device=options.device,
                dtype=options.dtype,
                version=options.weights_version,
                max_queued=options.max_queued,
                on_loading=lambda loading: set_health(not loading),
            )
        except ModelLoadError as err:
            server.stop(0).wait()
            raise StartupError(f"--model {options.model}: {err}") from None
    set_health(True)
    if options.port_file is not None:
        tmp = options.port_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"port": port, "metrics_port": metrics_port, "pid": os.getpid()}))
        tmp.replace(options.port_file)
    event(
        "serving",
        address=_address(options.host, port),
        backend=backend_name,
        tls=credentials is not None,
        mutual_tls=options.tls_client_ca is not None,
        auth=bool(interceptors),
        reflection=options.reflection,
        metrics_port=metrics_port,
        workers=options.workers,
        max_concurrent_rpcs=options.max_concurrent_rpcs,
        max_concurrent_streams=streams,
        max_streams_per_peer=options.max_streams_per_peer,
        stream_idle_timeout_s=options.stream_idle_timeout_s,
        version=corrpo.__version__,
        model=options.model,
        max_queued=options.max_queued if options.model is not None else None,
        weights_version=service.model.version if service.model else None,
    )
    while not stop.wait(0.5):
        pass
    event("draining", grace_s=options.grace_s)
    health_servicer.enter_graceful_shutdown()
    server.stop(options.grace_s).wait()
    event("stopped")
    return 0
