"""Reward server benchmark (SPEC 8): a real corrpo-server process on loopback.

- stats path: tokens/s scored end to end (client encodes, server scores, client decodes),
  against corrpo.score in-process on the same data;
- logits streaming: GiB/s of float32 logits in 4 MiB blocks, against a bare gRPC server on
  the same loopback that only receives the same blocks;
- latency p50/p99 of a typical request at 1, 8 and 32 concurrent clients;
- server memory per concurrent stream (peak RSS growth).

    python bench/bench_server.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table

import corrpo
from corrpo.client import RewardClient, prepare
from corrpo.scoring import ScoreConfig
from corrpo_server import ServerProcess

console = Console()
VOCAB = 151_936

# A gRPC server that receives ScoreLogitsStream messages and discards them: the transport's
# own ceiling on this machine.
SINK = textwrap.dedent(
    """
    import sys, grpc
    from concurrent.futures import ThreadPoolExecutor
    def sink(requests, context):
        n = 0
        for raw in requests:
            n += len(raw)
        return n.to_bytes(8, "little")
    handler = grpc.method_handlers_generic_handler(
        "corrpo.v1.RewardService", {"ScoreLogitsStream": grpc.stream_unary_rpc_method_handler(sink)})
    server = grpc.server(ThreadPoolExecutor(4), handlers=[handler],
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()
    """
)


def stats_batch(rng, rollouts: int, tokens: int):
    entropy = [rng.gamma(2.0, 1.0, tokens).astype(np.float32) for _ in range(rollouts)]
    grad_norm = [np.clip(1.2 - 0.2 * h + 0.05 * rng.standard_normal(tokens), 0, 1.4).astype(np.float32) for h in entropy]
    ids = [rng.integers(0, VOCAB, tokens) for _ in range(rollouts)]
    return dict(entropy=entropy, grad_norm=grad_norm, token_ids=ids, rewards=rng.integers(0, 2, rollouts).tolist())


def stats_throughput(target: str, batch: dict, group: int, seconds: float, clients: int) -> float:
    tokens = sum(len(h) for h in batch["entropy"])
    stop = time.perf_counter() + seconds
    counts = [0] * clients

    def worker(i: int) -> None:
        with RewardClient(target) as client:
            while time.perf_counter() < stop:
                client.score(group_sizes=group, **batch)
                counts[i] += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return sum(counts) * tokens / (time.perf_counter() - start)


def in_process_throughput(batch: dict, group: int, seconds: float) -> float:
    h, g = np.concatenate(batch["entropy"]), np.concatenate(batch["grad_norm"])
    ids, lengths = np.concatenate(batch["token_ids"]), [len(x) for x in batch["entropy"]]
    sizes = [group] * (len(lengths) // group)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        corrpo.score(h, g, lengths, sizes, rewards=batch["rewards"], token_ids=ids)
        n += 1
    return n * len(h) / (time.perf_counter() - start)


def stream_messages(logits: np.ndarray, ids: np.ndarray, block_bytes: int):
    """The serialized messages RewardClient sends for these logits (one rollout)."""
    prepared = prepare(logits=[logits], token_ids=[ids], send="logits", block_bytes=block_bytes, config=ScoreConfig())
    return (message.SerializeToString() for message in prepared.stream())


def stream_gibps(target: str, logits: np.ndarray, ids: np.ndarray, repeats: int) -> float:
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(target, options=options) as channel:
        call = channel.stream_unary("/corrpo.v1.RewardService/ScoreLogitsStream")
        call(stream_messages(logits[:8], ids[:8], 4 << 20), timeout=120)  # warm-up
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            call(stream_messages(logits, ids, 4 << 20), timeout=300)
            best = max(best, logits.nbytes / 2**30 / (time.perf_counter() - start))
    return best


def latencies(target: str, batch: dict, group: int, clients: int, per_client: int) -> tuple[float, float]:
    times: list[float] = []
    lock = threading.Lock()

    def worker(_: int) -> None:
        with RewardClient(target) as client:
            client.score(group_sizes=group, **batch)
            for _ in range(per_client):
                start = time.perf_counter()
                client.score(group_sizes=group, **batch)
                with lock:
                    times.append(time.perf_counter() - start)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    ms = np.array(times) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def peak_rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def memory_per_stream(server: ServerProcess, logits: np.ndarray, ids: np.ndarray, streams: int) -> float:
    with open(f"/proc/{server.process.pid}/clear_refs", "w") as f:
        f.write("5")
    before = peak_rss_mib(server.process.pid)
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(lambda _: stream_gibps(server.target, logits, ids, 1), range(streams)))
    return (peak_rss_mib(server.process.pid) - before) / streams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs (for a smoke test)")
    args = parser.parse_args()
    seconds = 1.0 if args.quick else 4.0
    rng = np.random.default_rng(0)
    console.print(f"corrpo {corrpo.__version__} ({corrpo.simd_isa()}), {os.cpu_count()} CPUs; server and clients share them")

    with ServerProcess("--max-message-mib", "64") as server:
        table = Table(title="stats path: tokens scored per second, end to end")
        for column in ("request", "clients", "server tok/s", "in-process tok/s", "server / in-process"):
            table.add_column(column, justify="right")
        for rollouts, tokens in ((64, 2048), (256, 4096)):
            batch = stats_batch(rng, rollouts, tokens)
            local = in_process_throughput(batch, 8, seconds)
            for clients in (1, 4):
                remote = stats_throughput(server.target, batch, 8, seconds, clients)
                table.add_row(
                    f"{rollouts} x {tokens}", str(clients), f"{remote / 1e6:.2f} M", f"{local / 1e6:.2f} M", f"{remote / local:.2f}"
                )
        console.print(table)

        rows = 256 if args.quick else 1024  # 148 MiB or 594 MiB of float32 logits
        logits = rng.standard_normal((rows, VOCAB), dtype=np.float32)
        ids = rng.integers(0, VOCAB, rows)
        sink = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
        try:
            sink_target = f"127.0.0.1:{sink.stdout.readline().strip()}"
            bare = stream_gibps(sink_target, logits, ids, 3)
        finally:
            sink.kill()
        ours = stream_gibps(server.target, logits, ids, 3)
        table = Table(title=f"logits streaming: [{rows} x {VOCAB}] float32 ({logits.nbytes / 2**20:.0f} MiB) in 4 MiB blocks")
        for column in ("receiver", "GiB/s", "vs bare gRPC"):
            table.add_column(column, justify="right")
        table.add_row("corrpo-server (receive + reduce + score)", f"{ours:.2f}", f"{ours / bare:.2f}")
        table.add_row("bare gRPC sink (receive only)", f"{bare:.2f}", "1.00")
        console.print(table)

        batch = stats_batch(rng, 16, 512)
        table = Table(title="latency of a 16 x 512-token stats request (group 8)")
        for column in ("clients", "p50 ms", "p99 ms"):
            table.add_column(column, justify="right")
        for clients in (1, 8, 32):
            p50, p99 = latencies(server.target, batch, 8, clients, 50 if args.quick else 200)
            table.add_row(str(clients), f"{p50:.2f}", f"{p99:.2f}")
        console.print(table)

    small = logits[:128]
    table = Table(title=f"server memory per concurrent stream ({small.nbytes / 2**20:.0f} MiB each, 4 MiB blocks)")
    for column in ("streams", "peak RSS growth per stream, MiB"):
        table.add_column(column, justify="right")
    for streams in (1, 4):
        # A fresh server each time, warmed by one tiny stream, so earlier runs' memory does not hide growth.
        with ServerProcess("--max-message-mib", "64") as server:
            stream_gibps(server.target, small[:2], ids[:2], 1)
            table.add_row(str(streams), f"{memory_per_stream(server, small, ids[:128], streams):.1f}")
    console.print(table)


if __name__ == "__main__":
    main()
