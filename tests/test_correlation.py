"""Correlations, per-rollout rho and the fingerprint against scipy and the reference."""

import numpy as np
import pytest
import scipy.stats
from hypothesis import given
from hypothesis import strategies as st

import corrpo
from corrpo import reference


def samples(draw_n=st.integers(2, 80)):
    # Values rounded to a coarse grid so that ties are common.
    grid = st.floats(-5, 5, allow_nan=False).map(lambda v: round(v * 2) / 2)
    return draw_n.flatmap(lambda n: st.tuples(st.lists(grid, min_size=n, max_size=n), st.lists(grid, min_size=n, max_size=n)))


@given(samples())
def test_correlations_match_scipy(xy):
    x, y = map(np.array, xy)
    constant = np.all(x == x[0]) or np.all(y == y[0])
    for method, scipy_fn in (("spearman", scipy.stats.spearmanr), ("pearson", scipy.stats.pearsonr)):
        got = corrpo.correlation(x, y, method=method)
        if constant:
            assert np.isnan(got)
            continue
        want = scipy_fn(x, y)[0]
        assert got == pytest.approx(want, abs=1e-12)
        assert reference.correlation(x, y, method=method) == pytest.approx(want, abs=1e-12)


@given(st.lists(st.floats(-3, 3).map(lambda v: round(v, 1)), min_size=1, max_size=60))
def test_reference_ranks_match_scipy(values):
    np.testing.assert_array_equal(reference.average_ranks(values), scipy.stats.rankdata(values))


@given(
    lengths=st.lists(st.integers(0, 30), min_size=1, max_size=12),
    min_tokens=st.integers(2, 12),
    method=st.sampled_from(["spearman", "pearson"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_rollout_correlations_match_reference(lengths, min_tokens, method, seed):
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    h = np.round(rng.random(n), 1)
    g = np.round(1 - h + 0.3 * rng.random(n), 2)
    if n and lengths[0] >= 2:
        h[: lengths[0]] = 0.5  # a rollout of constant entropy
    got = corrpo.rollout_correlations(h, g, lengths, method=method, min_tokens=min_tokens)
    want = reference.rollout_correlations(h, g, lengths, method=method, min_tokens=min_tokens)
    np.testing.assert_allclose(got.rho, want["rho"], atol=1e-12)
    np.testing.assert_array_equal(got.n_tokens, lengths)
    assert got.reasons == want["reasons"]
    assert all(r in corrpo.REASONS for r in got.reasons if r is not None)
    np.testing.assert_array_equal(got.defined, ~np.isnan(want["rho"]))


def test_undefined_rho_is_nan_with_reason_never_zero():
    h = np.r_[np.arange(5.0), np.full(10, 0.3), np.arange(10.0)]
    g = np.r_[np.arange(5.0), np.arange(10.0), np.full(10, 2.0)]
    rc = corrpo.rollout_correlations(h, g, [5, 10, 10])
    assert np.isnan(rc.rho).all()
    assert rc.reasons == ["too_few_tokens", "constant_entropy", "constant_grad_norm"]


@given(seed=st.integers(0, 2**32 - 1), with_ids=st.booleans(), with_lengths=st.booleans())
def test_fingerprint_matches_reference(seed, with_ids, with_lengths):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 40, 6)
    n = int(lengths.sum())
    h = rng.random(n)
    g = 1 - h + rng.random(n)
    ids = rng.integers(0, 25, n) if with_ids else None
    kwargs = dict(token_ids=ids, lengths=lengths if with_lengths else None, min_tokens=4)
    got = corrpo.fingerprint(h, g, **kwargs)
    want = reference.fingerprint(h, g, **kwargs)
    for name, value in want.items():
        actual = getattr(got, name)
        if isinstance(value, float):
            assert actual == pytest.approx(value, abs=1e-12, nan_ok=True), name
        else:
            assert actual == value, name
    if n:
        assert got.entropy_mean_bits == pytest.approx(h.mean() / np.log(2))


def test_fingerprint_unique_tokens_against_scipy():
    h = np.array([0.1, 0.9, 0.5, 0.3, 0.2, 0.7, 0.8, 0.4, 0.6, 0.55])
    g = np.array([0.8, 0.1, 0.4, 0.6, 0.9, 0.2, 0.15, 0.7, 0.5, 0.3])
    ids = np.array([3, 1, 2, 3, 4, 5, 6, 7, 8, 1])
    fp = corrpo.fingerprint(h, g, ids, min_tokens=2)
    mean_h = [np.mean(h[ids == i]) for i in np.unique(ids)]
    mean_g = [np.mean(g[ids == i]) for i in np.unique(ids)]
    assert fp.n_unique_tokens == 8
    assert fp.rho_unique == pytest.approx(scipy.stats.spearmanr(mean_h, mean_g)[0], abs=1e-12)
    assert fp.rho_pooled == pytest.approx(scipy.stats.spearmanr(h, g)[0], abs=1e-12)
    assert fp.rho_unique_reason is None and fp.rho_rollout_mean is None


def test_correlation_errors():
    with pytest.raises(corrpo.InvalidValueError, match=r"entropy\[2\]: nan is not finite|entropy\[2\]: NaN") as info:
        corrpo.rollout_correlations([0.1, 0.2, np.nan], [1, 2, 3], [3])
    assert (info.value.field, info.value.index) == ("entropy", 2)
    with pytest.raises(corrpo.ShapeError, match="add up to 2 tokens"):
        corrpo.rollout_correlations([0.1, 0.2, 0.3], [1, 2, 3], [1, 1])
    with pytest.raises(corrpo.ShapeError, match="negative"):
        corrpo.rollout_correlations([0.1, 0.2, 0.3], [1, 2, 3], [4, -1])
    # Lengths whose sum wraps around to the token count (4 * 2**62 + 3 = 3 in 64 bits).
    with pytest.raises(corrpo.ShapeError, match="add up to more than"):
        corrpo.rollout_correlations([0.1, 0.2, 0.3], [1, 2, 3], [2**62] * 4 + [3])
    with pytest.raises(corrpo.ShapeError, match="add up to more than"):
        corrpo.score([0.1, 0.2, 0.3], [1, 2, 3], [2**62] * 4 + [3], [3])
    with pytest.raises(corrpo.ShapeError, match="grad_norm has 2 entries"):
        corrpo.rollout_correlations([0.1, 0.2, 0.3], [1, 2], [3])
    with pytest.raises(corrpo.ConfigError, match="min_tokens"):
        corrpo.rollout_correlations([0.1, 0.2], [1, 2], [2], min_tokens=1)
    with pytest.raises(corrpo.ConfigError, match="spearman"):
        corrpo.correlation([1, 2, 3], [3, 2, 1], method="kendall")
    with pytest.raises(corrpo.ShapeError):
        corrpo.correlation([1, 2, 3], [3, 2])
