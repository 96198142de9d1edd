"""The client says what is wrong: each payload kind (corrpo.payloads) names the field that is
missing or does not fit, before anything is sent; several rollouts need group_sizes; a
request past its deadline says how long such work takes and how to pass timeout=; and the
fingerprint's mean of S is strength_mean (grad_norm_mean a deprecated alias)."""

from __future__ import annotations

import math
import warnings

import grpc
import numpy as np
import pytest

import corrpo
from corrpo import reference, wire
from corrpo.client import AUTO_TIMEOUT_S, AUTO_TIMEOUT_S_PER_MODEL_TOKEN, RewardClient, ScoreDeadlineError, prepare
from corrpo.v1 import reward_service_pb2 as pb
from corrpo.v1 import reward_service_pb2_grpc as pb_grpc
from corrpo.v1 import tensor_pb2
from rollouts import make_rollouts

H = [np.linspace(0.1, 1.0, 8), np.linspace(1.0, 0.1, 8)]
G = [np.linspace(2.0, 0.5, 8), np.linspace(0.5, 2.0, 8)]
IDS = [np.arange(8), np.arange(8) + 3]
TOP = [np.log(np.full((8, 2), 0.4)), np.log(np.full((8, 2), 0.4))]
TOP_IDS = [np.zeros((8, 2), np.int64), np.zeros((8, 2), np.int64)]
LOGITS = [np.zeros((8, 16), np.float32), np.zeros((8, 16), np.float32)]

# (what is given, the field missing or foreign, and the message's start)
MISSING = [
    # tokens: the response ids without prompts, and prompts without responses
    ({"token_ids": IDS}, "prompt_ids", "`prompt_ids` is missing: tokens payloads need prompt_ids and token_ids"),
    ({"prompt_ids": IDS}, "token_ids", "`token_ids` is missing: tokens payloads need prompt_ids and token_ids"),
    ({"prompt_ids": IDS, "token_ids": IDS[:1]}, "token_ids", "token_ids has 1 array for the 2 rollouts of prompt_ids"),
    # stats
    ({"grad_norm": G}, "entropy", "`entropy` is missing: stats payloads need entropy and grad_norm"),
    ({"entropy": H}, "grad_norm", "`grad_norm` is missing: stats payloads need entropy and grad_norm"),
    ({"entropy": H, "grad_norm": G[:1]}, "grad_norm", "grad_norm has 1 array for the 2 rollouts of entropy"),
    # logits
    ({"logits": LOGITS}, "token_ids", "`token_ids` is missing: logits payloads need logits and token_ids"),
    ({"logits": LOGITS, "token_ids": IDS, "grad_norm": G}, "grad_norm", "`grad_norm` is not part of a logits payload"),
    # top-k
    ({"top_logprobs": TOP, "top_token_ids": TOP_IDS, "token_ids": IDS, "vocab_size": 16}, "logprob", "`logprob` is missing: top-k payloads need"),
    ({"top_logprobs": TOP, "top_token_ids": TOP_IDS, "logprob": H, "token_ids": IDS}, "vocab_size", "`vocab_size` is missing: top-k payloads need"),
    ({"top_token_ids": TOP_IDS, "logprob": H, "token_ids": IDS, "vocab_size": 16}, "top_logprobs", "`top_logprobs` is missing: top-k payloads need"),
    # no kind, or two
    ({"logprob": H}, "payload", "no payload given: give one array per rollout of logits (with token_ids), entropy"),
    ({"logits": LOGITS, "entropy": H}, "payload", "one payload kind per call: got logits of a logits payload and entropy of a stats payload"),
]


@pytest.mark.parametrize(("given", "field", "start"), MISSING, ids=[f"{c[1]}-{'+'.join(c[0])}" for c in MISSING])
def test_each_payload_kind_names_its_missing_field(server, given, field, start):
    with pytest.raises(corrpo.CorrpoError) as info:
        prepare(**given, group_sizes=2, config=corrpo.ScoreConfig())
    assert str(info.value).startswith(start), str(info.value)
    assert info.value.field == field
    # Through the client the same words, and nothing reaches the server.
    before = len([e for e in server.events() if e.get("event") == "request"])
    with RewardClient(server.target, timeout=30) as client, pytest.raises(corrpo.CorrpoError) as info:
        client.score(**given, group_sizes=2)
    assert str(info.value).startswith(start)
    assert len([e for e in server.events() if e.get("event") == "request"]) == before


def test_stats_of_another_measure_miss_strength():
    with pytest.raises(corrpo.ConfigError, match=r"^`strength` is missing: stats payloads need") as info:
        prepare(entropy=H, group_sizes=2, config=corrpo.ScoreConfig(measure="l1_mean"))
    assert info.value.field == "strength"


def _raw(rollout: pb.Rollout) -> pb.ScoreRequest:
    return pb.ScoreRequest(request_id="raw", groups=[pb.Group(rollouts=[rollout])])


def _ids(values) -> tensor_pb2.Tensor:
    return wire.encode(np.asarray(values, np.int32))


RAW = [
    # A request built by hand without corrpo.client: the server names the unset field.
    (pb.Rollout(stats=pb.TokenStatsPayload(grad_norm=wire.encode(G[0].astype(np.float32)))), "groups[0].rollouts[0].stats.entropy must be set: the request leaves it out"),
    (pb.Rollout(logits=pb.LogitsPayload(token_ids=_ids(IDS[0]))), "groups[0].rollouts[0].logits.logits must be set: the request leaves it out"),
    (pb.Rollout(logits=pb.LogitsPayload(logits=wire.encode(LOGITS[0]))), "groups[0].rollouts[0].logits.token_ids must be set: the request leaves it out"),
    (
        pb.Rollout(top_k=pb.TopKPayload(top_logprobs=wire.encode(TOP[0].astype(np.float32)), vocab_size=16)),
        "groups[0].rollouts[0].top_k.top_token_ids must be set: the request leaves it out",
    ),
]


@pytest.mark.parametrize(("rollout", "expected"), RAW, ids=[r[1].split(" ")[0].split(".", 2)[2] for r in RAW])
def test_the_server_names_an_unset_field_of_a_hand_built_request(server, rollout, expected):
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.RewardServiceStub(channel).Score(_raw(rollout), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(expected), info.value.details()


def test_a_tokens_payload_without_response_ids_is_named_by_the_model_server(tiny_model_server):
    rollout = pb.Rollout(tokens=pb.TokensPayload(prompt_ids=_ids([1, 2])))
    with grpc.insecure_channel(tiny_model_server.target) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.RewardServiceStub(channel).Score(_raw(rollout), timeout=120)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("groups[0].rollouts[0].tokens.response_ids must be set: the request leaves it out"), info.value.details()


def test_several_rollouts_need_group_sizes_and_one_does_not(client, rng):
    r = make_rollouts(rng, [2, 2], vocab=64)
    with pytest.raises(corrpo.ConfigError) as info:
        client.score(logits=r.logits, token_ids=r.token_ids, rewards=r.rewards)
    assert info.value.field == "group_sizes"
    message = str(info.value)
    assert message.startswith("`group_sizes` is missing: 4 rollouts need their grouping")
    assert "group_sizes=8" in message and "group_sizes=[4, 4]" in message and "group_sizes=4 scores them all as one group" in message
    # Given, the groups are those asked for: the in-process scores of groups of 2.
    stats = [corrpo.token_stats(x, i) for x, i in zip(r.logits, r.token_ids)]
    h, g = (np.concatenate([getattr(s, name) for s in stats]) for name in ("entropy", "grad_norm"))
    want = corrpo.score(h, g, r.lengths, [2, 2], rewards=r.rewards, config=corrpo.ScoreConfig(min_tokens=2))
    got = client.score(logits=r.logits, token_ids=r.token_ids, rewards=r.rewards, group_sizes=2, min_tokens=2)
    np.testing.assert_allclose(got.advantages, want.advantages, rtol=1e-6, atol=1e-9)
    # One rollout is its own group, without group_sizes.
    one = client.score(logits=r.logits[:1], token_ids=r.token_ids[:1], rewards=r.rewards[:1], min_tokens=2)
    alone = corrpo.score(
        stats[0].entropy, stats[0].grad_norm, r.lengths[:1], [1], rewards=r.rewards[:1], config=corrpo.ScoreConfig(min_tokens=2)
    )
    np.testing.assert_allclose(one.rho, alone.rho, rtol=1e-6)
    np.testing.assert_allclose(one.advantages, alone.advantages, atol=1e-12)


class _DeadlineRecorder(pb_grpc.RewardServiceServicer):
    """Records the deadline each Score call arrives with (the real server does not report
    it), then refuses the call."""

    def __init__(self) -> None:
        self.remaining: list[float | None] = []

    def Score(self, request, context):  # noqa: N802 - gRPC's method name
        self.remaining.append(context.time_remaining())
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "recorded")


def test_the_default_deadline_grows_with_the_tokens_a_model_scores():
    from concurrent.futures import ThreadPoolExecutor

    recorder = _DeadlineRecorder()
    server = grpc.server(ThreadPoolExecutor(2))
    pb_grpc.add_RewardServiceServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        calls = [
            ({}, {"entropy": H, "grad_norm": G}),
            ({}, {"prompt_ids": IDS, "token_ids": [np.arange(30), np.arange(20)]}),
            ({}, {"prompt_ids": IDS, "token_ids": [np.arange(30), np.arange(20)], "timeout": 7}),
            ({"timeout": 9}, {"prompt_ids": IDS, "token_ids": [np.arange(30), np.arange(20)]}),
            ({"timeout": None}, {"prompt_ids": IDS, "token_ids": IDS}),
        ]
        for options, kwargs in calls:
            with RewardClient(f"127.0.0.1:{port}", **options) as client, pytest.raises(grpc.RpcError):
                client.score(**kwargs, group_sizes=2)
    finally:
        server.stop(None)
    want = [AUTO_TIMEOUT_S, AUTO_TIMEOUT_S + 50 * AUTO_TIMEOUT_S_PER_MODEL_TOKEN, 7, 9]
    assert want[:2] == [60, 260]  # as documented
    # gRPC sends a deadline rounded up to its wire units, so the server may see up to ~1 s more.
    for got, expected in zip(recorder.remaining, want):
        assert expected - 2 < got <= expected + 1.5, recorder.remaining
    assert recorder.remaining[4] > 1e9  # no deadline: gRPC's "infinite future"


def test_a_tokens_request_past_its_deadline_says_how_long_such_work_takes(tiny_model_server):
    prompts, responses = [np.array([1, 2])], [np.arange(200) % 19]  # ids of the tiny vocabulary
    with RewardClient(tiny_model_server.target, timeout=0.01) as client, pytest.raises(ScoreDeadlineError) as info:
        client.score(prompt_ids=prompts, token_ids=responses)
    err = info.value
    message = str(err)
    assert message.startswith(f"Score to the corrpo-server at {tiny_model_server.target} passed its deadline of 0.01 s (DEADLINE_EXCEEDED: ")
    assert "a tokens payload of 200 response tokens" in message
    assert "64 tokens of SmolLM2-135M took 138 s on a 2-core CPU" in message
    assert "RewardClient(target, timeout=600)" in message and "client.score(..., timeout=600)" in message
    assert "timeout=None waits without a deadline" in message
    # Still what code written against gRPC catches.
    assert isinstance(err, grpc.RpcError) and isinstance(err, TimeoutError)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and err.details() in message
    assert (err.rpc, err.kind, err.model_tokens, err.timeout) == ("Score", "tokens", 200, 0.01)


@pytest.mark.parametrize("timeout", [0, -1, "soon", True])
def test_a_timeout_that_is_no_deadline_is_refused(timeout):
    with pytest.raises(corrpo.ConfigError, match="timeout must be a number of seconds > 0, None .no deadline. or 'auto'"):
        RewardClient("127.0.0.1:1", timeout=timeout)


def test_strength_mean_is_the_mean_of_s_and_grad_norm_mean_a_deprecated_alias(client, rng):
    h, s = rng.random(40), rng.gamma(1.0, size=40)
    fp = corrpo.fingerprint(h, s)
    assert fp.strength_mean == pytest.approx(s.mean(), rel=1e-12)
    assert reference.fingerprint(h, s)["strength_mean"] == pytest.approx(fp.strength_mean, rel=1e-12)
    with pytest.warns(DeprecationWarning, match="grad_norm_mean is deprecated: it is the mean of the strength S"):
        old = fp.grad_norm_mean
    assert old == fp.strength_mean
    # Over the wire (the proto field keeps its name) the figure arrives as strength_mean.
    served = client.score(entropy=[h[:20], h[20:]], strength=[s[:20], s[20:]], group_sizes=2, measure="l1_mean")
    assert served.fingerprint.strength_mean == pytest.approx(s.mean(), rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isfinite(served.fingerprint.strength_mean)  # the new name warns of nothing
