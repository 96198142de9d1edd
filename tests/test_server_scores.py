"""Every payload kind gives the same numbers through a real server process as in-process."""

from __future__ import annotations

import asyncio
import math

import grpc
import ml_dtypes
import numpy as np
import pytest
import torch

import corrpo
from corrpo import _triton, wire
from corrpo.client import AsyncRewardClient, RewardClient
from corrpo.v1 import reward_service_pb2 as pb
from corrpo.v1 import reward_service_pb2_grpc as pb_grpc
from rollouts import make_rollouts

SETTINGS = dict(method="pearson", min_tokens=5, coef=0.5, gate="correct", threshold=0.5, advantage="drgrpo")


def in_process(logits, token_ids, rewards, group_sizes, temperature=1.0, backend="cpu", **settings):
    """The expected scores, from corrpo's functions called one by one on all tokens."""
    lengths = [len(i) for i in token_ids]
    ids = np.concatenate(token_ids)
    stats = corrpo.token_stats(np.concatenate(logits), ids, temperature=temperature, backend=backend)
    method, min_tokens = settings.get("method", "spearman"), settings.get("min_tokens", 8)
    rc = corrpo.rollout_correlations(stats.entropy, stats.grad_norm, lengths, method=method, min_tokens=min_tokens)
    reg_settings = {k: settings[k] for k in ("coef", "gate", "threshold", "advantage") if k in settings}
    out = corrpo.regularize(rewards, rc.rho, group_sizes, **reg_settings)
    fp = corrpo.fingerprint(stats.entropy, stats.grad_norm, ids, lengths, method=method, min_tokens=min_tokens)
    return stats, rc, out, fp


def assert_scores(scores: corrpo.Scores, stats, rc, out, fp, lengths, rtol=0.0):
    np.testing.assert_allclose(scores.rho, rc.rho, rtol=rtol, atol=rtol)
    assert scores.reasons == rc.reasons
    np.testing.assert_allclose(scores.rewards, out.rewards, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(scores.advantages, out.advantages, rtol=rtol, atol=10 * rtol)
    np.testing.assert_array_equal(scores.regularized, out.applied)
    np.testing.assert_array_equal(scores.n_tokens, lengths)
    ends = np.cumsum(lengths)
    for i, (end, n) in enumerate(zip(ends, lengths)):
        np.testing.assert_allclose(scores.entropy_mean[i], stats.entropy[end - n : end].astype(np.float64).mean(), rtol=1e-6)
        np.testing.assert_allclose(scores.grad_norm_mean[i], stats.grad_norm[end - n : end].astype(np.float64).mean(), rtol=1e-6)
    got = scores.fingerprint
    for name in ("rho_pooled", "rho_unique", "rho_rollout_mean", "entropy_mean", "strength_mean"):
        assert math.isclose(getattr(got, name), getattr(fp, name), rel_tol=1e-9, abs_tol=rtol), name
    assert (got.n_tokens, got.n_unique_tokens, got.n_rollouts, got.n_rollouts_defined) == (
        fp.n_tokens,
        fp.n_unique_tokens,
        fp.n_rollouts,
        fp.n_rollouts_defined,
    )


@pytest.mark.parametrize("send", ["stats", "logits"])
@pytest.mark.parametrize("settings", [{}, SETTINGS], ids=["defaults", "custom"])
def test_logits_reduced_locally_or_streamed_match_in_process(client, rng, send, settings):
    r = make_rollouts(rng, [4, 3, 5])
    scores = client.score(
        logits=r.logits, token_ids=r.token_ids, rewards=r.rewards, group_sizes=r.group_sizes, send=send,
        block_bytes=3000, **settings,
    )
    assert_scores(scores, *in_process(r.logits, r.token_ids, r.rewards, r.group_sizes, **settings), r.lengths)
    # The echo is the request's settings with what a logits payload gives filled in.
    assert scores.config == corrpo.ScoreConfig(**settings, measure="logit_grad", estimator="exact")
    assert scores.backend == f"cpu/{corrpo.simd_isa()}"
    np.testing.assert_array_equal(scores.group_sizes, r.group_sizes)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "torch.bfloat16"])
def test_half_precision_logits_stream(client, rng, dtype):
    r = make_rollouts(rng, [3, 3])
    if dtype == "torch.bfloat16":
        logits = [torch.from_numpy(x).to(torch.bfloat16) for x in r.logits]
        expected_logits = [x.float().numpy() for x in logits]
    else:
        np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
        logits = [x.astype(np_dtype) for x in r.logits]
        expected_logits = [x.astype(np.float32) for x in logits]
    scores = client.score(logits=logits, token_ids=r.token_ids, rewards=r.rewards, group_sizes=3, send="logits")
    # Half-precision logits widen exactly to float32, so in-process on the widened values is the reference.
    assert_scores(scores, *in_process(expected_logits, r.token_ids, r.rewards, [3, 3]), r.lengths)


def test_temperature_applies_to_logits(client, rng):
    r = make_rollouts(rng, [4])
    for send in ("stats", "logits"):
        scores = client.score(logits=r.logits, token_ids=r.token_ids, rewards=r.rewards, group_sizes=4, temperature=0.7, send=send)
        assert_scores(scores, *in_process(r.logits, r.token_ids, r.rewards, [4], temperature=0.7), r.lengths)


def test_stats_payload_from_user_statistics_verifier_free(client, rng):
    r = make_rollouts(rng, [2, 2])
    stats = [corrpo.token_stats(x, i) for x, i in zip(r.logits, r.token_ids)]
    scores = client.score(
        entropy=[s.entropy for s in stats], grad_norm=[torch.from_numpy(s.grad_norm) for s in stats],
        logprob=[s.logprob for s in stats], group_sizes=[2, 2],
    )
    _, rc, out, fp = in_process(r.logits, r.token_ids, None, [2, 2])
    np.testing.assert_array_equal(scores.rho, rc.rho)
    np.testing.assert_array_equal(scores.rewards, out.rewards)
    np.testing.assert_array_equal(scores.advantages, out.advantages)
    # Without token ids there is no fingerprint over distinct tokens.
    assert scores.fingerprint.rho_unique is None
    assert scores.fingerprint.rho_pooled == fp.rho_pooled


def _unary_logits_request(r, dtype: int) -> pb.ScoreRequest:
    request = pb.ScoreRequest(request_id="unary-logits", config=wire.config_to_proto(corrpo.ScoreConfig()))
    it = iter(zip(r.logits, r.token_ids, r.rewards))
    for size in r.group_sizes:
        group = request.groups.add()
        for _ in range(size):
            logits, ids, reward = next(it)
            payload = pb.LogitsPayload(logits=wire.encode(logits, dtype), token_ids=wire.encode(ids))
            group.rollouts.add(reward=reward, logits=payload)
    return request


def test_unary_logits_payload(server, rng):
    r = make_rollouts(rng, [3, 2])
    with grpc.insecure_channel(server.target) as channel:
        response = pb_grpc.RewardServiceStub(channel).Score(_unary_logits_request(r, wire.tensor_pb2.DTYPE_FLOAT32))
    scores = wire.scores_from_proto(response.result)
    assert scores.request_id == "unary-logits"
    assert_scores(scores, *in_process(r.logits, r.token_ids, r.rewards, r.group_sizes), r.lengths)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_triton_backend_reduces_streamed_and_unary_logits(triton_server, rng, dtype):
    r = make_rollouts(rng, [3, 2], vocab=300)
    logits = [x.astype(dtype) for x in r.logits]
    widened = [x.astype(np.float32) for x in logits]
    want = in_process(widened, r.token_ids, r.rewards, r.group_sizes, temperature=0.9, backend="triton")
    with RewardClient(triton_server.target, timeout=120) as client:
        scores = client.score(
            logits=logits, token_ids=r.token_ids, rewards=r.rewards, group_sizes=r.group_sizes, send="logits",
            block_bytes=5000, temperature=0.9,
        )
    assert scores.backend == f"triton/{_triton.describe()}"
    assert_scores(scores, *want, r.lengths, rtol=1e-6)
    if dtype == np.float32:
        with grpc.insecure_channel(triton_server.target) as channel:
            response = pb_grpc.RewardServiceStub(channel).Score(_unary_logits_request(r, wire.tensor_pb2.DTYPE_FLOAT32))
        want = in_process(widened, r.token_ids, r.rewards, r.group_sizes, backend="triton")
        assert_scores(wire.scores_from_proto(response.result), *want, r.lengths, rtol=1e-6)


def test_client_reduces_device_tensors_where_they_are(client, rng):
    r = make_rollouts(rng, [2, 2])
    off_host = [torch.empty((len(i), 512), device="meta") for i in r.token_ids]
    with pytest.raises(corrpo.ConfigError, match="send='logits' streams host memory"):
        client.score(logits=off_host, token_ids=r.token_ids, group_sizes=2, send="logits")
    if torch.cuda.is_available():
        logits = [torch.from_numpy(x).cuda() for x in r.logits]
        ids = [torch.from_numpy(i).cuda() for i in r.token_ids]
        scores = client.score(logits=logits, token_ids=ids, rewards=r.rewards, group_sizes=2)
        want = in_process(r.logits, r.token_ids, r.rewards, [2, 2], backend="triton")
        assert_scores(scores, *want, r.lengths, rtol=1e-6)


def test_top_k_payload_matches_in_process_bounds(client, rng):
    r = make_rollouts(rng, [3, 3], vocab=300)
    k = 5
    tops, top_ids, lps = [], [], []
    for z, ids in zip(r.logits, r.token_ids):
        logp = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
        order = np.argsort(-logp, axis=1)[:, :k]
        tops.append(np.take_along_axis(logp, order, 1))
        top_ids.append(order)
        lps.append(logp[np.arange(len(ids)), ids])
    for estimate in ("concentrated_tail", "uniform_tail"):
        scores = client.score(
            top_logprobs=tops, top_token_ids=top_ids, logprob=lps, token_ids=r.token_ids, vocab_size=300,
            rewards=r.rewards, group_sizes=3, top_k_estimate=estimate,
        )
        bounds = [
            corrpo.top_k_stats(t.astype(np.float32), i, lp.astype(np.float32), ids, 300)
            for t, i, lp, ids in zip(tops, top_ids, lps, r.token_ids)
        ]
        h = np.concatenate([b.estimate(estimate)[0] for b in bounds])
        g = np.concatenate([b.estimate(estimate)[1] for b in bounds])
        expected = corrpo.score(h, g, r.lengths, [3, 3], rewards=r.rewards, token_ids=np.concatenate(r.token_ids))
        np.testing.assert_allclose(scores.rho, expected.rho, rtol=1e-12)
        np.testing.assert_allclose(scores.advantages, expected.advantages, rtol=1e-12, atol=1e-12)
        assert scores.config.top_k_estimate == estimate
        lower = np.array([b.entropy_lower.mean() for b in bounds])
        upper = np.array([b.entropy_upper.mean() for b in bounds])
        np.testing.assert_allclose(scores.top_k.entropy_mean_lower, lower, rtol=1e-12)
        np.testing.assert_allclose(scores.top_k.entropy_mean_upper, upper, rtol=1e-12)
        assert np.all(scores.top_k.grad_norm_mean_lower <= scores.top_k.grad_norm_mean_upper)
        # The exact figures lie inside the bounds.
        exact = [corrpo.reference.token_stats(z, i) for z, i in zip(r.logits, r.token_ids)]
        h_exact = np.array([e["entropy"].mean() for e in exact])
        assert np.all((lower <= h_exact + 1e-9) & (h_exact <= upper + 1e-9))


def test_same_request_same_answer(server, rng):
    r = make_rollouts(rng, [4, 4])
    request = _unary_logits_request(r, wire.tensor_pb2.DTYPE_FLOAT32)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RewardServiceStub(channel)
        first, second = stub.Score(request), stub.Score(request)
    assert first.SerializeToString(deterministic=True) == second.SerializeToString(deterministic=True)


def test_async_client_matches_sync(server, client, rng):
    r = make_rollouts(rng, [3, 3])
    expected = client.score(logits=r.logits, token_ids=r.token_ids, rewards=r.rewards, group_sizes=3)

    async def run():
        async with AsyncRewardClient(server.target) as aclient:
            assert await aclient.health() == "SERVING"
            calls = [
                aclient.score(logits=r.logits, token_ids=r.token_ids, rewards=r.rewards, group_sizes=3, send=send)
                for send in ("stats", "logits")
            ]
            return await asyncio.gather(*calls)

    for scores in asyncio.run(run()):
        np.testing.assert_array_equal(scores.rho, expected.rho)
        np.testing.assert_array_equal(scores.advantages, expected.advantages)


def _peak_rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_64_mib_stream_in_4_mib_blocks_matches_and_memory_stays_bounded(rng):
    from corrpo.client import RewardClient
    from corrpo_server import ServerProcess

    vocab, rows = 32768, 512  # 512 rows of 128 KiB: 64 MiB of float32 logits
    logits = rng.standard_normal((rows, vocab), dtype=np.float32) * 3
    ids = rng.integers(0, vocab, rows)
    lengths = [100, 156, 128, 128]
    parts = np.split(np.arange(rows), np.cumsum(lengths)[:-1])
    rollout_logits = [logits[p] for p in parts]
    rollout_ids = [ids[p] for p in parts]
    rewards = [1.0, 0.0, 1.0, 1.0]
    with ServerProcess("--max-message-mib", "8") as server, RewardClient(server.target) as client:

        def peak_growth(**kwargs) -> float:
            with open(f"/proc/{server.process.pid}/clear_refs", "w") as f:
                f.write("5")  # resets the peak RSS
            before = _peak_rss_mib(server.process.pid)
            scores = client.score(send="logits", block_bytes=4 << 20, **kwargs)
            return scores, _peak_rss_mib(server.process.pid) - before

        # Warm the server's allocator with a small stream first.
        client.score(logits=[x[:8] for x in rollout_logits], token_ids=[i[:8] for i in rollout_ids], group_sizes=2, send="logits")
        scores, growth = peak_growth(logits=rollout_logits, token_ids=rollout_ids, rewards=rewards, group_sizes=[2, 2])
        last = [e for e in server.events() if e.get("event") == "request"][-1]
        # Four times the logits: the server's memory must not grow with the stream.
        _, growth_4x = peak_growth(logits=[logits] * 4, token_ids=[ids] * 4, group_sizes=4)
    assert last["status"] == "OK" and last["tokens"] == rows
    assert_scores(scores, *in_process(rollout_logits, rollout_ids, rewards, [2, 2]), lengths)
    assert growth < 48, f"server peak RSS grew by {growth:.1f} MiB during a 64 MiB stream"
    assert growth_4x < 48, f"server peak RSS grew by {growth_4x:.1f} MiB during a 256 MiB stream"


def test_stats_of_a_named_measure_against_scipy(client, rng):
    """Stats that carry the paper's measure: rho per rollout is of (H, strength), the
    comparison fingerprint of (H, G), and the settings are echoed as resolved."""
    from scipy import stats as sps

    lengths = [12, 9, 15, 10]
    h = [rng.gamma(2.0, size=n).astype(np.float32) for n in lengths]
    s = [rng.gamma(1.0, size=n) for n in lengths]
    g = [rng.random(n).astype(np.float32) for n in lengths]
    ids = [rng.integers(0, 5, n) for n in lengths]
    scores = client.score(
        entropy=h, strength=s, grad_norm=g, token_ids=ids, rewards=[1.0, 0.0, 1.0, 0.0], group_sizes=[2, 2],
        measure="l1_mean", estimator="subsample", coef=0.5,
    )
    want_rho = [sps.spearmanr(a, b)[0] for a, b in zip(h, s)]
    np.testing.assert_allclose(scores.rho, want_rho, rtol=1e-12)
    np.testing.assert_allclose(scores.rewards, np.array([1.0, 0.0, 1.0, 0.0]) - 0.5 * np.array(want_rho), rtol=1e-12)
    np.testing.assert_allclose(scores.grad_norm_mean, [x.mean() for x in s], rtol=1e-12)
    pooled = sps.spearmanr(np.concatenate(h), np.concatenate(s))[0]
    assert math.isclose(scores.fingerprint.rho_pooled, pooled, rel_tol=1e-9)
    compare = scores.logit_grad
    assert compare is not None
    assert math.isclose(compare.rho_pooled, sps.spearmanr(np.concatenate(h), np.concatenate(g))[0], rel_tol=1e-9)
    per_rollout = np.mean([sps.spearmanr(a, b)[0] for a, b in zip(h, g)])
    assert math.isclose(compare.rho_rollout_mean, per_rollout, rel_tol=1e-9)
    c = scores.config
    assert (c.measure, c.estimator, c.objective, c.estimator_k, c.estimator_seed) == ("l1_mean", "subsample", "logit", 16, 0)
    # Without grad_norm there is nothing to compare with.
    alone = client.score(entropy=h, strength=s, group_sizes=[2, 2], measure="l1_mean")
    assert alone.logit_grad is None and alone.config.estimator == "exact"
    np.testing.assert_allclose(alone.rho, want_rho, rtol=1e-12)


def test_a_client_that_names_no_measure_gets_logit_grad(client, server, rng):
    """What a client built before measures existed sends (no measure, estimator, objective
    in its config, grad_norm in its stats) is scored as before: rho(H, G), echoed as
    logit_grad by the exact estimator, with no comparison fingerprint."""
    r = make_rollouts(rng, [4, 4])
    stats = [corrpo.token_stats(z, i) for z, i in zip(r.logits, r.token_ids)]
    request = pb.ScoreRequest(request_id="old-client", config=pb.ScoreConfig(method=pb.METHOD_SPEARMAN, coef=0.2))
    it = iter(zip(stats, r.rewards, r.token_ids))
    for size in r.group_sizes:
        group = request.groups.add()
        for _ in range(size):
            st, reward, ids = next(it)
            payload = pb.TokenStatsPayload(
                entropy=wire.encode(st.entropy), grad_norm=wire.encode(st.grad_norm), token_ids=wire.encode(np.asarray(ids, np.int64))
            )
            group.rollouts.add(reward=reward, stats=payload)
    wire_config = request.config.SerializeToString()
    assert all(request.config.HasField(f) is False for f in ("estimator_k", "estimator_seed"))
    assert request.config.measure == request.config.estimator == request.config.objective == 0
    with grpc.insecure_channel(server.target) as channel:
        result = pb_grpc.RewardServiceStub(channel).Score(request).result
    assert request.config.SerializeToString() == wire_config
    assert result.config.measure == pb.MEASURE_LOGIT_GRAD and result.config.estimator == pb.ESTIMATOR_EXACT
    assert result.config.objective == pb.OBJECTIVE_UNSPECIFIED
    assert not result.HasField("logit_grad_fingerprint") and not result.HasField("weights_version")
    got = wire.scores_from_proto(result)
    want = in_process(r.logits, r.token_ids, r.rewards, r.group_sizes, coef=0.2)
    assert_scores(got, *want, r.lengths)
