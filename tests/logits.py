"""Random logits and SPEC 2's accuracy check, shared by the native and Triton tests."""

import ml_dtypes
import numpy as np

from corrpo import reference

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def assert_matches_reference(stats, logits, ids, temperature=1.0, slack=1.0):
    """SPEC 2's accuracy bounds, against the reference on the same (widened) values; `slack`
    widens them for logits the code under test forms itself (float32 GEMM rounding)."""
    want = reference.token_stats(np.asarray(logits).astype(np.float64), ids, temperature=temperature)
    h, l = want["entropy"], want["logprob"]
    np.testing.assert_array_less(np.abs(stats.entropy - h), slack * 1e-4 * np.maximum(1, h) + 1e-12)
    np.testing.assert_array_less(np.abs(stats.logprob - l), slack * 1e-4 * np.maximum(1, np.abs(l)) + 1e-12)
    np.testing.assert_array_less(np.abs(stats.collision - want["collision"]), slack * 1e-6)
    np.testing.assert_array_less(np.abs(stats.grad_norm - want["grad_norm"]), slack * 1e-5)
    for name in ("entropy", "logprob", "collision", "grad_norm"):
        assert getattr(stats, name).dtype == np.float32


def random_logits(rng, rows, vocab, scale=3.0, masked=0.0):
    z = (scale * rng.standard_normal((rows, vocab))).astype(np.float32)
    ids = rng.integers(0, vocab, rows)
    mask = rng.random((rows, vocab)) < masked
    mask[np.arange(rows), ids] = False
    z[mask] = -np.inf
    return z, ids
