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


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serve(options: Options) -> int:
    """Runs until SIGTERM or SIGINT, then drains: in-flight requests get up to the grace
    period to finish, new ones are refused, and the process exits 0."""
    reduce, backend_name = backend(options.backend)
    metrics = Metrics()
    credentials = _credentials(options)
    interceptors = []
    if options.auth_token_file is not None:
        interceptors.append(TokenAuth(read_tokens(options.auth_token_file), metrics))
    service = RewardService(reduce, backend_name, Limits(max_tokens=options.max_tokens), metrics, options.model is not None)
    if options.parent_pid is not None and options.parent_pid != os.getppid():
        raise StartupError(f"--parent-pid {options.parent_pid} is not this server's parent ({os.getppid()})")
    if options.model is not None and not options.weights_version:
        raise StartupError("--weights-version must not be empty")
    server = grpc.server(
        ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="corrpo-rpc"),
        handlers=[service.handler()],
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", options.max_message_bytes),
            ("grpc.max_send_message_length", options.max_message_bytes),
            # A second server on a taken port must fail, not share it.
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=options.max_concurrent_rpcs,
    )
    health_servicer = health.HealthServicer()
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
        version=corrpo.__version__,
        model=options.model,
        weights_version=service.model.version if service.model else None,
    )
    while not stop.wait(0.5):
        pass
    event("draining", grace_s=options.grace_s)
    health_servicer.enter_graceful_shutdown()
    server.stop(options.grace_s).wait()
    event("stopped")
    return 0
