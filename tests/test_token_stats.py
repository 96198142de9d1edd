"""corrpo.token_stats against the float64 reference, on every SIMD path, for every dtype and
every edge case of SPEC 2."""

import os
import subprocess
import sys
import textwrap
import threading

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import corrpo
from corrpo import _native, reference
from corrpo._arrays import logits_buffer
from logits import DTYPES, assert_matches_reference, random_logits

@given(
    rows=st.integers(0, 6),
    vocab=st.integers(1, 300),
    scale=st.sampled_from([1e-3, 1.0, 8.0, 50.0, 1e4]),
    masked=st.sampled_from([0.0, 0.5, 0.95]),
    temperature=st.sampled_from([0.3, 1.0, 2.0]),
    dtype=st.sampled_from(sorted(DTYPES)),
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_reference(rows, vocab, scale, masked, temperature, dtype, seed):
    z, ids = random_logits(np.random.default_rng(seed), rows, vocab, scale, masked)
    z = z.astype(DTYPES[dtype])
    if rows and not np.all(np.isfinite(z.astype(np.float32)) | (z.astype(np.float32) == -np.inf)):
        return  # float16 overflowed a 1e4-scale logit to inf: covered by the error tests
    stats = corrpo.token_stats(z, ids, temperature=temperature)
    assert len(stats) == rows
    assert_matches_reference(stats, z, ids, temperature)


@pytest.mark.parametrize("isa", corrpo.supported_isas())
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_every_simd_path(isa, dtype, rng):
    z, ids = random_logits(rng, 8, 1531, scale=4.0, masked=0.2)
    z = z.astype(DTYPES[dtype])
    array, name = logits_buffer(z)
    h, l, c, g, head = _native.token_stats(array, name, ids, 0.8, None, None, isa)
    assert head is None
    stats = corrpo.TokenStats(h, l, c, g)
    assert_matches_reference(stats, z, ids, 0.8)


def test_full_vocabulary_bf16(rng):
    z, ids = random_logits(rng, 4, 151_936, scale=2.5)
    z = z.astype(ml_dtypes.bfloat16)
    assert_matches_reference(corrpo.token_stats(z, ids), z, ids)


def test_huge_magnitudes_and_tiny_vocabularies(rng):
    z = rng.uniform(-1e4, 1e4, (3, 64)).astype(np.float32)
    assert_matches_reference(corrpo.token_stats(z, [0, 5, 63]), z, [0, 5, 63])
    one = corrpo.token_stats(np.array([[3.0]], np.float32), [0])
    assert (one.entropy[0], one.logprob[0], one.collision[0], one.grad_norm[0]) == (0.0, 0.0, 1.0, 0.0)
    two = np.array([[0.0, 0.0], [1e4, -1e4]], np.float32)
    stats = corrpo.token_stats(two, [1, 0])
    assert_matches_reference(stats, two, [1, 0])
    assert stats.entropy[0] == pytest.approx(np.log(2), rel=1e-6)
    assert stats.grad_norm[0] == pytest.approx(np.sqrt(0.5), rel=1e-6)


def test_empty_batch():
    stats = corrpo.token_stats(np.zeros((0, 10), np.float32), np.zeros(0, np.int64))
    assert len(stats) == 0 and stats.grad_norm.shape == (0,)


def test_hidden_norms_give_head_grad_norm(rng):
    z, ids = random_logits(rng, 5, 77)
    norms = rng.uniform(0, 30, 5).astype(np.float32)
    stats = corrpo.token_stats(z, ids, hidden_norms=norms)
    want = reference.token_stats(z, ids, hidden_norms=norms)["head_grad_norm"]
    np.testing.assert_allclose(stats.head_grad_norm, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("edit", "ids", "error", "needle"),
    [
        (lambda z: z.__setitem__((3, 17), np.nan), None, corrpo.InvalidLogitsError, "vocabulary index 17 is NaN"),
        (lambda z: z.__setitem__((3, 2), np.inf), None, corrpo.InvalidLogitsError, "vocabulary index 2 is inf"),
        (lambda z: z.__setitem__(3, -np.inf), None, corrpo.InvalidLogitsError, "every entry is -inf"),
        (lambda z: z.__setitem__((3, 9), -np.inf), 9, corrpo.InvalidTokenError, "shifted by one"),
        (None, 40, corrpo.InvalidTokenError, "40 is outside the vocabulary [0, 40)"),
        (None, -1, corrpo.InvalidTokenError, "-1 is outside the vocabulary"),
    ],
)
def test_bad_rows_name_rollout_and_token(edit, ids, error, needle, rng):
    z, token_ids = random_logits(rng, 6, 40)
    if edit:
        edit(z)
    if ids is not None:
        token_ids[3] = ids
    for dtype in DTYPES.values():
        with pytest.raises(error) as info:
            corrpo.token_stats(z.astype(dtype), token_ids, lengths=[2, 4])
        assert needle in str(info.value)
        assert "rollout 1, token 1 (row 3)" in str(info.value)
        assert (info.value.row, info.value.rollout, info.value.token_index) == (3, 1, 1)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf"), "hot", True])
def test_bad_temperature(temperature):
    with pytest.raises(corrpo.ConfigError, match="temperature"):
        corrpo.token_stats(np.zeros((1, 3), np.float32), [0], temperature=temperature)


def test_shape_and_dtype_errors():
    with pytest.raises(corrpo.ShapeError, match="2-D"):
        corrpo.token_stats(np.zeros((2, 3, 4), np.float32), [0, 0])
    with pytest.raises(corrpo.ShapeError, match="token_ids has 1 entries, expected 2"):
        corrpo.token_stats(np.zeros((2, 4), np.float32), [0])
    with pytest.raises(corrpo.ConfigError, match="float32, float16 or bfloat16"):
        corrpo.token_stats(np.zeros((2, 4), np.int32), [0, 0])
    with pytest.raises(corrpo.ConfigError, match="integers"):
        corrpo.token_stats(np.zeros((2, 4), np.float32), [0.5, 1.0])
    with pytest.raises(corrpo.ShapeError, match="vocabulary of size 0"):
        corrpo.token_stats(np.zeros((2, 0), np.float32), [0, 0])
    with pytest.raises(corrpo.InvalidValueError, match="hidden_norms"):
        corrpo.token_stats(np.zeros((1, 4), np.float32), [0], hidden_norms=[np.nan])


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_strided_rows_are_read_in_place(dtype, rng):
    padded = rng.standard_normal((5, 64)).astype(DTYPES[dtype])
    view = padded[:, :50]
    array, _ = logits_buffer(view)
    assert np.shares_memory(array, padded), "a row-strided slice must not be copied"
    ids = rng.integers(0, 50, 5)
    got = corrpo.token_stats(view, ids)
    want = corrpo.token_stats(np.ascontiguousarray(view), ids)
    np.testing.assert_array_equal(got.grad_norm, want.grad_norm)
    np.testing.assert_array_equal(got.entropy, want.entropy)


def test_column_strided_input_is_copied_and_correct(rng):
    z = rng.standard_normal((40, 6)).astype(np.float32).T  # columns 6 apart
    ids = rng.integers(0, 40, 6)
    assert_matches_reference(corrpo.token_stats(z, ids), z, ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_cpu_tensors_without_copy(dtype, rng):
    z, ids = random_logits(rng, 4, 333)
    tensor = torch.from_numpy(z).to(dtype)
    array, _ = logits_buffer(tensor)
    assert array.ctypes.data == tensor.data_ptr(), "a contiguous tensor must be read in place"
    stats = corrpo.token_stats(tensor, torch.from_numpy(ids))
    assert_matches_reference(stats, tensor.float().numpy(), ids)


def test_float64_input_is_converted(rng):
    z, ids = random_logits(rng, 3, 20)
    stats = corrpo.token_stats(z.astype(np.float64), ids)
    np.testing.assert_array_equal(stats.grad_norm, corrpo.token_stats(z, ids).grad_norm)


def test_bit_identical_for_any_thread_count(tmp_path, rng):
    z, ids = random_logits(rng, 200, 2_001, masked=0.1)
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "ids.npy", ids)
    script = textwrap.dedent(
        f"""
        import numpy as np, corrpo, sys
        z = np.load({str(tmp_path / "z.npy")!r}); ids = np.load({str(tmp_path / "ids.npy")!r})
        s = corrpo.token_stats(z, ids)
        sys.stdout.write(np.concatenate([s.entropy, s.logprob, s.collision, s.grad_norm]).tobytes().hex())
        """
    )
    outputs = set()
    for threads in ("1", "2", "5"):
        env = dict(os.environ, RAYON_NUM_THREADS=threads)
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        outputs.add(run.stdout)
    assert len(outputs) == 1


def test_native_work_releases_the_gil(rng):
    """A Python thread runs while another thread is inside token_stats.

    With a switch interval far longer than the call, the interpreter never preempts the
    calling thread: the spinner can run before `done` is set only if the native call
    released the GIL.
    """
    z, ids = random_logits(rng, 256, 32_000)
    inside, done = threading.Event(), threading.Event()
    ticks = []

    def spin():
        inside.wait()
        n = 0
        while not done.is_set():
            n += 1
        ticks.append(n)

    spinner = threading.Thread(target=spin)
    spinner.start()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.5)
    try:
        inside.set()
        corrpo.token_stats(z, ids)
        done.set()
    finally:
        sys.setswitchinterval(interval)
    spinner.join()
    assert ticks[0] > 0


@pytest.mark.parametrize(
    ("lengths", "needle"),
    [
        ([2, 2], "add up to 4 tokens"),
        ([2, 5], "add up to 7 tokens"),
        ([7, -1], "lengths[1] is negative: -1"),
        ([2**62] * 4 + [6], f"add up to {2**64 + 6} tokens"),  # wraps to 6 in int64
    ],
)
def test_lengths_must_split_the_rows_exactly(lengths, needle, rng):
    z, ids = random_logits(rng, 6, 40)
    h = torch.from_numpy(rng.standard_normal((6, 8)).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal((40, 8)).astype(np.float32))
    for call, rows_of in ((lambda: corrpo.token_stats(z, ids, lengths=lengths), "logits"),
                          (lambda: corrpo.token_stats_from_hidden(h, w, ids, lengths=lengths), "hidden")):  # fmt: skip
        with pytest.raises(corrpo.ShapeError) as info:
            call()
        assert needle in str(info.value) and info.value.field == "lengths"
        if "negative" not in needle:
            assert str(info.value).endswith(f"but {rows_of} has 6 rows (one per token)")
    # Lengths that do add up only name rollouts: the figures are those of no lengths.
    np.testing.assert_array_equal(corrpo.token_stats(z, ids, lengths=[1, 5]).entropy, corrpo.token_stats(z, ids).entropy)


def _import_with_simd(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CORRPO_SIMD=value)
    code = "import corrpo; print(corrpo.simd_isa())"
    return subprocess.run([sys.executable, "-W", "error", "-c", code], env=env, capture_output=True, text=True)


def test_corrpo_simd_names_are_the_cores():
    from corrpo.stats import ISAS

    assert set(corrpo.supported_isas()) <= set(ISAS)
    z, ids = np.zeros((1, 3), np.float32), np.zeros(1, np.int64)
    for name in ISAS:  # each is a name the core parses: it runs, or says this CPU lacks it
        try:
            _native.token_stats(z, "float32", ids, 1.0, None, None, name)
        except corrpo.ConfigError as err:
            assert f"does not support the {name} instruction set" in str(err)
    with pytest.raises(corrpo.ConfigError, match="unknown SIMD instruction set"):
        _native.token_stats(z, "float32", ids, 1.0, None, None, "avx3")


def test_an_unknown_corrpo_simd_warns_at_import():
    done = _import_with_simd("avx3")
    assert done.returncode != 0  # the warning, made an error by -W error
    assert "RuntimeWarning: CORRPO_SIMD='avx3': names no instruction set (use one of portable, avx2, avx512" in done.stderr
    # Without -W error the tools still run (the check runs at import, before a CLI could catch).
    env = dict(os.environ, CORRPO_SIMD="avx3")
    done = subprocess.run([sys.executable, "-m", "corrpo.cli", "--help"], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "usage" in done.stdout and "CORRPO_SIMD='avx3'" in done.stderr, done.stderr
    for value, isa in (("portable", "portable"), ("", corrpo.supported_isas()[-1])):
        done = _import_with_simd(value)  # -W error: no warning either
        assert done.returncode == 0 and done.stdout.strip() == isa, done.stderr


def test_a_corrpo_simd_this_cpu_lacks_warns():
    from corrpo.stats import ISAS

    lacking = [name for name in ISAS if name not in corrpo.supported_isas()]
    if not lacking:
        pytest.skip(f"this CPU supports every instruction set corrpo has ({', '.join(ISAS)})")
    done = _import_with_simd(lacking[0])
    assert done.returncode != 0  # the warning, made an error by -W error
    assert f"RuntimeWarning: CORRPO_SIMD={lacking[0]!r}: this CPU does not support {lacking[0]}" in done.stderr
