"""Top-k bounds against exact distributions, and corrpo.score against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

import corrpo
from corrpo import reference


def exact(p: np.ndarray, y: int) -> tuple[float, float]:
    nz = p[p > 0]
    onehot = np.zeros_like(p)
    onehot[y] = 1.0
    return float(-(nz * np.log(nz)).sum()), float(np.linalg.norm(p - onehot))


def top_k_of(p: np.ndarray, y: int, k: int):
    order = np.argsort(-p, kind="stable")[:k]
    with np.errstate(divide="ignore"):
        return np.log(p[order])[None], order[None], np.log([p[y]]), np.array([y])


@given(
    st.integers(2, 60),
    st.integers(1, 8),
    st.floats(0.1, 8.0),
    st.integers(0, 2**32 - 1),
    st.booleans(),
)
def test_bounds_contain_the_exact_values(vocab, k, sharpness, seed, emit_from_tail):
    k = min(k, vocab - 1)
    rng = np.random.default_rng(seed)
    z = sharpness * rng.standard_normal(vocab)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    y = int(order[-1] if emit_from_tail else order[0])
    b = corrpo.top_k_stats(*top_k_of(p, y, k), vocab)
    h, g = exact(p, y)
    assert b.entropy_lower[0] - 1e-9 <= h <= b.entropy_upper[0] + 1e-9
    assert b.grad_norm_lower[0] - 1e-9 <= g <= b.grad_norm_upper[0] + 1e-9


def test_bounds_are_tight_at_their_extremes():
    # A uniform tail reaches the upper entropy bound and the lower G bound ...
    p = np.array([0.5, 0.2] + [0.3 / 6] * 6)
    b = corrpo.top_k_stats(*top_k_of(p, 0, 2), len(p))
    h, g = exact(p, 0)
    assert b.entropy_upper[0] == pytest.approx(h, abs=1e-12)
    assert b.grad_norm_lower[0] == pytest.approx(g, abs=1e-12)
    # ... a tail of tokens as large as the smallest top-k one reaches the other two.
    p = np.array([0.4, 0.2, 0.2, 0.2, 0.0, 0.0])
    b = corrpo.top_k_stats(*top_k_of(p, 1, 2), len(p))
    h, g = exact(p, 1)
    assert b.entropy_lower[0] == pytest.approx(h, abs=1e-12)
    assert b.grad_norm_upper[0] == pytest.approx(g, abs=1e-12)
    # With everything in the top-k, both bounds are exact.
    p = np.array([0.7, 0.2, 0.1])
    b = corrpo.top_k_stats(*top_k_of(p, 2, 3), 3)
    h, g = exact(p, 2)
    for value, want in ((b.entropy_lower, h), (b.entropy_upper, h), (b.grad_norm_lower, g), (b.grad_norm_upper, g)):
        assert value[0] == pytest.approx(want, abs=1e-12)


def test_grad_norm_keeps_precision_near_certainty():
    p_y = 1 - 1e-10
    b = corrpo.top_k_stats(np.log([[p_y, 5e-11]]), [[0, 1]], np.log([p_y]), [0], 4)
    # ||p - e_y||^2 = (1 - p_y)^2 + sum of the rest squared, with the rest in [5e-11, 5e-11 + 5e-11].
    assert 1e-10 <= b.grad_norm_lower[0] <= b.grad_norm_upper[0] <= 1.3e-10


@pytest.mark.parametrize(
    "args, error, needle",
    [
        (([[0.5, -1.0]], [[0, 1]], [-1.0], [1], 5), corrpo.InvalidValueError, "not a logprob"),
        (([[-0.1, -0.2]], [[0, 1]], [-0.1], [0], 5), corrpo.InvalidValueError, "add up to probability"),
        (([[-1.0, -2.0]], [[0, 1]], [-0.5], [3], 5), corrpo.InvalidValueError, "not among its top-k ids"),
        (([[-1.0, -2.0]], [[0, 7]], [-1.0], [0], 5), corrpo.InvalidTokenError, "outside the vocabulary [0, 5)"),
        (([[-1.0, -2.0]], [[0, 1]], [-1.0, -1.0], [0, 0], 5), corrpo.ShapeError, "must be [1]"),
        (([[-0.7, -0.7]], [[0, 1]], [-0.7], [0], 2), None, None),
    ],
)
def test_bad_top_k_input(args, error, needle):
    if error is None:
        corrpo.top_k_stats(*args)
        return
    with pytest.raises(error, match=None) as info:
        corrpo.top_k_stats(*args)
    assert needle in str(info.value)


@given(st.integers(0, 2**32 - 1), st.sampled_from(["spearman", "pearson"]), st.booleans())
def test_score_matches_reference(seed, method, verifier_free):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 4, size=rng.integers(1, 4))
    lengths = rng.integers(0, 20, size=sizes.sum())
    h = rng.gamma(2.0, 1.0, lengths.sum())
    g = rng.random(lengths.sum())
    ids = rng.integers(0, 12, lengths.sum())
    rewards = None if verifier_free else rng.integers(0, 2, sizes.sum()).astype(float)
    gate = "none" if verifier_free else "correct"
    config = corrpo.ScoreConfig(method=method, min_tokens=3, coef=0.3, gate=gate, threshold=0.5)
    got = corrpo.score(h, g, lengths, sizes, rewards=rewards, token_ids=ids, config=config)

    rc = reference.rollout_correlations(h, g, lengths, method=method, min_tokens=3)
    rho, reasons = rc["rho"], rc["reasons"]
    np.testing.assert_allclose(got.rho, rho, rtol=1e-10, atol=1e-12)
    assert got.reasons == reasons
    want = reference.regularize(rewards, rho, sizes, coef=0.3, gate=gate, threshold=0.5, advantage="grpo")
    np.testing.assert_allclose(got.rewards, want["rewards"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.advantages, want["advantages"], rtol=1e-9, atol=1e-9)
    fp = reference.fingerprint(h, g, ids, lengths, method=method, min_tokens=3)
    for name in ("rho_pooled", "rho_unique", "rho_rollout_mean"):
        np.testing.assert_allclose(getattr(got.fingerprint, name), fp[name], rtol=1e-10, atol=1e-12)
    ends = np.cumsum(lengths)
    for i, (end, n) in enumerate(zip(ends, lengths)):
        if n:
            assert got.entropy_mean[i] == pytest.approx(h[end - n : end].mean(), rel=1e-12)
        else:
            assert np.isnan(got.entropy_mean[i]) and got.reasons[i] == "too_few_tokens"
    assert [got.rho[s].shape[0] for s in got.groups()] == list(sizes)


@pytest.mark.parametrize(
    "settings, needle",
    [
        ({"method": "kendall"}, "method must be one of"),
        ({"min_tokens": 1}, "min_tokens must be an integer >= 2"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"coef": float("inf")}, "coef must be finite"),
        ({"gate": "wrong"}, "gate must be one of"),
        ({"advantage": "ppo"}, "advantage must be one of"),
        ({"top_k_estimate": "middle"}, "top_k_estimate must be one of"),
    ],
)
def test_score_config_rejects_bad_settings(settings, needle):
    with pytest.raises(corrpo.ConfigError) as info:
        corrpo.ScoreConfig(**settings)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("settings", "kinds", "expected"),
    [
        ({}, {"stats"}, ("logit_grad", "exact", None, None)),
        ({}, {"logits", "stats"}, ("logit_grad", "exact", None, None)),
        ({}, {"logits", "top_k"}, ("logit_grad", "top_k", None, None)),
        ({}, {"tokens"}, ("l1_mean", "local", "logit", None)),
        ({"measure": "logit_grad"}, {"tokens"}, ("logit_grad", "exact", None, None)),
        ({"measure": "frobenius", "estimator": "jvp"}, {"stats"}, ("frobenius", "jvp", "logit", 32)),
        ({"measure": "nuclear_qkvo", "objective": "logprob"}, {"stats"}, ("nuclear_qkvo", "exact", "logprob", None)),
        ({"estimator": "subsample", "estimator_k": 4}, {"tokens"}, ("l1_mean", "subsample", "logit", 4)),
    ],
)
def test_score_config_resolves_what_each_payload_gives(settings, kinds, expected):
    got = corrpo.ScoreConfig(**settings).resolve(kinds)
    assert (got.measure, got.estimator, got.objective, got.estimator_k) == expected
    assert got.resolved
    if len(kinds) == 1:
        assert got.resolve(kinds) == got  # resolving twice changes nothing


@pytest.mark.parametrize(
    ("settings", "kinds", "message"),
    [
        ({"measure": "l1_mean"}, {"logits"}, "logits payloads give only the logit_grad measure"),
        ({"measure": "l1_mean"}, {"top_k"}, "top-k payloads give only the logit_grad measure"),
        ({"estimator": "exact"}, {"top_k"}, "top-k payloads give logit_grad by the 'top_k' estimator"),
        ({"measure": "nuclear_qkvo", "estimator": "jvp"}, {"tokens"}, "estimator 'jvp' cannot give 'nuclear_qkvo'"),
        ({"measure": "logit_grad", "estimator": "subsample"}, {"stats"}, "its estimator is 'exact', not 'subsample'"),
        ({"objective": "logit"}, {"stats"}, "objective applies to parameter-space measures"),
        ({"estimator_k": 3}, {"stats"}, "estimator_k applies to the subsample, jvp, jvp_cv estimators"),
        ({}, {"tokens", "stats"}, "tokens payloads cannot be mixed"),
    ],
)
def test_score_config_refuses_what_a_payload_cannot_give(settings, kinds, message):
    with pytest.raises(corrpo.ConfigError, match=message):
        corrpo.ScoreConfig(**settings).resolve(kinds)


def test_score_with_a_named_measure_adds_the_logit_grad_fingerprint(rng):
    h, s, g = rng.random(30), rng.random(30), rng.random(30)
    ids = rng.permutation(np.arange(30) % 10)  # 10 distinct ids: rho over them is defined
    config = corrpo.ScoreConfig(measure="l1_mean")
    scores = corrpo.score(h, s, [10, 20], [2], token_ids=ids, config=config, logit_grad=g)
    assert scores.logit_grad == corrpo.fingerprint(h, g, ids, [10, 20])
    assert scores.logit_grad.rho_pooled == pytest.approx(stats.spearmanr(h, g)[0], rel=1e-12)
    assert scores.fingerprint.rho_pooled == pytest.approx(stats.spearmanr(h, s)[0], rel=1e-12)
    assert scores.config == config.resolve({"stats"})
    # Under logit_grad the values are G already: no second fingerprint.
    assert corrpo.score(h, g, [10, 20], [2], logit_grad=g).logit_grad is None


def test_score_takes_one_int_for_equal_groups_as_the_client_does(rng, client):
    lengths = rng.integers(8, 20, size=8)
    h, g = rng.gamma(2.0, 1.0, lengths.sum()), rng.random(lengths.sum())
    rewards = rng.integers(0, 2, 8).astype(float)
    got = corrpo.score(h, g, lengths, 4, rewards=rewards)
    want = corrpo.score(h, g, lengths, [4, 4], rewards=rewards)
    np.testing.assert_array_equal(got.group_sizes, [4, 4])
    np.testing.assert_array_equal(got.advantages, want.advantages)
    ends = np.cumsum(lengths)
    spans = [slice(e - n, e) for e, n in zip(ends, lengths)]
    served = client.score(entropy=[h[s] for s in spans], grad_norm=[g[s] for s in spans], rewards=rewards, group_sizes=4)
    np.testing.assert_allclose(served.advantages, got.advantages, rtol=1e-6, atol=1e-9)
    with pytest.raises(corrpo.ShapeError, match="group_sizes=3: 8 rollouts do not split into groups of 3"):
        corrpo.score(h, g, lengths, 3, rewards=rewards)


def test_an_empty_top_k_rollout_has_no_tokens_to_bound(rng, client):
    """A rollout of zero tokens (SPEC 2: T = 0 is no error) gets empty bounds in-process and an
    undefined rho from the server, beside a normal rollout scored as alone."""
    k, vocab = 3, 50
    stats = corrpo.top_k_stats(np.zeros((0, k)), np.zeros((0, k), np.int64), np.zeros(0), np.zeros(0, np.int64), vocab)
    assert all(len(b) == 0 for b in (stats.entropy_lower, stats.entropy_upper, stats.grad_norm_lower, stats.grad_norm_upper))

    logits = rng.standard_normal((12, vocab))
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    top_ids = np.argsort(-logp, axis=1)[:, :k]
    ids = top_ids[:, 0]
    full = dict(top_logprobs=np.take_along_axis(logp, top_ids, 1), top_token_ids=top_ids, logprob=logp[np.arange(12), ids], token_ids=ids)
    empty = dict(top_logprobs=np.zeros((0, k)), top_token_ids=np.zeros((0, k), np.int64), logprob=np.zeros(0), token_ids=np.zeros(0, np.int64))
    served = client.score(**{name: [full[name], empty[name]] for name in full}, vocab_size=vocab, group_sizes=2, rewards=[1.0, 0.0])
    assert served.n_tokens.tolist() == [12, 0]
    assert served.reasons[1] is not None and np.isnan(served.rho[1])
    bound = corrpo.top_k_stats(full["top_logprobs"], top_ids, full["logprob"], ids, vocab)
    h, g = bound.estimate("concentrated_tail")
    want = corrpo.score(h, g, [12], [1]).rho[0]
    np.testing.assert_allclose(served.rho[0], want, rtol=1e-6)
