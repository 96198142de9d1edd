"""A model-backed server (``corrpo-server serve --model``) on a tiny random Llama: tokens
payloads scored by the server equal corrpo.gradients plus corrpo.score in-process,
ReloadWeights under load loses no request and never mixes weights, a mismatched
weights_version is FAILED_PRECONDITION, health goes NOT_SERVING while weights load, and a
model that cannot load exits 2 with a clear message."""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import corrpo  # noqa: E402
from corrpo.client import RewardClient  # noqa: E402
from corrpo_server import ServerProcess  # noqa: E402
from grpc_health.v1 import health_pb2  # noqa: E402
from corrpo.testing import build_tiny_model  # noqa: E402

@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    paths = {"a": root / "a", "b": root / "b", "wide": root / "wide"}
    build_tiny_model(paths["a"], seed=0)
    build_tiny_model(paths["b"], seed=1)
    build_tiny_model(paths["wide"], seed=2, vocab_extra=7)
    return paths


@pytest.fixture(scope="module")
def model_server(models):
    env = {"OMP_NUM_THREADS": "1"}
    with ServerProcess("--model", str(models["a"]), "--device", "cpu", env=env, ready_timeout=180) as process:
        yield process


@pytest.fixture(scope="module")
def mclient(model_server):
    with RewardClient(model_server.target, timeout=120) as c:
        yield c


def hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def rollouts(seed: int, n: int = 6) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    vocab = 19  # ids the tiny tokenizer has
    prompts = [rng.integers(0, vocab, rng.integers(1, 5)) for _ in range(n)]
    responses = [rng.integers(0, vocab, rng.integers(0, 25)) for _ in range(n)]
    return prompts, responses


def in_process(model, prompts, responses, rewards, group_sizes, config: corrpo.ScoreConfig, batched: bool) -> corrpo.Scores:
    """What the server must answer, from corrpo.gradients in this process: per rollout
    (exact estimators, unpadded) or as one right-padded batch (subsample draws its tokens
    over the rows of one call)."""
    from corrpo.gradients import token_strengths

    logit_space = config.measure in ("logit_grad", "head_logit_grad")
    settings = dict(
        objective=config.objective or "logit",
        measures=tuple(dict.fromkeys((config.measure, "logit_grad"))),
        estimator="logit_grad" if logit_space else config.estimator,
        k=config.estimator_k,
        seed=config.estimator_seed,
    )
    if batched:
        width = max(len(p) + len(r) for p, r in zip(prompts, responses))
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, (p, r) in enumerate(zip(prompts, responses)):
            ids[b, : len(p) + len(r)] = torch.from_numpy(np.concatenate([p, r]))
            mask[b, : len(p) + len(r)] = 1
        pos = [np.arange(len(p), len(p) + len(r)) for p, r in zip(prompts, responses)]
        outs = [token_strengths(model, ids, pos, attention_mask=mask, **settings)]
    else:
        outs = [
            token_strengths(model, torch.from_numpy(np.concatenate([p, r])), np.arange(len(p), len(p) + len(r)), **settings)
            for p, r in zip(prompts, responses)
        ]
    cat = lambda f: np.concatenate([f(o) for o in outs])  # noqa: E731
    return corrpo.score(
        cat(lambda o: o.entropy_bits) * math.log(2),
        cat(lambda o: o.measure(config.measure)),
        cat(lambda o: o.lengths),
        group_sizes,
        rewards=rewards,
        token_ids=cat(lambda o: o.token_ids),
        config=config,
        logit_grad=None if config.measure == "logit_grad" else cat(lambda o: o.logit_grad),
    )


def assert_same(got: corrpo.Scores, want: corrpo.Scores) -> None:
    np.testing.assert_allclose(got.rho, want.rho, rtol=1e-5, atol=1e-6)
    assert got.reasons == want.reasons
    np.testing.assert_allclose(got.rewards, want.rewards, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.advantages, want.advantages, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got.n_tokens, want.n_tokens)
    np.testing.assert_allclose(got.entropy_mean, want.entropy_mean, rtol=1e-5)
    np.testing.assert_allclose(got.grad_norm_mean, want.grad_norm_mean, rtol=1e-5)
    for a, b in ((got.fingerprint, want.fingerprint), (got.logit_grad, want.logit_grad)):
        if b is None:
            assert a is None
            continue
        for name in ("rho_pooled", "rho_unique", "rho_rollout_mean", "entropy_mean", "strength_mean"):
            x, y = getattr(a, name), getattr(b, name)
            assert (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6), name
    assert got.config == want.config


CASES = [
    ({}, True),  # the defaults: l1_mean by local
    ({"measure": "frobenius", "estimator": "jvp_cv", "estimator_k": 4, "estimator_seed": 2}, True),
    ({"estimator": "exact"}, False),
    ({"measure": "nuclear_qkvo", "estimator": "exact", "objective": "logprob"}, False),
    ({"measure": "frobenius", "estimator": "jvp", "estimator_k": 8, "estimator_seed": 5}, False),
    ({"measure": "l1_mean", "estimator": "last_block"}, False),
    ({"measure": "logit_grad"}, False),
    ({"estimator": "subsample", "estimator_k": 3, "estimator_seed": 11, "min_tokens": 3, "gate": "correct"}, True),
]


@pytest.mark.parametrize(("settings", "batched"), CASES, ids=[str(c[0]) for c in CASES])
def test_tokens_payload_equals_corrpo_gradients_in_process(models, mclient, settings, batched):
    prompts, responses = rollouts(len(str(settings)))
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    got = mclient.score(prompt_ids=prompts, token_ids=responses, rewards=rewards, group_sizes=[3, 3], **settings)
    config = corrpo.ScoreConfig(**settings).resolve({"tokens"})
    if config.estimator not in ("jvp", "jvp_cv"):  # they draw directions per row: rows stay independent
        want = in_process(hf(models["a"]), prompts, responses, rewards, [3, 3], config, batched)
    else:
        want = in_process(hf(models["a"]), prompts, responses, rewards, [3, 3], config, True)
    assert_same(got, want)
    assert got.weights_version == "initial"
    assert got.backend == "model/cpu/float32"
    assert (got.logit_grad is None) == (config.measure == "logit_grad")
    if not settings:
        assert (got.config.measure, got.config.estimator, got.config.objective, got.config.estimator_k) == (
            "l1_mean",
            "local",
            "logit",
            None,
        )


def test_the_same_request_gives_the_same_answer(mclient):
    prompts, responses = rollouts(3)
    first = mclient.score(prompt_ids=prompts, token_ids=responses, request_id="same", group_sizes=[6])
    again = mclient.score(prompt_ids=prompts, token_ids=responses, request_id="same", group_sizes=[6])
    np.testing.assert_array_equal(first.rho, again.rho)
    np.testing.assert_array_equal(first.advantages, again.advantages)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"prompt_ids": [[1, 2]], "token_ids": [[3, 99]]}, "tokens.response_ids[1] is 99, outside the model's vocabulary of"),
        ({"prompt_ids": [[]], "token_ids": [[3, 4]]}, "tokens.prompt_ids is empty"),
        ({"prompt_ids": [[1]], "token_ids": [[3, 4]], "temperature": 0.7}, "tokens payloads are scored at temperature 1"),
        ({"prompt_ids": [[1]], "token_ids": [[3, 4]], "measure": "logit_grad", "objective": "logit"}, "objective applies to"),
        ({"prompt_ids": [[1]], "token_ids": [[3, 4]], "measure": "nuclear_qkvo", "estimator": "jvp"}, "cannot give 'nuclear_qkvo'"),
        ({"prompt_ids": [[1]], "token_ids": [[3, 4]], "estimator": "top_k"}, "'top_k' estimator is for top-k payloads"),
    ],
)
def test_bad_tokens_requests_are_invalid_argument(mclient, kwargs, expected):
    with pytest.raises(grpc.RpcError) as info:
        mclient.score(**kwargs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert expected in info.value.details()


def test_a_server_without_a_model_refuses_tokens_and_reloads(client):
    with pytest.raises(grpc.RpcError) as info:
        client.score(prompt_ids=[[1, 2]], token_ids=[[3, 4]])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "started without --model" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.reload_weights("/nonexistent", "v1")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_logits_payloads_cannot_name_a_parameter_measure(client, rng):
    logits = rng.standard_normal((10, 16)).astype(np.float32)
    for send in ("stats", "logits"):  # the client says so before sending anything
        with pytest.raises(corrpo.ConfigError, match="logits payloads give only the logit_grad measure"):
            client.score(logits=[logits], token_ids=[np.arange(10)], measure="l1_mean", send=send)


def test_model_that_fails_to_load_exits_2(tmp_path):
    (tmp_path / "empty").mkdir()
    for path, expected in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "has no config.json")):
        with pytest.raises(RuntimeError) as info:
            ServerProcess("--model", str(path), "--device", "cpu", ready_timeout=120)
        message = str(info.value)
        assert "corrpo-server exited with 2" in message and expected in message, message
        assert "Traceback" not in message


def _watch(stream, statuses: list[str]) -> None:
    try:
        for reply in stream:
            statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    except grpc.RpcError:
        pass  # cancelled at the end of the test


def test_reload_under_load_loses_nothing_and_versions_are_enforced(models, tmp_path):
    """Clients score without naming a version while the weights change from a to b: every
    request succeeds, and each answer is exactly what the version it names gives."""
    prompts, responses = rollouts(7, n=4)
    want = {}
    for version, key in (("initial", "a"), ("v2", "b")):
        config = corrpo.ScoreConfig(estimator="exact").resolve({"tokens"})
        want[version] = in_process(hf(models[key]), prompts, responses, None, [4], config, False)
    with ServerProcess("--model", str(models["a"]), "--device", "cpu", env={"OMP_NUM_THREADS": "1"}, ready_timeout=180) as server:
        from grpc_health.v1 import health_pb2_grpc

        statuses: list[str] = []
        channel = grpc.insecure_channel(server.target)
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=300)
        watcher = threading.Thread(target=_watch, args=(stream, statuses), daemon=True)
        watcher.start()
        with RewardClient(server.target, timeout=120) as c:
            done = threading.Event()

            def load() -> list[corrpo.Scores]:
                answers = []
                while not done.is_set():
                    answers.append(c.score(prompt_ids=prompts, token_ids=responses, group_sizes=4, estimator="exact"))
                return answers

            with ThreadPoolExecutor(3) as pool:
                workers = [pool.submit(load) for _ in range(3)]
                time.sleep(0.5)
                seconds = c.reload_weights(str(models["b"]), "v2")
                time.sleep(0.5)
                done.set()
                per_client = [w.result() for w in workers]  # any failed request raises here
            time.sleep(0.2)  # the last status change reaches the watcher
            stream.cancel()
            watcher.join(30)
            channel.close()
            assert seconds > 0
            versions = [[a.weights_version for a in answers] for answers in per_client]
            assert {"initial", "v2"} <= {v for vs in versions for v in vs}, versions
            # Each client's requests are sequential: once one is scored by v2, so are its later ones.
            for vs in versions:
                assert vs == sorted(vs, key=lambda v: v == "v2"), vs
            for answers in per_client:
                for a in answers:
                    assert_same(a, want[a.weights_version])
            # Health: NOT_SERVING while the weights loaded, SERVING after.
            assert "NOT_SERVING" in statuses and statuses[-1] == "SERVING", statuses
            # The version a request names must be the one the server holds.
            assert_same(c.score(prompt_ids=prompts, token_ids=responses, group_sizes=4, estimator="exact", weights_version="v2"), want["v2"])
            with pytest.raises(grpc.RpcError) as info:
                c.score(prompt_ids=prompts, token_ids=responses, group_sizes=4, weights_version="initial")
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "'initial'" in info.value.details() and "'v2'" in info.value.details()
            # A failed reload keeps the weights that serve.
            for path, expected in ((tmp_path / "missing", "does not exist"), (models["wide"], "same model")):
                with pytest.raises(grpc.RpcError) as info:
                    c.reload_weights(str(path), "v3")
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert expected in info.value.details()
            assert c.score(prompt_ids=prompts, token_ids=responses, group_sizes=4).weights_version == "v2"
            assert c.health() == "SERVING"
