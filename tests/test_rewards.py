"""CorR-PO rewards and advantages against the reference and against torch's own std."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import corrpo
from corrpo import reference


@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=8),
    coef=st.sampled_from([0.0, 0.1, 0.5, -0.2]),
    gate=st.sampled_from(["none", "correct"]),
    threshold=st.sampled_from([0.5, 1.0]),
    advantage=st.sampled_from(["grpo", "drgrpo", "none"]),
    verifier_free=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_reference(sizes, coef, gate, threshold, advantage, verifier_free, seed):
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    rho = rng.uniform(-1, 1, n)
    rho[rng.random(n) < 0.2] = np.nan
    rewards = None if verifier_free else rng.integers(0, 2, n).astype(float)
    if gate == "correct" and rewards is None:
        with pytest.raises(corrpo.ConfigError, match="needs external rewards"):
            corrpo.regularize(rewards, rho, sizes, gate=gate)
        return
    kwargs = dict(coef=coef, gate=gate, threshold=threshold, advantage=advantage)
    got = corrpo.regularize(rewards, rho, sizes, **kwargs)
    want = reference.regularize(rewards, rho, sizes, **kwargs)
    np.testing.assert_allclose(got.rewards, want["rewards"], atol=1e-12)
    np.testing.assert_allclose(got.advantages, want["advantages"], atol=1e-9)
    np.testing.assert_array_equal(got.applied, want["applied"])
    np.testing.assert_array_equal(got.rho_undefined, np.isnan(rho))
    assert (got.coef, got.gate, got.threshold, got.advantage) == (coef, gate, threshold, advantage)


def test_grpo_advantages_equal_torch_group_normalization(rng):
    """The formula of verl/TRL: (r - mean) / (std + eps) with torch's unbiased std."""
    rewards = rng.integers(0, 2, 32).astype(float)
    rho = rng.uniform(-1, 1, 32)
    out = corrpo.regularize(rewards, rho, [8, 8, 8, 8])
    r = torch.tensor(rewards - 0.1 * rho).view(4, 8)
    want = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + 1e-6)
    np.testing.assert_allclose(out.advantages, want.flatten().numpy(), atol=1e-12)


def test_stronger_inversion_earns_more():
    out = corrpo.regularize([1.0, 1.0], [-0.8, 0.2], [2])
    assert out.rewards[0] > out.rewards[1]
    assert out.advantages[0] > 0 > out.advantages[1]


def test_defaults_and_groups_of_one():
    out = corrpo.regularize(None, [0.5, np.nan], [1, 1])
    assert (out.coef, out.gate, out.threshold, out.advantage) == (0.1, "none", 1.0, "grpo")
    np.testing.assert_array_equal(out.rewards, [-0.05, 0.0])
    np.testing.assert_array_equal(out.advantages, [0.0, 0.0])
    np.testing.assert_array_equal(out.rho_undefined, [False, True])


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "needle"),
    [
        (([1.0], [0.1, 0.2], [2]), {}, corrpo.ShapeError, "rewards has 1 entries"),
        ((None, [0.1, 0.2], [1, 0, 1]), {}, corrpo.InvalidValueError, "group_sizes[1]"),
        ((None, [0.1, 0.2], [3]), {}, corrpo.ShapeError, "add up to 3"),
        (([np.inf, 0.0], [0.1, 0.2], [2]), {}, corrpo.InvalidValueError, "rewards[0]"),
        ((None, [0.1, 2.0], [2]), {}, corrpo.InvalidValueError, "rho[1]"),
        ((None, [0.1], [1]), {"gate": "sometimes"}, corrpo.ConfigError, "gate must be one of"),
        ((None, [0.1], [1]), {"advantage": "ppo"}, corrpo.ConfigError, "advantage must be one of"),
        ((None, [0.1], [1]), {"coef": float("nan")}, corrpo.ConfigError, "coef must be finite"),
        ((None, [0.1], [1]), {"coef": "big"}, corrpo.ConfigError, "coef must be a real number"),
    ],
)
def test_bad_input(args, kwargs, error, needle):
    with pytest.raises(error) as info:
        corrpo.regularize(*args, **kwargs)
    assert needle in str(info.value)


@pytest.mark.parametrize("size", [4, np.int64(4)])
def test_one_int_is_equal_groups_as_the_client_takes_it(size, rng):
    rewards = rng.integers(0, 2, 12).astype(float)
    rho = rng.uniform(-1, 1, 12)
    got = corrpo.regularize(rewards, rho, size, coef=0.2)
    want = reference.regularize(rewards, rho, [4, 4, 4], coef=0.2, gate="none", threshold=1.0, advantage="grpo")
    np.testing.assert_allclose(got.advantages, want["advantages"], atol=1e-9)
    np.testing.assert_allclose(got.rewards, want["rewards"], atol=1e-12)


@pytest.mark.parametrize(
    ("size", "error", "needle"),
    [
        (5, corrpo.ShapeError, "group_sizes=5: 12 rollouts do not split into groups of 5"),
        (0, corrpo.ShapeError, "group_sizes=0: 12 rollouts do not split into groups of 0"),
        (True, corrpo.ConfigError, "group_sizes must be an int or a sequence of ints, got True"),
        (4.0, corrpo.ConfigError, "group_sizes must be an int or a sequence of ints, got 4.0"),
    ],
)
def test_bad_group_size_ints(size, error, needle):
    with pytest.raises(error) as info:
        corrpo.regularize(None, np.zeros(12), size)
    assert str(info.value) == needle and info.value.field == "group_sizes"


def _scaled_reference(rewards, sizes, advantage, scale=2.0**-1000):
    """The float64 formulas on rewards scaled down by a power of two (which cannot
    overflow), scaled back where the result is not scale-free: an independent reference for
    rewards whose own sums and squares overflow."""
    out, start = [], 0
    for n in sizes:
        x = np.asarray(rewards[start : start + n], dtype=np.float64) * scale
        start += n
        if n == 1:
            out.extend([0.0])
        elif advantage == "grpo":
            out.extend((x - x.mean()) / (x.std(ddof=1) + 1e-6 * scale))
        else:
            out.extend((x - x.mean()) / scale)
    return np.array(out)


@pytest.mark.parametrize("advantage", ["grpo", "drgrpo"])
def test_rewards_near_the_float64_limit(advantage):
    """Finite rewards whose group sum or spread overflow float64 (about 1e308): finite
    advantages, in corrpo.regularize and corrpo.score alike, never NaN."""
    rewards = [1.7e308, -0.1e308, 0.9e308, 1.1e308, 1.5e308, 1.6e308, 3.0]
    sizes = [4, 2, 1]
    got = corrpo.regularize(rewards, [np.nan] * 7, sizes, advantage=advantage)
    want = _scaled_reference(rewards, sizes, advantage)
    assert np.all(np.isfinite(got.advantages))
    np.testing.assert_allclose(got.advantages, want, rtol=1e-12)
    # The same through score(), as the server computes it.
    h = np.tile(np.linspace(0.1, 1.0, 10), 7)
    config = corrpo.ScoreConfig(coef=0.0, advantage=advantage)
    scores = corrpo.score(h, h[::-1].copy(), [10] * 7, sizes, rewards=rewards, config=config)
    np.testing.assert_array_equal(scores.advantages, got.advantages)


@pytest.mark.parametrize(
    ("rewards", "sizes", "kwargs", "index", "needle"),
    [
        ([1.7e308, 0.0], [2], {"coef": -1.7e308}, 0, "r - coef * rho = 1.7e308 - -1.7e308 * 1 overflows float64"),
        ([1.0, 1.7e308, -1.7e308, -1.7e308], [1, 3], {"coef": 0.0, "advantage": "drgrpo"}, 1, "drgrpo advantage"),
        # Verifier-free: r~ = -coef * rho spans 2 coef.
        (None, [3], {"coef": 1.7e308, "advantage": "drgrpo"}, 0, "overflows float64"),
    ],
)
def test_rewards_that_float64_cannot_hold_are_refused(rewards, sizes, kwargs, index, needle):
    rho = [1.0, -1.0, -1.0, -1.0][: sum(sizes)]
    with pytest.raises(corrpo.InvalidValueError) as info:
        corrpo.regularize(rewards, rho, sizes, **kwargs)
    assert (info.value.field, info.value.index) == ("rewards", index)
    assert needle in str(info.value)


@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    exponent=st.integers(900, 1023),
    coef=st.sampled_from([0.0, 0.1, -1e308, 1.7e308]),
    advantage=st.sampled_from(["grpo", "drgrpo", "none"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_never_a_silent_nan(sizes, exponent, coef, advantage, seed):
    """Any finite rewards and coef: finite rewards and advantages, or an error that says
    float64 cannot hold them."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    rewards = rng.uniform(-1, 1, n) * 2.0**exponent
    rho = rng.uniform(-1, 1, n)
    try:
        out = corrpo.regularize(rewards, rho, sizes, coef=coef, advantage=advantage)
    except corrpo.InvalidValueError as err:
        assert err.field == "rewards" and "overflows float64" in err.message
    else:
        assert np.all(np.isfinite(out.rewards)) and np.all(np.isfinite(out.advantages))
        if advantage == "grpo":
            # Scale-free: within a group, the advantages have unit sample std (eps vanishes).
            for group in np.split(out.advantages, np.cumsum(sizes)[:-1]):
                if len(group) > 1 and np.ptp(group) > 0:
                    np.testing.assert_allclose(group.std(ddof=1), 1.0, rtol=1e-9)


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_score_of_statistics_near_either_float64_limit(method, rng):
    """Finite strengths about 1e308 or 1e-300 (a parameter-space measure has no bound): the
    rho and means of the same values near 1, never a NaN rho reported as defined."""
    h = rng.uniform(0.5, 2.0, 30)
    s = 0.5 * h + rng.uniform(0, 0.5, 30)
    config = corrpo.ScoreConfig(method=method, measure="l1_mean")
    want = corrpo.score(h, s, [10, 20], [2], rewards=[1.0, 0.0], token_ids=np.arange(30) % 7, config=config)
    for k in (1020, -1000):
        got = corrpo.score(h, s * 2.0**k, [10, 20], [2], rewards=[1.0, 0.0], token_ids=np.arange(30) % 7, config=config)
        assert got.reasons == [None, None]
        np.testing.assert_allclose(got.rho, want.rho, rtol=1e-12)
        np.testing.assert_allclose(got.grad_norm_mean, want.grad_norm_mean * 2.0**k, rtol=1e-12)
        np.testing.assert_allclose(got.fingerprint.rho_pooled, want.fingerprint.rho_pooled, rtol=1e-12)
        np.testing.assert_allclose(got.fingerprint.rho_unique, want.fingerprint.rho_unique, rtol=1e-12)
        np.testing.assert_allclose(got.fingerprint.strength_mean, want.fingerprint.strength_mean * 2.0**k, rtol=1e-12)
        np.testing.assert_array_equal(got.advantages, want.advantages)
