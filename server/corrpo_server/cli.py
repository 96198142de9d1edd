"""`corrpo-server serve`: the command line."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .app import Options, StartupError, serve
from .observe import event, setup_logging

_MIB = 1 << 20


def _parser() -> argparse.ArgumentParser:
    defaults = Options()
    parser = argparse.ArgumentParser(prog="corrpo-server", description="corrpo's gRPC reward server")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "serve",
        help="serve corrpo.v1.RewardService",
        description="Serve CorR-PO rewards over gRPC. With no flags: 127.0.0.1:50051, CPU backend, no TLS.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run.add_argument("--host", default=defaults.host, help="address to listen on (0.0.0.0 or :: for every interface)")
    run.add_argument("--port", type=int, default=defaults.port, help="port; 0 picks a free one (see --port-file)")
    run.add_argument(
        "--backend",
        choices=("auto", "cpu", "triton"),
        default=defaults.backend,
        help="what reduces logits: the native core (cpu), the Triton kernels on the GPU (triton), or triton "
        "when a CUDA device and corrpo-kernels are present (auto). The default leaves the GPU to the trainer",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        help="requests that compute at once (decode, reduce logits, score); admitted ones beyond it wait for one. "
        "A stream waiting for its client holds none",
    )
    run.add_argument(
        "--max-message-mib", type=float, default=defaults.max_message_bytes / _MIB, help="largest message, in MiB"
    )
    run.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=defaults.max_concurrent_rpcs,
        help="RewardService calls served at once; more are refused with RESOURCE_EXHAUSTED. Health checks are "
        "never counted",
    )
    run.add_argument(
        "--max-concurrent-streams",
        type=int,
        help="of those, calls whose messages are still arriving: ScoreLogitsStream calls and unary calls not yet "
        "whole (default: three quarters of --max-concurrent-rpcs); the rest stay for calls that arrive whole",
    )
    run.add_argument(
        "--max-streams-per-peer",
        type=int,
        default=defaults.max_streams_per_peer,
        help="such calls at once from one client host (0: no limit besides "
        "--max-concurrent-streams); set it when several clients share the server",
    )
    run.add_argument(
        "--stream-idle-timeout",
        type=float,
        default=defaults.stream_idle_timeout_s,
        help="seconds a call may send nothing while the server awaits a message before it is ended with DEADLINE_EXCEEDED",
    )
    run.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="tokens per request")
    run.add_argument("--tls-cert", type=Path, help="PEM certificate chain of the server (enables TLS)")
    run.add_argument("--tls-key", type=Path, help="PEM private key of the server")
    run.add_argument("--tls-client-ca", type=Path, help="PEM CA that client certificates must chain to (mutual TLS)")
    run.add_argument("--auth-token-file", type=Path, help="file of accepted bearer tokens, one per line")
    run.add_argument("--reflection", action="store_true", help="enable gRPC server reflection")
    run.add_argument("--metrics-port", type=int, help="serve Prometheus metrics over HTTP on this port (0: any)")
    run.add_argument("--grace", type=float, default=defaults.grace_s, help="seconds in-flight requests get on shutdown")
    run.add_argument("--port-file", type=Path, help="write the bound ports and pid here once serving, as JSON")
    run.add_argument(
        "--parent-pid", type=int, help="drain and exit when this process, the server's parent, exits (for local servers)"
    )
    model = run.add_argument_group(
        "model-backed scoring",
        "Hold the policy and score tokens payloads (prompt and response ids) with the paper's parameter-space "
        "measure; needs corrpo[gradients] (torch, transformers)",
    )
    model.add_argument("--model", help="a Hugging Face directory (a corrpo-train run's sft/ too), a .gguf file, or an installed model package (smollm2, gemma3-270m)")
    model.add_argument("--device", default=defaults.device, choices=("auto", "cpu", "cuda"), help="where the model runs")
    model.add_argument("--dtype", default=defaults.dtype, choices=("float32", "bfloat16", "float16"), help="the model's dtype")
    model.add_argument(
        "--max-queued",
        type=int,
        default=defaults.max_queued,
        help="requests that may wait for the model while it scores another (it scores one at a time); one more is "
        "refused at once with RESOURCE_EXHAUSTED rather than left to wait past its client's timeout",
    )
    model.add_argument(
        "--weights-version", default=defaults.weights_version, help="the name of the weights --model loads (ReloadWeights names later ones)"
    )
    run.add_argument("--log-level", default=os.environ.get("CORRPO_LOG_LEVEL", "info"), help="debug, info, warning")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    options = Options(
        host=args.host,
        port=args.port,
        backend=args.backend,
        workers=args.workers,
        max_message_bytes=int(args.max_message_mib * _MIB),
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_concurrent_streams=args.max_concurrent_streams,
        max_streams_per_peer=args.max_streams_per_peer,
        stream_idle_timeout_s=args.stream_idle_timeout,
        max_tokens=args.max_tokens,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_token_file=args.auth_token_file,
        reflection=args.reflection,
        metrics_port=args.metrics_port,
        grace_s=args.grace,
        port_file=args.port_file,
        parent_pid=args.parent_pid,
        model=args.model,
        max_queued=args.max_queued,
        device=args.device,
        dtype=args.dtype,
        weights_version=args.weights_version,
    )
    try:
        return serve(options)
    except (StartupError, OSError, ValueError) as err:
        event("startup_failed", error=str(err))
        return 2
