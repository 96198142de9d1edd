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
