"""The server under operation: concurrency, cancellation, deadlines, drain, replicas, TLS,
auth, health, metrics and reflection, each against real server processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import corrpo
from corrpo import wire
from corrpo.client import RewardClient
from corrpo.v1 import reward_service_pb2 as pb
from corrpo.v1 import reward_service_pb2_grpc as pb_grpc
from corrpo.v1 import tensor_pb2
from corrpo_server import ServerProcess
from certs import make_pki
from rollouts import make_rollouts

VOCAB = 4096


def expected(r):
    lengths = r.lengths
    stats = corrpo.token_stats(np.concatenate(r.logits), np.concatenate(r.token_ids))
    return corrpo.score(
        stats.entropy, stats.grad_norm, lengths, r.group_sizes, rewards=r.rewards, token_ids=np.concatenate(r.token_ids)
    )


def assert_same(scores, want):
    np.testing.assert_array_equal(scores.rho, want.rho)
    np.testing.assert_array_equal(scores.rewards, want.rewards)
    np.testing.assert_array_equal(scores.advantages, want.advantages)


def requests_of(server: ServerProcess) -> list[dict]:
    return [e for e in server.events() if e.get("event") == "request"]


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def metrics(server: ServerProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as page:
        return page.read().decode()


def test_32_concurrent_clients_all_correct(server):
    cases = [make_rollouts(np.random.default_rng(seed), [4, 4], vocab=VOCAB) for seed in range(32)]
    wants = [expected(r) for r in cases]

    def one(i: int):
        r = cases[i]
        with RewardClient(server.target) as client:
            send = "logits" if i % 2 else "stats"
            return client.score(
                logits=r.logits, token_ids=r.token_ids, rewards=r.rewards, group_sizes=4, send=send, block_bytes=1 << 16
            )

    start = threading.Barrier(32)

    def synchronized(i: int):
        start.wait()
        return one(i)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(synchronized, range(32)))
    for scores, want in zip(results, wants):
        assert_same(scores, want)


class HeldStream:
    """A logits stream that sends its header and first blocks, then waits to be released:
    an RPC in flight that the test controls."""

    def __init__(self, rows_before=4, rows_after=4, vocab=VOCAB, seed=0):
        rng = np.random.default_rng(seed)
        self.logits = rng.standard_normal((rows_before + rows_after, vocab), dtype=np.float32)
        self.ids = rng.integers(0, vocab, rows_before + rows_after)
        self.rows_before = rows_before
        self.sent_first = threading.Event()
        self.release = threading.Event()

    def messages(self):
        header = pb.LogitsStreamHeader(
            request_id="held", dtype=tensor_pb2.DTYPE_FLOAT32, vocab_size=self.logits.shape[1],
            token_ids=wire.encode(self.ids),
        )
        header.groups.add().rollouts.add(num_tokens=len(self.ids), reward=1.0)
        yield pb.ScoreLogitsStreamRequest(header=header)
        for row in self.logits[: self.rows_before]:
            yield pb.ScoreLogitsStreamRequest(block=pb.LogitsBlock(data=row.tobytes()))
        self.sent_first.set()
        self.release.wait(60)
        for row in self.logits[self.rows_before :]:
            yield pb.ScoreLogitsStreamRequest(block=pb.LogitsBlock(data=row.tobytes()))

    def expected(self):
        stats = corrpo.token_stats(self.logits, self.ids)
        return corrpo.score(stats.entropy, stats.grad_norm, [len(self.ids)], [1], rewards=[1.0], token_ids=self.ids)


@pytest.fixture
def fresh_server():
    with ServerProcess("--metrics-port", "0") as process:
        yield process


def received_bytes(server: ServerProcess) -> float:
    lines = [x for x in metrics(server).splitlines() if x.startswith("corrpo_logits_bytes_received_total ")]
    return float(lines[0].split()[1]) if lines else 0.0


def test_cancelled_stream_frees_its_work(fresh_server):
    held = HeldStream()
    with grpc.insecure_channel(fresh_server.target) as channel:
        future = pb_grpc.RewardServiceStub(channel).ScoreLogitsStream.future(held.messages())
        # Cancel once the server has reduced the first blocks.
        assert wait_for(lambda: received_bytes(fresh_server) == held.rows_before * VOCAB * 4), metrics(fresh_server)
        assert 'corrpo_requests_in_flight{rpc="ScoreLogitsStream"} 1.0' in metrics(fresh_server)
        future.cancel()
        held.release.set()
    assert wait_for(lambda: requests_of(fresh_server)), fresh_server.log()
    line = requests_of(fresh_server)[-1]
    assert line["status"] == "CANCELLED", line
    assert line["request_id"] == "held" and line["tokens"] == held.rows_before
    assert 'corrpo_requests_in_flight{rpc="ScoreLogitsStream"} 0.0' in metrics(fresh_server)
    assert 'corrpo_requests_total{code="CANCELLED",rpc="ScoreLogitsStream"} 1.0' in metrics(fresh_server)


def test_expired_deadline_stops_the_stream(fresh_server):
    held = HeldStream()
    with grpc.insecure_channel(fresh_server.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.RewardServiceStub(channel).ScoreLogitsStream(held.messages(), timeout=2.0)
        held.release.set()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: requests_of(fresh_server)), fresh_server.log()
    line = requests_of(fresh_server)[-1]
    assert line["status"] == "DEADLINE_EXCEEDED", line
    assert line["request_id"] == "held" and line["tokens"] == held.rows_before
    assert 'corrpo_requests_in_flight{rpc="ScoreLogitsStream"} 0.0' in metrics(fresh_server)


def test_sigterm_lets_the_request_in_flight_finish_and_exits_0():
    server = ServerProcess("--metrics-port", "0")
    held = HeldStream(seed=5)
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="corrpo.v1.RewardService"))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        future = pb_grpc.RewardServiceStub(channel).ScoreLogitsStream.future(held.messages(), timeout=60)
        assert held.sent_first.wait(10)
        # SIGTERM only once the server has the request: sent is not received (a drain
        # refuses RPCs that arrive after it began, which a busy machine showed).
        assert wait_for(lambda: received_bytes(server) == held.rows_before * VOCAB * 4), metrics(server)
        server.signal(signal.SIGTERM)
        # Draining: the health service turns NOT_SERVING while the request goes on.
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        held.release.set()
        response = future.result()
    assert_same(wire.scores_from_proto(response.result), held.expected())
    assert server.process.wait(30) == 0
    events = [e["event"] for e in server.events()]
    assert events.index("draining") < events.index("stopped")


def test_replica_killed_mid_run_every_request_succeeds():
    a, b = ServerProcess(), ServerProcess()
    cases = [make_rollouts(np.random.default_rng(100 + i), [3, 3], vocab=VOCAB) for i in range(30)]
    try:
        killed_at = None
        with RewardClient([a.target, b.target], max_attempts=5) as client:
            for i, r in enumerate(cases):
                # Kill one replica mid-run, once round_robin has used both.
                if killed_at is None and i >= 10 and requests_of(a) and requests_of(b):
                    b.kill()
                    killed_at = i
                scores = client.score(logits=r.logits, token_ids=r.token_ids, rewards=r.rewards, group_sizes=3)
                assert_same(scores, expected(r))
        assert killed_at is not None, "round_robin never used both replicas"
        assert len(requests_of(a)) >= len(cases) - killed_at
    finally:
        a.stop()
        b.stop()


def test_health_metrics_and_tokens_counted(server, client, rng):
    assert client.health() == "SERVING"
    assert client.health("") == "SERVING"
    r = make_rollouts(rng, [2, 2], vocab=VOCAB)
    before = metrics(server)
    client.score(logits=r.logits, token_ids=r.token_ids, rewards=r.rewards, group_sizes=2)
    after = metrics(server)

    def value(text: str, name: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(name + " ")]
        return float(lines[0].split()[1]) if lines else 0.0

    name = 'corrpo_tokens_scored_total{rpc="Score"}'
    assert value(after, name) - value(before, name) == r.lengths.sum()
    ok = 'corrpo_requests_total{code="OK",rpc="Score"}'
    assert value(after, ok) - value(before, ok) == 1
    assert 'corrpo_request_duration_seconds_bucket{le="0.001",rpc="Score"}' in after
    line = [e for e in requests_of(server) if e["status"] == "OK" and e["rpc"] == "Score"][-1]
    assert {"request_id", "rollouts", "tokens", "status", "ms"} <= line.keys()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _score_once(client: RewardClient, seed=7):
    r = make_rollouts(np.random.default_rng(seed), [2], vocab=VOCAB)
    assert_same(client.score(logits=r.logits, token_ids=r.token_ids, rewards=r.rewards, group_sizes=2), expected(r))


def test_tls(pki):
    with ServerProcess("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)) as server:
        with RewardClient(server.target, root_certificates=pki.ca, timeout=10) as client:
            _score_once(client)
        for bad in ({}, {"root_certificates": pki.other_ca}):
            with RewardClient(server.target, timeout=3, max_attempts=1, **bad) as client:
                with pytest.raises(grpc.RpcError) as info:
                    _score_once(client)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(pki):
    args = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca))
    with ServerProcess(*args) as server:
        with RewardClient(
            server.target, root_certificates=pki.ca, client_certificate=pki.client_cert, client_key=pki.client_key
        ) as client:
            _score_once(client)
        # A client without a certificate is refused during the handshake.
        with RewardClient(server.target, root_certificates=pki.ca, timeout=3, max_attempts=1) as client:
            with pytest.raises(grpc.RpcError) as info:
                _score_once(client)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_auth_token(tmp_path, pki):
    tokens = tmp_path / "tokens"
    tokens.write_text("old-token\n  s3cret-token  \n")
    with ServerProcess("--auth-token-file", str(tokens)) as server:
        for token in ("s3cret-token", "old-token"):
            with RewardClient(server.target, token=token) as client:
                _score_once(client)
        for token, reason in ((None, "missing token"), ("s3cret", "invalid token"), ("s3cret-token2", "invalid token")):
            with RewardClient(server.target, token=token) as client:
                for send in ("stats", "logits"):
                    with pytest.raises(grpc.RpcError) as info:
                        r = make_rollouts(np.random.default_rng(0), [2], vocab=VOCAB)
                        client.score(logits=r.logits, token_ids=r.token_ids, group_sizes=2, send=send)
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert reason in info.value.details()
                # Health checks need no token (load balancers and orchestrators probe them).
                assert client.health() == "SERVING"
        refused = [e for e in requests_of(server) if e["status"] == "UNAUTHENTICATED"]
        assert len(refused) == 6


def test_concurrency_limit_is_resource_exhausted():
    with ServerProcess("--max-concurrent-rpcs", "1") as server:
        held = HeldStream()
        with grpc.insecure_channel(server.target) as channel:
            future = pb_grpc.RewardServiceStub(channel).ScoreLogitsStream.future(held.messages(), timeout=60)
            assert held.sent_first.wait(10)
            with RewardClient(server.target, max_attempts=1) as client:
                with pytest.raises(grpc.RpcError) as info:
                    _score_once(client)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "--max-concurrent-rpcs 1" in info.value.details()
            # Health checks are never counted against the limit.
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == health_pb2.HealthCheckResponse.SERVING
            held.release.set()
            assert_same(wire.scores_from_proto(future.result().result), held.expected())
            with RewardClient(server.target) as client:
                _score_once(client)


def test_reflection_is_opt_in():
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with ServerProcess("--reflection") as server, grpc.insecure_channel(server.target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "corrpo.v1.RewardService" in services
    with ServerProcess() as server, grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "corrpo_server", "serve", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_startup_errors_are_clear(pki):
    with ServerProcess() as server:
        taken = _serve("--port", str(server.port))
    assert taken.returncode == 2 and "cannot listen on 127.0.0.1:" in taken.stderr
    if not torch.cuda.is_available():
        compiled = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        triton = _serve("--backend", "triton", "--port", "0", env=compiled)
        assert triton.returncode == 2 and "the Triton backend needs a CUDA device" in triton.stderr
    half_tls = _serve("--tls-cert", str(pki.server_cert), "--port", "0")
    assert half_tls.returncode == 2 and "TLS needs both --tls-cert and --tls-key" in half_tls.stderr


def test_no_arguments_serves_on_127_0_0_1_50051(tmp_path):
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 50051)) == 0:
            pytest.skip("port 50051 is in use on this machine")
    port_file = tmp_path / "ports.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "corrpo_server", "serve", "--port-file", str(port_file)],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert wait_for(port_file.exists, 60)
        assert json.loads(port_file.read_text())["port"] == 50051
        with RewardClient() as client:
            assert client.health() == "SERVING"
            _score_once(client)
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
    serving = [json.loads(line) for line in process.stderr.read().splitlines() if '"serving"' in line]
    assert serving[0]["address"] == "127.0.0.1:50051" and serving[0]["backend"].startswith("cpu/")


def _check_traceback_free(server: ServerProcess) -> None:
    assert "Traceback" not in server.log()
    assert not [e for e in requests_of(server) if e["status"] in ("INTERNAL", "UNKNOWN")]


def _stalled_stream(channel: grpc.Channel, stop: threading.Event, timeout: float = 60):
    """A ScoreLogitsStream that sends its header and then nothing until ``stop``."""
    held = HeldStream(rows_before=0)
    header = next(held.messages())

    def messages():
        yield header
        stop.wait(timeout)

    return pb_grpc.RewardServiceStub(channel).ScoreLogitsStream.future(messages(), timeout=timeout)


def _in_flight(server: ServerProcess, rpc: str) -> float:
    line = [x for x in metrics(server).splitlines() if x.startswith(f'corrpo_requests_in_flight{{rpc="{rpc}"}}')]
    return float(line[0].split()[1]) if line else 0.0


def _refused_at_once(stalled: list, count: int) -> list:
    """The ``count`` stalled calls past the server's limits: refused at once, naming the limit."""
    assert wait_for(lambda: sum(f.done() for f in stalled) == count), [f.done() for f in stalled]
    refused = [f for f in stalled if f.done()]
    for future in refused:
        assert future.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-concurrent-streams 6" in future.exception().details()
    return refused


def _served_within_a_second(server: ServerProcess, channel: grpc.Channel, seed: int) -> None:
    """16 health checks and a fresh Score, each answered within a second."""
    health = health_pb2_grpc.HealthStub(channel)
    with ThreadPoolExecutor(16) as pool:
        checks = list(pool.map(lambda _: health.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status, range(16)))
    assert checks == [health_pb2.HealthCheckResponse.SERVING] * 16
    with RewardClient(server.target, timeout=1.0, max_attempts=1) as client:
        _score_once(client, seed=seed)


def _ended_by_the_idle_timeout(stalled: list, refused: list, advice: str) -> None:
    for future in stalled:
        if future in refused:
            continue
        err = future.exception(timeout=30)
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err
        assert "no message arrived for 5 s (the server's --stream-idle-timeout)" in err.details()
        assert advice in err.details()


def test_stalled_streams_leave_health_and_a_fresh_score_served():
    """Clients that open streams, send a header and then nothing fill the server's stream
    slots. Health and a fresh Score are still answered within a second, a stream past the
    limit is refused at once, and the stalled streams end with the idle timeout's status."""
    args = ("--metrics-port", "0", "--max-concurrent-rpcs", "8", "--max-concurrent-streams", "6", "--stream-idle-timeout", "5")
    stop = threading.Event()
    with ServerProcess(*args) as server, grpc.insecure_channel(server.target) as channel:
        try:
            # As many stalled clients as --max-concurrent-rpcs: 6 take the stream slots.
            stalled = [_stalled_stream(channel, stop) for _ in range(8)]
            refused = _refused_at_once(stalled, 2)
            assert wait_for(lambda: _in_flight(server, "ScoreLogitsStream") == 6), metrics(server)
            _served_within_a_second(server, channel, seed=11)
            # The stalled ones end once they have sent nothing for the idle timeout.
            _ended_by_the_idle_timeout(stalled, refused, "send the header and then the blocks without pauses that long")
        finally:
            stop.set()
        # ... which freed their slots.
        assert wait_for(lambda: _in_flight(server, "ScoreLogitsStream") == 0), metrics(server)
        held = HeldStream(seed=3)
        held.release.set()
        response = pb_grpc.RewardServiceStub(channel).ScoreLogitsStream(held.messages(), timeout=30)
        assert_same(wire.scores_from_proto(response.result), held.expected())
        idle = [e for e in requests_of(server) if e["rpc"] == "ScoreLogitsStream" and e["status"] == "DEADLINE_EXCEEDED"]
        assert len(idle) == 6 and all(e["request_id"] == "held" for e in idle)
        _check_traceback_free(server)


def _stalled_upload(channel: grpc.Channel, stop: threading.Event, timeout: float = 60):
    """A unary Score whose request never arrives: the call's headers, then nothing until
    ``stop`` (a client stream with no message is the same on the wire)."""

    def messages():
        stop.wait(timeout)
        return
        yield

    call = channel.stream_unary("/corrpo.v1.RewardService/Score", request_serializer=None, response_deserializer=None)
    return call.future(messages(), timeout=timeout)


def test_stalled_unary_uploads_leave_health_and_a_fresh_score_served():
    """Unary calls whose message never arrives are uploads in progress, admitted like
    streams: past --max-concurrent-streams they are refused at once, health and a fresh
    Score are answered meanwhile, and the stalled ones end with the idle timeout's status."""
    args = ("--metrics-port", "0", "--max-concurrent-rpcs", "8", "--max-concurrent-streams", "6", "--stream-idle-timeout", "5")
    stop = threading.Event()
    with ServerProcess(*args) as server, grpc.insecure_channel(server.target) as channel:
        try:
            stalled = [_stalled_upload(channel, stop) for _ in range(16)]  # more than the server's threads
            refused = _refused_at_once(stalled, 10)
            _served_within_a_second(server, channel, seed=12)
            _ended_by_the_idle_timeout(stalled, refused, "send the request without pauses that long")
        finally:
            stop.set()
        with RewardClient(server.target, timeout=30) as client:  # the slots are free again
            _score_once(client, seed=13)
        _check_traceback_free(server)


def test_a_stream_that_stalls_between_blocks_is_ended():
    with ServerProcess("--stream-idle-timeout", "2") as server, grpc.insecure_channel(server.target) as channel:
        held = HeldStream()
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.RewardServiceStub(channel).ScoreLogitsStream(held.messages(), timeout=60)
        held.release.set()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no message arrived for 2 s" in info.value.details()
        assert wait_for(lambda: requests_of(server)), server.log()
        line = requests_of(server)[-1]
        assert line["status"] == "DEADLINE_EXCEEDED" and line["tokens"] == held.rows_before
        _check_traceback_free(server)


def test_streams_per_peer_limit():
    args = ("--metrics-port", "0", "--max-streams-per-peer", "2")
    with ServerProcess(*args) as server, grpc.insecure_channel(server.target) as channel:
        streams = [HeldStream(seed=i) for i in range(2)]
        stub = pb_grpc.RewardServiceStub(channel)
        futures = [stub.ScoreLogitsStream.future(s.messages(), timeout=60) for s in streams]
        assert wait_for(lambda: _in_flight(server, "ScoreLogitsStream") == 2), metrics(server)
        third = HeldStream(seed=5)
        third.release.set()
        with pytest.raises(grpc.RpcError) as info:
            stub.ScoreLogitsStream(third.messages(), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "holds 2 logits streams, the server's limit per client (--max-streams-per-peer 2)" in info.value.details()
        with RewardClient(server.target) as client:
            _score_once(client)  # unary calls are not limited per peer
        for s, f in zip(streams, futures):
            s.release.set()
            assert_same(wire.scores_from_proto(f.result().result), s.expected())
        response = stub.ScoreLogitsStream(third.messages(), timeout=30)
        assert_same(wire.scores_from_proto(response.result), third.expected())
        _check_traceback_free(server)


def _stats_request(seed=0) -> bytes:
    r = make_rollouts(np.random.default_rng(seed), [2], vocab=64)
    stats = corrpo.token_stats(np.concatenate(r.logits), np.concatenate(r.token_ids))
    request = pb.ScoreRequest(request_id="auth")
    group = request.groups.add()
    start = 0
    for n, reward in zip(r.lengths, r.rewards):
        payload = pb.TokenStatsPayload(
            entropy=wire.encode(stats.entropy[start : start + n]), grad_norm=wire.encode(stats.grad_norm[start : start + n])
        )
        group.rollouts.add(reward=reward, stats=payload)
        start += n
    return request.SerializeToString()


def test_auth_scheme_is_case_insensitive(tmp_path):
    """RFC 7235: the scheme is case-insensitive and one or more spaces part it from the
    token; the token itself is compared exactly."""
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret-token\n")
    with ServerProcess("--auth-token-file", str(tokens)) as server, grpc.insecure_channel(server.target) as channel:
        score = channel.unary_unary("/corrpo.v1.RewardService/Score", request_serializer=None, response_deserializer=None)
        for value in ("Bearer s3cret-token", "bearer s3cret-token", "BEARER s3cret-token", "bEaReR   s3cret-token"):
            reply = pb.ScoreResponse.FromString(score(_stats_request(), metadata=[("authorization", value)], timeout=30))
            assert reply.result.request_id == "auth", value
        refusals = {
            "Basic s3cret-token": "unsupported authorization scheme (only Bearer is accepted)",
            "Token s3cret-token": "unsupported authorization scheme",
            "s3cret-token": "unsupported authorization scheme",
            "Bearers3cret-token": "unsupported authorization scheme",
            "bearer S3CRET-TOKEN": "invalid token",
            "bearer": "invalid token",
            "bearer s3cret": "invalid token",
        }
        for value, reason in refusals.items():
            with pytest.raises(grpc.RpcError) as info:
                score(_stats_request(), metadata=[("authorization", value)], timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, value
            details = info.value.details()
            assert details.startswith(reason) and details.endswith("send metadata 'authorization: Bearer <token>'"), value
        # The stream checks the same way.
        held = HeldStream()
        held.release.set()
        stub = pb_grpc.RewardServiceStub(channel)
        response = stub.ScoreLogitsStream(held.messages(), metadata=[("authorization", "bearer s3cret-token")], timeout=30)
        assert_same(wire.scores_from_proto(response.result), held.expected())
        _check_traceback_free(server)


def test_admission_flags_are_checked():
    for args, message in (
        (("--max-concurrent-streams", "0"), "--max-concurrent-streams must be in [1, --max-concurrent-rpcs 128], got 0"),
        (("--max-concurrent-rpcs", "4", "--max-concurrent-streams", "5"), "must be in [1, --max-concurrent-rpcs 4], got 5"),
        (("--stream-idle-timeout", "0"), "--stream-idle-timeout must be > 0 seconds, got 0.0"),
        (("--max-streams-per-peer", "-1"), "--max-streams-per-peer must be >= 0 (0: no limit), got -1"),
        (("--max-tokens", str(2**40)), "--max-tokens must be in [1, 2147483648], got 1099511627776"),
    ):
        result = _serve("--port", "0", *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr[-500:])
