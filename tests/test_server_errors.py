"""Bad input gets the right status and a message naming the field; the server keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corrpo import wire
from corrpo.v1 import reward_service_pb2 as pb
from corrpo.v1 import tensor_pb2
from corrpo_server.service import block_view

F32, I32, I64 = tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_INT32, tensor_pb2.DTYPE_INT64
INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


def t(values, dtype=None) -> tensor_pb2.Tensor:
    return wire.encode(np.asarray(values), dtype)


def stats_rollout(n=10, seed=0, reward=1.0, **overrides) -> pb.Rollout:
    rng = np.random.default_rng(seed)
    fields = dict(entropy=t(rng.random(n), F32), grad_norm=t(rng.random(n), F32))
    fields.update(overrides)
    rollout = pb.Rollout(stats=pb.TokenStatsPayload(**fields))
    if reward is not None:
        rollout.reward = reward
    return rollout


def logits_rollout(logits, ids, reward=1.0) -> pb.Rollout:
    return pb.Rollout(reward=reward, logits=pb.LogitsPayload(logits=t(logits, F32), token_ids=t(ids, I64)))


def request(*groups, config=None, request_id="bad-input") -> pb.ScoreRequest:
    message = pb.ScoreRequest(request_id=request_id, config=config or pb.ScoreConfig())
    for rollouts in groups:
        message.groups.add().rollouts.extend(rollouts)
    return message


GOOD = request([stats_rollout(seed=1), stats_rollout(seed=2)])
LOGITS = np.random.default_rng(3).standard_normal((6, 9)).astype(np.float32)


def with_nan(z, row, col):
    z = z.copy()
    z[row, col] = np.nan
    return z


def top_k_rollout(**overrides) -> pb.Rollout:
    fields = dict(
        top_logprobs=t([[-0.5, -1.5]] * 3, F32),
        top_token_ids=t([[1, 2]] * 3, I64),
        logprob=t([-0.5, -1.5, -0.5], F32),
        token_ids=t([1, 2, 1], I64),
        vocab_size=10,
    )
    fields.update(overrides)
    return pb.Rollout(top_k=pb.TopKPayload(**fields))


UNARY_CASES = {
    "wrong byte count": (
        request([stats_rollout(entropy=tensor_pb2.Tensor(dtype=F32, shape=[10], data=b"\0" * 38))]),
        INVALID,
        "groups[0].rollouts[0].stats.entropy.data holds 38 bytes, but DTYPE_FLOAT32 [10] needs 40",
    ),
    "wrong dtype": (
        request([stats_rollout(grad_norm=t(np.arange(10), I32))]),
        INVALID,
        "groups[0].rollouts[0].stats.grad_norm.dtype must be DTYPE_FLOAT32 or DTYPE_FLOAT64, got DTYPE_INT32",
    ),
    "wrong rank": (
        request([stats_rollout(entropy=t(np.zeros((2, 5)), F32))]),
        INVALID,
        "stats.entropy.shape must have 1 dimension(s), got [2, 5]",
    ),
    "mismatched lengths": (
        request([stats_rollout(grad_norm=t(np.zeros(9), F32))]),
        INVALID,
        "groups[0].rollouts[0].stats.grad_norm has 9 tokens, but groups[0].rollouts[0].stats.entropy has 10",
    ),
    "NaN entropy": (
        request([stats_rollout(), stats_rollout(entropy=t([0.5] * 4 + [np.nan] + [0.5] * 5, F32))]),
        INVALID,
        "groups[0].rollouts[1].stats.entropy[4] is nan; it must be finite, >= 0",
    ),
    "NaN logits": (
        request([logits_rollout(LOGITS, [0] * 6), logits_rollout(with_nan(LOGITS, 2, 3), [0] * 6)]),
        INVALID,
        "groups[0].rollouts[1].logits.logits: logits at row 2: vocabulary index 3 is NaN",
    ),
    "token out of range": (
        request([logits_rollout(LOGITS, [0, 1, 2, 9, 0, 0])]),
        INVALID,
        "token id at row 3: 9 is outside the vocabulary [0, 9)",
    ),
    "token ids and rows": (
        request([logits_rollout(LOGITS, [0, 1])]),
        INVALID,
        "groups[0].rollouts[0].logits.token_ids has 2 tokens, but groups[0].rollouts[0].logits.logits has 6 rows",
    ),
    "no groups": (request(), INVALID, "groups is empty"),
    "empty group": (request([stats_rollout()], []), INVALID, "groups[1].rollouts is empty"),
    "no payload": (request([pb.Rollout(reward=1.0)]), INVALID, "groups[0].rollouts[0] has no payload"),
    "some rewards missing": (
        request([stats_rollout(), stats_rollout(reward=None)]),
        INVALID,
        "groups[0].rollouts[1].reward is missing",
    ),
    "NaN reward": (request([stats_rollout(reward=float("nan"))]), INVALID, "groups[0].rollouts[0].reward is nan"),
    "no request id": (request([stats_rollout()], request_id=""), INVALID, "request_id must be set"),
    "min_tokens 1": (
        request([stats_rollout()], config=pb.ScoreConfig(min_tokens=1)),
        INVALID,
        "config.min_tokens must be an integer >= 2, got 1",
    ),
    "negative temperature": (
        request([stats_rollout()], config=pb.ScoreConfig(temperature=-1.0)),
        INVALID,
        "config.temperature must be > 0, got -1.0",
    ),
    "NaN coef": (
        request([stats_rollout()], config=pb.ScoreConfig(coef=float("nan"))),
        INVALID,
        "config.coef must be finite",
    ),
    "unknown enum": (
        request([stats_rollout()], config=pb.ScoreConfig(method=7)),
        INVALID,
        "config.method: unknown enum value 7",
    ),
    "top-k logprob above the top-k": (
        request([top_k_rollout(logprob=t([-0.5, -1.5, -0.1], F32), token_ids=t([1, 2, 7], I64))]),
        INVALID,
        "groups[0].rollouts[0].top_k.logprob: token 2 is not among its top-k ids",
    ),
    "top-k without vocabulary": (
        request([top_k_rollout(vocab_size=0)]),
        INVALID,
        "groups[0].rollouts[0].top_k.vocab_size must be set",
    ),
    "named measure without strength": (
        request([stats_rollout()], config=pb.ScoreConfig(measure=pb.MEASURE_L1_MEAN)),
        INVALID,
        "groups[0].rollouts[0].stats.strength must be set: the l1_mean value of every token",
    ),
    "strength sent for logit_grad": (
        request([stats_rollout(strength=t(np.ones(10), F32))]),
        INVALID,
        "groups[0].rollouts[0].stats.strength is for measures other than logit_grad",
    ),
    "negative strength": (
        request([stats_rollout(strength=t([1.0] * 9 + [-1.0], F32))], config=pb.ScoreConfig(measure=pb.MEASURE_L1_MEAN)),
        INVALID,
        "groups[0].rollouts[0].stats.strength[9] is -1.0; it must be finite, >= 0",
    ),
    "logits with a parameter measure": (
        request([logits_rollout(LOGITS, [0] * 6)], config=pb.ScoreConfig(measure=pb.MEASURE_NUCLEAR_QKVO)),
        INVALID,
        "config.measure: logits payloads give only the logit_grad measure",
    ),
    "top-k with the exact estimator": (
        request([top_k_rollout()], config=pb.ScoreConfig(estimator=pb.ESTIMATOR_EXACT)),
        INVALID,
        "top-k payloads give logit_grad by the 'top_k' estimator, not 'exact'",
    ),
    "jvp cannot give nuclear": (
        request(
            [stats_rollout(strength=t(np.ones(10), F32))],
            config=pb.ScoreConfig(measure=pb.MEASURE_NUCLEAR_QKVO, estimator=pb.ESTIMATOR_JVP),
        ),
        INVALID,
        "estimator 'jvp' cannot give 'nuclear_qkvo'",
    ),
    "objective of logit_grad": (
        request([stats_rollout()], config=pb.ScoreConfig(objective=pb.OBJECTIVE_LOGIT)),
        INVALID,
        "config.objective: objective applies to parameter-space measures",
    ),
    "k of the exact estimator": (
        request([stats_rollout(strength=t(np.ones(10), F32))], config=pb.ScoreConfig(measure=pb.MEASURE_L1_MEAN, estimator_k=4)),
        INVALID,
        "config.estimator_k: estimator_k applies to the subsample, jvp, jvp_cv estimators, not 'exact'",
    ),
    "unknown measure": (
        request([stats_rollout()], config=pb.ScoreConfig(measure=42)),
        INVALID,
        "config.measure: unknown enum value 42",
    ),
    "tokens mixed with stats": (
        request([stats_rollout(), pb.Rollout(reward=1.0, tokens=pb.TokensPayload(prompt_ids=t([1], I64), response_ids=t([2], I64)))]),
        INVALID,
        "groups: tokens payloads cannot be mixed with other payload kinds",
    ),
    "too many tokens": (
        request([stats_rollout(n=200_001)]),
        EXHAUSTED,
        "more than 200000 tokens",
    ),
    # Sizes from the wire that would overflow NumPy or a C long: refused before any use.
    "empty logits of a vocabulary of 2**62": (
        request([pb.Rollout(logits=pb.LogitsPayload(
            logits=tensor_pb2.Tensor(dtype=F32, shape=[0, 2**62]), token_ids=t(np.zeros(0, np.int64), I64)
        ))]),
        INVALID,
        "the product of the non-zero dimensions of groups[0].rollouts[0].logits.logits.shape [0, 4611686018427387904] "
        "is 4611686018427387904; it must be in [0, 2147483648]",
    ),
    "empty rows of int64-max width": (
        request([pb.Rollout(logits=pb.LogitsPayload(
            logits=tensor_pb2.Tensor(dtype=F32, shape=[2**63 - 1, 0]), token_ids=t(np.zeros(0, np.int64), I64)
        ))]),
        INVALID,
        "logits.logits.shape [9223372036854775807, 0] is 9223372036854775807",
    ),
    "dimensions whose product overflows int64": (
        request([top_k_rollout(top_logprobs=tensor_pb2.Tensor(dtype=F32, shape=[2**40, 2**40]))]),
        INVALID,
        "groups[0].rollouts[0].top_k.top_logprobs.shape [1099511627776, 1099511627776] is 1208925819614629174706176",
    ),
    "empty top-k of k = 2**40": (
        request([top_k_rollout(
            top_logprobs=tensor_pb2.Tensor(dtype=F32, shape=[0, 2**40]),
            top_token_ids=tensor_pb2.Tensor(dtype=I64, shape=[0, 2**40]),
            logprob=t(np.zeros(0), F32), token_ids=t(np.zeros(0), I64),
        )]),
        INVALID,
        "top_k.top_logprobs.shape [0, 1099511627776] is 1099511627776",
    ),
    "top-k vocabulary of 2**64 - 1": (
        request([top_k_rollout(vocab_size=2**64 - 1)]),
        INVALID,
        "groups[0].rollouts[0].top_k.vocab_size is 18446744073709551615; it must be in [1, 2147483648]",
    ),
    "top-k vocabulary of 2**63": (
        request([top_k_rollout(vocab_size=2**63)]),
        INVALID,
        "top_k.vocab_size is 9223372036854775808",
    ),
    # Finite rewards whose regularized value or group spread float64 cannot hold: refused by
    # name, never NaN advantages with OK.
    "regularized reward overflows": (
        # entropy == grad_norm: rho = +1, so r~ = 1.7e308 + 1.7e308.
        request(
            [stats_rollout(reward=1.7e308, grad_norm=t(np.arange(10.0), F32), entropy=t(np.arange(10.0), F32)),
             stats_rollout(reward=0.0)],
            config=pb.ScoreConfig(coef=-1.7e308),
        ),
        INVALID,
        "groups[0].rollouts[0].reward: r - coef * rho = 1.7e308 - -1.7e308 * 1 overflows float64",
    ),
    "drgrpo advantage overflows": (
        request(
            [stats_rollout(reward=1.0)],
            [stats_rollout(reward=1.7e308), stats_rollout(reward=-1.7e308), stats_rollout(reward=-1.7e308)],
            config=pb.ScoreConfig(coef=0.0, advantage=pb.ADVANTAGE_MODE_DRGRPO),
        ),
        INVALID,
        "groups[1].rollouts[0].reward: its drgrpo advantage (r~ minus the mean of its group) overflows float64",
    ),
}


def raw_call(channel: grpc.Channel, method: str, payload, streaming=False):
    path = f"/corrpo.v1.RewardService/{method}"
    if streaming:
        call = channel.stream_unary(path, request_serializer=None, response_deserializer=None)
    else:
        call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    return call(payload, timeout=30)


@pytest.fixture(scope="module", params=["cpu", "triton"])
def channel(request):
    """Every case against both backends: the Triton one must fail the same way."""
    server = request.getfixturevalue("server" if request.param == "cpu" else "triton_server")
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        yield ch


def assert_fails(channel, method, payload, code, needle, streaming=False):
    with pytest.raises(grpc.RpcError) as info:
        raw_call(channel, method, payload, streaming)
    assert info.value.code() == code, info.value.details()
    assert needle in info.value.details()
    # ... and the server answers a good request right after.
    reply = pb.ScoreResponse.FromString(raw_call(channel, "Score", GOOD.SerializeToString()))
    assert len(reply.result.groups[0].rollouts) == 2


@pytest.mark.parametrize("case", list(UNARY_CASES), ids=list(UNARY_CASES))
def test_bad_unary_request(channel, case):
    message, code, needle = UNARY_CASES[case]
    assert_fails(channel, "Score", message.SerializeToString(), code, needle)


def test_garbage_bytes(channel):
    assert_fails(channel, "Score", b"\xff\xff\xff\xff", INVALID, "not a valid corrpo.v1.ScoreRequest")


def test_huge_message(channel):
    big = request([stats_rollout(entropy=tensor_pb2.Tensor(dtype=F32, shape=[5 << 20], data=bytes(20 << 20)))])
    assert_fails(channel, "Score", big.SerializeToString(), EXHAUSTED, "larger than max")


def header(lengths=(3, 3), vocab=9, rewards=(1.0, 0.0), **overrides) -> pb.ScoreLogitsStreamRequest:
    fields = dict(
        request_id="stream",
        dtype=F32,
        vocab_size=vocab,
        token_ids=t(np.zeros(sum(lengths), np.int64), I64),
    )
    fields.update(overrides)
    message = pb.LogitsStreamHeader(**fields)
    group = message.groups.add()
    for n, r in zip(lengths, rewards):
        group.rollouts.add(num_tokens=n, reward=r)
    return pb.ScoreLogitsStreamRequest(header=message)


def block(rows: np.ndarray) -> pb.ScoreLogitsStreamRequest:
    return pb.ScoreLogitsStreamRequest(block=pb.LogitsBlock(data=np.ascontiguousarray(rows, np.float32).tobytes()))


STREAM_CASES = {
    "missing header": ([block(LOGITS)], "the first message of a ScoreLogitsStream must be its header"),
    "empty stream": ([], "the stream is empty"),
    "second header": ([header(), block(LOGITS[:2]), header()], "message 2 of the stream is not a logits block"),
    "partial row": (
        [header(), pb.ScoreLogitsStreamRequest(block=pb.LogitsBlock(data=bytes(40)))],
        "blocks[0] holds 40 bytes, not a positive multiple of one row (9 x 4 = 36 bytes)",
    ),
    "too many rows": ([header(), block(LOGITS), block(LOGITS[:1])], "blocks[1] brings the stream to 7 rows"),
    "ended early": ([header(), block(LOGITS[:4])], "the stream ended after 4 of the 6 rows"),
    "NaN in second rollout": (
        [header(), block(LOGITS[:2]), block(with_nan(LOGITS, 3, 5)[2:])],
        # Global row 3 is row 1 of the second block, and the first token of the second rollout.
        "blocks[1]: logits at row 1: vocabulary index 5 is NaN (logits must be finite or -inf) "
        "(row 1 of the block is groups[0].rollouts[1], token 0)",
    ),
    "bad dtype": ([header(dtype=I32)], "header.dtype must be one of"),
    "ids and layout": (
        [header(token_ids=t(np.zeros(5), I64))],
        "header.token_ids has 5 ids, but the rollouts declare 6 tokens",
    ),
    "bad config": ([header(config=pb.ScoreConfig(temperature=0.0))], "header.config.temperature must be > 0"),
}


@pytest.mark.parametrize("case", list(STREAM_CASES), ids=list(STREAM_CASES))
def test_bad_stream(channel, case):
    messages, needle = STREAM_CASES[case]
    assert_fails(channel, "ScoreLogitsStream", iter([m.SerializeToString() for m in messages]), INVALID, needle, True)


def test_stream_over_the_token_limit(channel):
    too_long = header(lengths=(200_001,), rewards=(1.0,))
    assert_fails(
        channel, "ScoreLogitsStream", iter([too_long.SerializeToString()]), EXHAUSTED, "declares 200001 tokens", True
    )


def layout(counts, vocab=9, **overrides) -> pb.ScoreLogitsStreamRequest:
    """A header whose rollouts declare ``counts`` tokens (no token ids sent)."""
    message = pb.LogitsStreamHeader(**{"request_id": "stream", "dtype": F32, "vocab_size": vocab, **overrides})
    message.groups.add().rollouts.extend(pb.RolloutLayout(num_tokens=n, reward=1.0) for n in counts)
    return pb.ScoreLogitsStreamRequest(header=message)


# Counts and vocabulary sizes of a stream header that do not fit a C long, or a message.
STREAM_SIZE_CASES = {
    "a count of 2**64 - 1": (layout([2**64 - 1]), EXHAUSTED, "the stream declares 18446744073709551615 tokens"),
    "counts summing past int64": (layout([2**63 - 1, 2**63 - 1]), EXHAUSTED, "declares 18446744073709551614 tokens"),
    "a vocabulary of 2**64 - 1": (
        layout([3], vocab=2**64 - 1),
        INVALID,
        "header.vocab_size is 18446744073709551615; it must be in [1, 2147483648]",
    ),
    "a vocabulary of 0": (layout([3], vocab=0), INVALID, "header.vocab_size is 0; it must be in [1, 2147483648]"),
    "rows larger than any message": (
        header(vocab=2**31),
        EXHAUSTED,
        "one row of logits is 2147483648 x 4 = 8589934592 bytes, more than the server's largest message (16777216 bytes",
    ),
}


@pytest.mark.parametrize("case", list(STREAM_SIZE_CASES), ids=list(STREAM_SIZE_CASES))
def test_stream_sizes_out_of_range(channel, case):
    message, code, needle = STREAM_SIZE_CASES[case]
    assert_fails(channel, "ScoreLogitsStream", iter([message.SerializeToString()]), code, needle, True)


def test_long_inputs_are_quoted_short(channel):
    """A message that echoes its input stays far below gRPC's metadata limit (8-16 KiB),
    past which the client would see a transport error instead of the status."""
    wide = request([stats_rollout(entropy=tensor_pb2.Tensor(dtype=F32, shape=[1] * 10_000, data=b"\0" * 4))])
    with pytest.raises(grpc.RpcError) as info:
        raw_call(channel, "Score", wide.SerializeToString())
    assert info.value.code() == INVALID
    details = info.value.details()
    assert details == (
        "groups[0].rollouts[0].stats.entropy.shape must have 1 dimension(s), got [1, 1, 1, 1, 1, 1, 1, 1, ...] "
        "(10000 dimensions)"
    )


@pytest.mark.parametrize("text", ["x" * 30_000, "é" * 20_000, "shape [0, 1]"])
def test_every_status_message_is_capped(text):
    """Whatever raised it (a path echoed by ReloadWeights, a future message), the one place
    that turns errors into statuses caps them: the start, an ellipsis and the total size."""
    from corrpo_server.failure import invalid
    from corrpo_server.observe import MAX_DETAILS, Record, _outcome

    code, message = _outcome(invalid(f"path: {text!r} is no model"), None, Record(rpc="Score", peer="test"))
    assert code == INVALID and len(message.encode()) <= MAX_DETAILS == 512
    full = f"path: {text!r} is no model"
    if len(full.encode()) <= MAX_DETAILS:
        assert message == full
    else:
        assert message.startswith("path: '" + text[:100]) and message.endswith(f"... ({len(full.encode())} bytes in all)")


@pytest.mark.parametrize("advantage", [pb.ADVANTAGE_MODE_GRPO, pb.ADVANTAGE_MODE_DRGRPO])
def test_rewards_near_the_float64_limit(channel, advantage):
    """Rewards whose sum or spread overflow a textbook mean and std: finite advantages, equal
    to the float64 formula on the rewards scaled down by 2**1000 (Dr. GRPO's scaled back)."""
    rewards = [1.7e308, -0.1e308, 0.9e308, 1.1e308]
    rollouts = [stats_rollout(seed=i, reward=r) for i, r in enumerate(rewards)]
    config = pb.ScoreConfig(coef=0.0, advantage=advantage)
    reply = pb.ScoreResponse.FromString(raw_call(channel, "Score", request(rollouts, config=config).SerializeToString()))
    got = np.array([r.advantage for r in reply.result.groups[0].rollouts])
    scale = 2.0**-1000
    x = np.array(rewards) * scale
    if advantage == pb.ADVANTAGE_MODE_GRPO:
        want = (x - x.mean()) / (x.std(ddof=1) + 1e-6 * scale)
    else:
        want = (x - x.mean()) / scale
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_array_equal([r.reward for r in reply.result.groups[0].rollouts], rewards)


def test_pearson_of_statistics_near_the_float64_limit(channel):
    """Entropies about 1e308 (finite, so accepted): Pearson's sums of squares would overflow
    into a NaN rho reported as defined; rho and the means must be those of the values scaled."""
    rng = np.random.default_rng(4)
    h = rng.uniform(0.5, 1.0, 12)
    g = 0.3 * h + rng.uniform(0, 0.2, 12)
    rollout = stats_rollout(entropy=t(h * 2.0**1020, tensor_pb2.DTYPE_FLOAT64), grad_norm=t(g, tensor_pb2.DTYPE_FLOAT64))
    config = pb.ScoreConfig(method=pb.METHOD_PEARSON)
    reply = pb.ScoreResponse.FromString(raw_call(channel, "Score", request([rollout], config=config).SerializeToString()))
    result = reply.result.groups[0].rollouts[0]
    assert result.rho_status == pb.RHO_STATUS_DEFINED
    np.testing.assert_allclose(result.rho, np.corrcoef(h, g)[0, 1], rtol=1e-12)
    np.testing.assert_allclose(result.entropy_mean, h.mean() * 2.0**1020, rtol=1e-12)
    np.testing.assert_allclose(reply.result.fingerprint.rho_pooled, np.corrcoef(h, g)[0, 1], rtol=1e-12)
    np.testing.assert_allclose(reply.result.fingerprint.entropy_mean, h.mean() * 2.0**1020, rtol=1e-12)


@given(st.binary(max_size=2048))
def test_block_view_reads_plain_blocks_like_protobuf(data):
    raw = pb.ScoreLogitsStreamRequest(block=pb.LogitsBlock(data=data)).SerializeToString()
    assert bytes(block_view(raw)) == data
    # Anything else is left to the parser.
    assert block_view(header().SerializeToString()) is None
    assert block_view(raw + b"\x12\x00") is None


# Malformed requests: arbitrary tensors, shapes, dtypes, configs and bytes.
tensors = st.builds(
    tensor_pb2.Tensor,
    dtype=st.integers(0, 8),
    shape=st.lists(st.integers(-2, 6), max_size=3),
    data=st.binary(max_size=64),
)
configs = st.builds(
    pb.ScoreConfig,
    method=st.integers(0, 3),
    min_tokens=st.integers(0, 20),
    temperature=st.floats(allow_nan=True, allow_infinity=True),
    coef=st.floats(allow_nan=True, allow_infinity=True),
    gate=st.integers(0, 3),
    threshold=st.floats(allow_nan=True),
    advantage=st.integers(0, 4),
    top_k_estimate=st.integers(0, 3),
)
payloads = st.one_of(
    st.builds(lambda a, b, c, d: pb.Rollout(stats=pb.TokenStatsPayload(entropy=a, grad_norm=b, logprob=c, token_ids=d)),
              tensors, tensors, tensors, tensors),
    st.builds(lambda a, b: pb.Rollout(logits=pb.LogitsPayload(logits=a, token_ids=b)), tensors, tensors),
    st.builds(
        lambda a, b, c, d, v: pb.Rollout(
            top_k=pb.TopKPayload(top_logprobs=a, top_token_ids=b, logprob=c, token_ids=d, vocab_size=v)
        ),
        tensors, tensors, tensors, tensors, st.integers(0, 12),
    ),
    st.just(pb.Rollout()),
)


def _with_reward(rollout: pb.Rollout, reward: float | None) -> pb.Rollout:
    if reward is not None:
        rollout.reward = reward
    return rollout


rollouts = st.builds(_with_reward, payloads, st.none() | st.floats(allow_nan=True))
requests_ = st.builds(
    lambda rid, config, groups: request(*groups, config=config, request_id=rid),
    st.text(max_size=140),
    configs,
    st.lists(st.lists(rollouts, max_size=3), max_size=3),
)
ALLOWED = {grpc.StatusCode.OK, INVALID, EXHAUSTED}


@settings(max_examples=150)
@given(requests_)
def test_malformed_requests_never_unknown(channel, message):
    try:
        raw_call(channel, "Score", message.SerializeToString())
    except grpc.RpcError as err:
        assert err.code() in ALLOWED, (err.code(), err.details())


@settings(max_examples=100)
@given(st.lists(st.binary(max_size=200), max_size=4))
def test_malformed_streams_never_unknown(channel, messages):
    try:
        raw_call(channel, "ScoreLogitsStream", iter(messages), streaming=True)
    except grpc.RpcError as err:
        assert err.code() in ALLOWED, (err.code(), err.details())


# Sizes and counts anywhere in their wire type's range, near the edges most often.
def _edges(bits: int, signed: bool):
    top = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    edges = [0, 1, 2, 2**31, 2**32 - 1, 2**62, top, top - 1] + ([-1, -top - 1] if signed else [])
    return st.sampled_from([e for e in edges if e <= top]) | st.integers(-top - 1 if signed else 0, top)


def _filled(dtype: int, shape: list[int], value: float) -> tensor_pb2.Tensor:
    """A tensor whose bytes fit its shape where that is small (else none: only an empty
    shape then decodes), so that the sizes, not the byte counts, are what gets tested."""
    n = int(np.prod([max(d, 0) for d in shape], dtype=object))
    data = np.full(n, value, wire.element(dtype)).tobytes() if n <= 64 else b""
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


F64 = tensor_pb2.DTYPE_FLOAT64
rows = st.sampled_from([0, 0, 1, 3])  # tokens of a rollout: often none, so any width decodes
widths = st.sampled_from([1, 3]) | _edges(64, True)
extreme = st.sampled_from([0.0, 0.5, 5e-324, 3.4e38, 1e308, 1.7e308])


@st.composite
def huge_payloads(draw) -> pb.Rollout:
    n, kind = draw(rows), draw(st.sampled_from(["stats", "logits", "top_k", "tokens", "chaos"]))
    if kind == "stats":
        return pb.Rollout(stats=pb.TokenStatsPayload(
            entropy=_filled(F64, [n], draw(extreme)), grad_norm=_filled(F64, [n], draw(extreme))
        ))
    if kind == "logits":
        return pb.Rollout(logits=pb.LogitsPayload(
            logits=_filled(F32, [n, draw(widths)], 0.0), token_ids=_filled(I64, [n], 0)
        ))
    if kind == "top_k":
        k = draw(widths)
        return pb.Rollout(top_k=pb.TopKPayload(
            top_logprobs=_filled(F32, [n, k], -0.1), top_token_ids=_filled(I64, [n, k], 0),
            logprob=_filled(F32, [n], -0.1), token_ids=_filled(I64, [n], 0), vocab_size=draw(_edges(64, False)),
        ))
    if kind == "tokens":
        return pb.Rollout(tokens=pb.TokensPayload(
            prompt_ids=_filled(I64, [draw(widths)], 1), response_ids=_filled(I64, [n], 1)
        ))
    shapes = st.lists(_edges(64, True), min_size=1, max_size=3)
    return pb.Rollout(logits=pb.LogitsPayload(
        logits=tensor_pb2.Tensor(dtype=F32, shape=draw(shapes)), token_ids=tensor_pb2.Tensor(dtype=I64, shape=draw(shapes))
    ))


huge_rewards = st.none() | st.sampled_from([1.7e308, -1.7e308, 1e308, 5e-324, 0.0]) | st.floats(allow_nan=False)
huge_configs = st.builds(
    pb.ScoreConfig,
    min_tokens=st.sampled_from([2, 3]) | _edges(32, False),
    coef=st.sampled_from([1.7e308, -1.7e308, 0.1]) | st.floats(allow_nan=False),
    advantage=st.integers(0, 3),
    method=st.integers(0, 2),
    # Mostly unset: a k is refused for the default (exact) estimator before any payload is read.
    estimator_k=st.none() | st.none() | _edges(32, False),
    estimator_seed=_edges(64, False),
)
huge_rollouts = st.builds(_with_reward, huge_payloads(), huge_rewards)
# The server under test holds no model: tokens payloads are FAILED_PRECONDITION.
ANSWERED = ALLOWED | {grpc.StatusCode.FAILED_PRECONDITION}


def assert_no_silent_nan(result: pb.ScoreResult) -> None:
    for group in result.groups:
        for r in group.rollouts:
            assert np.isfinite(r.reward) and np.isfinite(r.advantage), r
            assert np.isnan(r.rho) != (r.rho_status == pb.RHO_STATUS_DEFINED), r


@settings(max_examples=150)
@given(huge_configs, st.lists(st.lists(huge_rollouts, min_size=1, max_size=3), min_size=1, max_size=2))
def test_huge_sizes_and_values_never_internal(channel, config, groups):
    try:
        reply = raw_call(channel, "Score", request(*groups, config=config).SerializeToString())
    except grpc.RpcError as err:
        assert err.code() in ANSWERED, (err.code(), err.details())
        assert len(err.details().encode()) <= 512
    else:
        assert_no_silent_nan(pb.ScoreResponse.FromString(reply).result)


@settings(max_examples=100)
@given(
    st.lists(_edges(64, False), min_size=1, max_size=3),
    _edges(64, False),
    st.lists(huge_rewards, min_size=3, max_size=3),
    huge_configs,
    st.integers(0, 3),
)
def test_huge_stream_headers_never_internal(channel, counts, vocab, rewards, config, dtype):
    message = layout(counts, vocab=vocab, config=config, dtype=dtype, token_ids=t(np.zeros(3, np.int64), I64))
    for rollout, reward in zip(message.header.groups[0].rollouts, rewards):
        rollout.ClearField("reward")
        if reward is not None:
            rollout.reward = reward
    blocks = [message.SerializeToString(), block(np.zeros((3, 9))).SerializeToString()]
    try:
        reply = raw_call(channel, "ScoreLogitsStream", iter(blocks), streaming=True)
    except grpc.RpcError as err:
        assert err.code() in ALLOWED, (err.code(), err.details())
    else:
        assert_no_silent_nan(pb.ScoreLogitsStreamResponse.FromString(reply).result)


def test_server_alive_after_malformed_requests(server, channel):
    assert server.process.poll() is None
    reply = pb.ScoreResponse.FromString(raw_call(channel, "Score", GOOD.SerializeToString()))
    assert reply.result.request_id == "bad-input"


def test_no_traceback_in_the_logs(server, triton_server):
    """Everything above was the client's fault: the servers logged no internal error."""
    for process in (server, triton_server):
        assert "Traceback" not in process.log()
        assert not [e for e in process.events() if e.get("event") == "internal_error" or e.get("status") == "INTERNAL"]
