"""The Triton kernels (kernels/corrpo_kernels) against the float64 reference, for every SPEC 2
edge case, odd vocabularies, strided input and every dtype; the fused-from-hidden kernel
against the reference and against the unfused kernel; and the API's Triton backend
against the native core, errors included. On a GPU they run there; without one, on CPU
tensors through Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import corrpo
import corrpo_kernels
from corrpo import from_hidden, reference
from logits import DTYPES, assert_matches_reference, random_logits

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NAMES = ("entropy", "logprob", "collision", "grad_norm")


def on_device(array, dtype="float32"):
    """A float32 NumPy array as a device tensor of `dtype` (rounded once, as the reference sees it)."""
    return torch.from_numpy(np.ascontiguousarray(array)).to(DEVICE, TORCH_DTYPES[dtype])


def host(out):
    """KernelStats as a corrpo.TokenStats of NumPy arrays, for the shared accuracy check."""
    stats = out.stats.cpu().numpy()
    return corrpo.TokenStats(*stats)


def widened(tensor):
    return tensor.cpu().double().numpy()


# -- the logits kernel -------------------------------------------------------------------


@settings(max_examples=40)
@given(
    rows=st.integers(0, 9),
    vocab=st.integers(1, 300),
    scale=st.sampled_from([1e-3, 1.0, 8.0, 50.0, 1e4]),
    masked=st.sampled_from([0.0, 0.5, 0.95]),
    temperature=st.sampled_from([0.3, 1.0, 2.0]),
    dtype=st.sampled_from(sorted(TORCH_DTYPES)),
    seed=st.integers(0, 2**32 - 1),
)
def test_kernel_matches_reference(rows, vocab, scale, masked, temperature, dtype, seed):
    z, ids = random_logits(np.random.default_rng(seed), rows, vocab, scale, masked)
    logits = on_device(z, dtype)
    if dtype == "float16" and torch.isinf(logits).any():
        return  # float16 overflowed a 1e4-scale logit: covered by the fault tests
    out = corrpo_kernels.token_stats(logits, torch.from_numpy(ids).to(DEVICE), temperature=temperature)
    assert out.stats.shape == (4, rows) and out.stats.dtype == torch.float32
    assert not out.fault.any()
    assert_matches_reference(host(out), widened(logits), ids, temperature)


@pytest.mark.parametrize("vocab", [1, 2, 3, 31, 4095, 4096, 4097, 10_007])
@pytest.mark.parametrize("dtype", sorted(TORCH_DTYPES))
def test_odd_vocabularies(vocab, dtype, rng):
    z, ids = random_logits(rng, 5, vocab, scale=4.0, masked=0.3)
    ids[0] = vocab - 1  # the last column, just inside the final partial block
    z[0, -1] = 1.5
    logits = on_device(z, dtype)
    out = corrpo_kernels.token_stats(logits, torch.from_numpy(ids).to(DEVICE), temperature=0.7)
    assert not out.fault.any()
    assert_matches_reference(host(out), widened(logits), ids, 0.7)


def test_full_vocabulary_bf16(rng):
    z, ids = random_logits(rng, 3, 151_936, scale=2.5)
    logits = on_device(z, "bfloat16")
    out = corrpo_kernels.token_stats(logits, torch.from_numpy(ids).to(DEVICE))
    assert_matches_reference(host(out), widened(logits), ids)


@pytest.mark.parametrize("dtype", sorted(TORCH_DTYPES))
def test_strided_rows_are_read_in_place(dtype, rng):
    big, _ = random_logits(rng, 12, 700, masked=0.2)
    parent = on_device(big, dtype)
    view = parent[1::3, 50:613]  # row stride 3 x 700, columns offset by 50
    assert view.stride() == (2100, 1)
    ids = rng.integers(0, view.shape[1], view.shape[0])
    out = corrpo_kernels.token_stats(view, torch.from_numpy(ids).to(DEVICE))
    assert_matches_reference(host(out), widened(view), ids)
    dense = corrpo_kernels.token_stats(view.contiguous(), torch.from_numpy(ids).to(DEVICE))
    assert torch.equal(out.stats, dense.stats)


def test_huge_magnitudes_and_tiny_vocabularies(rng):
    z = rng.uniform(-1e4, 1e4, (3, 64)).astype(np.float32)
    ids = np.array([0, 5, 63])
    out = corrpo_kernels.token_stats(on_device(z), torch.from_numpy(ids).to(DEVICE))
    assert_matches_reference(host(out), z, ids)
    one = corrpo_kernels.token_stats(on_device(np.array([[3.0]], np.float32)), torch.zeros(1, dtype=torch.long, device=DEVICE))
    assert one.stats[:, 0].tolist() == [0.0, 0.0, 1.0, 0.0]
    two = np.array([[0.0, 0.0], [1e4, -1e4]], np.float32)
    out = corrpo_kernels.token_stats(on_device(two), torch.tensor([1, 0], device=DEVICE))
    assert_matches_reference(host(out), two, [1, 0])
    assert out.entropy[0].item() == pytest.approx(np.log(2), rel=1e-6)
    assert out.grad_norm[0].item() == pytest.approx(np.sqrt(0.5), rel=1e-6)


def test_empty_batch():
    out = corrpo_kernels.token_stats(torch.zeros((0, 10), device=DEVICE), torch.zeros(0, dtype=torch.long, device=DEVICE))
    assert out.stats.shape == (4, 0) and out.fault.shape == (0,)


def test_faults_are_flagged_per_row_and_other_rows_stay_valid(rng):
    z, ids = random_logits(rng, 9, 50, masked=0.2)
    z[1, 7] = np.nan
    z[2, 49] = np.inf
    z[3] = -np.inf
    ids[4] = 50
    ids[5] = -3
    z[6, 11] = -np.inf
    ids[6] = 11
    z[7, ids[7]] = np.nan  # a NaN target is a bad logit, not a bad token
    ids[8] = 99  # out of range wins over the NaN in the same row, as in the native core
    z[8, 0] = np.nan
    for dtype in TORCH_DTYPES:
        logits = on_device(z, dtype)
        out = corrpo_kernels.token_stats(logits, torch.from_numpy(ids).to(DEVICE))
        assert [corrpo_kernels.FAULTS[c] for c in out.fault.tolist()] == [
            "ok", "non_finite", "non_finite", "all_neg_inf", "token_out_of_range", "token_out_of_range",
            "impossible_token", "non_finite", "token_out_of_range",
        ]
        assert torch.isnan(out.stats[:, 1:]).all()
        assert_matches_reference(corrpo.TokenStats(*out.stats[:, :1].cpu().numpy()), widened(logits[:1]), ids[:1])


def test_kernel_rejects_bad_arguments():
    z = torch.zeros((2, 3), device=DEVICE)
    ids = torch.zeros(2, dtype=torch.long, device=DEVICE)
    for tau in (0.0, -1.0, float("nan"), float("inf"), 1e-39):
        with pytest.raises(ValueError, match="temperature"):
            corrpo_kernels.token_stats(z, ids, temperature=tau)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        corrpo_kernels.token_stats(z.double(), ids)
    with pytest.raises(ValueError, match="unit-stride"):
        corrpo_kernels.token_stats(z.T, torch.zeros(3, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"token_ids must be \[2\]"):
        corrpo_kernels.token_stats(z, ids[:1])
    with pytest.raises(TypeError, match="integers"):
        corrpo_kernels.token_stats(z, ids.float())


def test_kernels_compile_for_nvidia_gpus(tmp_path):
    """Triton's real compiler on every kernel and dtype for sm_80 and sm_90 (ptxas ships with
    triton): the interpreter above runs them as Python and accepts code the compiler rejects.
    No kernel may spill registers at its default launch parameters."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    script = Path(__file__).with_name("compile_kernels.py")
    done = subprocess.run([sys.executable, str(script), "80", "90"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled,") == 2 * 3 * 4, done.stdout
    assert done.stdout.count(" 0 bytes spilled") == 2 * 3 * 4, done.stdout


# -- the fused kernel ----------------------------------------------------------------------


# The fused kernel forms its logits with float32 accumulation over d: a few ulps of |z| that
# the float64 reference does not have, on top of the reduction's own error.
FUSED_SLACK = 4.0


def hidden_case(rng, rows, dim, vocab, dtype, scale=1.0):
    h = on_device(rng.standard_normal((rows, dim)).astype(np.float32), dtype)
    w = on_device((scale * rng.standard_normal((vocab, dim)) / np.sqrt(dim)).astype(np.float32), dtype)
    ids = rng.integers(0, vocab, rows)
    return h, w, ids


@pytest.mark.parametrize(
    ("rows", "dim", "vocab", "splits"),
    [(1, 16, 1, None), (5, 16, 2, None), (63, 40, 127, 1), (64, 64, 129, 2), (65, 100, 300, 3), (130, 24, 1000, 5)],
)
@pytest.mark.parametrize("dtype", sorted(TORCH_DTYPES))
def test_fused_matches_reference(rows, dim, vocab, splits, dtype, rng):
    h, w, ids = hidden_case(rng, rows, dim, vocab, dtype, scale=6.0)
    out = corrpo_kernels.token_stats_from_hidden(h, w, torch.from_numpy(ids).to(DEVICE), temperature=0.8, splits=splits)
    assert not out.fault.any()
    logits = widened(h) @ widened(w).T  # float64 products of the same (rounded) inputs
    assert_matches_reference(host(out), logits, ids, 0.8, slack=FUSED_SLACK)


@pytest.mark.parametrize("dtype", sorted(TORCH_DTYPES))
def test_fused_agrees_with_unfused(dtype, rng):
    h, w, ids = hidden_case(rng, 70, 48, 700, dtype, scale=8.0)
    ids_dev = torch.from_numpy(ids).to(DEVICE)
    fused = corrpo_kernels.token_stats_from_hidden(h, w, ids_dev, splits=3)
    unfused = corrpo_kernels.token_stats(h.double().matmul(w.double().T).float(), ids_dev)
    torch.testing.assert_close(fused.stats, unfused.stats, rtol=2e-5, atol=2e-5)


def test_fused_reads_strided_inputs(rng):
    h, w, ids = hidden_case(rng, 40, 32, 200, "float32")
    wide_h = torch.zeros((40, 50), device=DEVICE)
    wide_h[:, 3:35] = h
    ids_dev = torch.from_numpy(ids).to(DEVICE)
    dense = corrpo_kernels.token_stats_from_hidden(h, w, ids_dev)
    sliced = corrpo_kernels.token_stats_from_hidden(wide_h[:, 3:35], w.T.contiguous().T, ids_dev)
    torch.testing.assert_close(sliced.stats, dense.stats, rtol=1e-6, atol=1e-6)


def test_fused_flags_faults(rng):
    h, w, ids = hidden_case(rng, 6, 16, 90, "float32")
    h[2, 5] = float("nan")
    ids[4] = 90
    out = corrpo_kernels.token_stats_from_hidden(h, w, torch.from_numpy(ids).to(DEVICE), splits=2)
    assert out.fault.tolist() == [0, 0, 1, 0, 3, 0]
    w[17, 0] = float("nan")  # poisons column 17 of every row
    out = corrpo_kernels.token_stats_from_hidden(h, w, torch.from_numpy(ids).to(DEVICE), splits=2)
    assert out.fault.tolist() == [1, 1, 1, 1, 3, 1]
    empty = corrpo_kernels.token_stats_from_hidden(h[:0], w, torch.zeros(0, dtype=torch.long, device=DEVICE))
    assert empty.stats.shape == (4, 0)


# -- corrpo's API on the Triton backend -------------------------------------------------------


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_api_triton_equals_native(dtype, rng):
    z, ids = random_logits(rng, 33, 517, masked=0.1)
    z = z.astype(DTYPES[dtype])
    norms = rng.uniform(0, 20, 33).astype(np.float32)
    inputs = [z, torch.from_numpy(z.astype(np.float32)).to(TORCH_DTYPES[dtype])]
    for logits in inputs:
        gpu = corrpo.token_stats(logits, ids, temperature=1.3, hidden_norms=norms, backend="triton")
        cpu = corrpo.token_stats(logits, ids, temperature=1.3, hidden_norms=norms, backend="cpu")
        for name in (*NAMES, "head_grad_norm"):
            got, want = getattr(gpu, name), getattr(cpu, name)
            assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (33,)
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6, err_msg=name)


def test_api_strided_and_float64_input(rng):
    z, _ = random_logits(rng, 10, 300)
    view = z[::2, 7:250]
    ids = rng.integers(0, 243, 5)
    np.testing.assert_allclose(
        corrpo.token_stats(view, ids, backend="triton").entropy, corrpo.token_stats(view, ids, backend="cpu").entropy, atol=2e-6
    )
    z64 = z.astype(np.float64)
    ids = rng.integers(0, 300, 10)
    t = torch.from_numpy(z64)
    np.testing.assert_allclose(
        corrpo.token_stats(t, ids, backend="triton").grad_norm, corrpo.token_stats(z64, ids).grad_norm, atol=2e-6
    )


@pytest.mark.parametrize(
    ("edit", "ids"),
    [
        (lambda z: z.__setitem__((3, 17), np.nan), None),
        (lambda z: z.__setitem__((3, 2), np.inf), None),
        (lambda z: z.__setitem__(3, -np.inf), None),
        (lambda z: z.__setitem__((3, 9), -np.inf), 9),
        (None, 40),
        (None, -1),
    ],
)
def test_api_errors_equal_the_native_ones(edit, ids, rng):
    z, token_ids = random_logits(rng, 6, 40)
    if edit:
        edit(z)
    if ids is not None:
        token_ids[3] = ids
    z[5, 0] = np.nan  # a later faulty row: the first one is reported, as the native core does
    for dtype in DTYPES.values():
        errors = []
        for backend in ("cpu", "triton"):
            with pytest.raises(corrpo.CorrpoError) as info:
                corrpo.token_stats(z.astype(dtype), token_ids, lengths=[2, 4], backend=backend)
            errors.append(info.value)
        cpu, gpu = errors
        assert type(gpu) is type(cpu) and str(gpu) == str(cpu)
        context = ("row", "rollout", "token_index", "vocab_index", "token_id")
        assert [getattr(gpu, a) for a in context] == [getattr(cpu, a) for a in context]
        assert (cpu.row, cpu.rollout, cpu.token_index) == (3, 1, 1)


def test_api_checks_settings_as_the_native_path_does():
    z = np.zeros((2, 3), np.float32)
    for tau in (0.0, float("nan"), "hot"):
        with pytest.raises(corrpo.ConfigError, match="temperature"):
            corrpo.token_stats(z, [0, 1], temperature=tau, backend="triton")
    with pytest.raises(corrpo.ShapeError, match="2 entries, expected"):
        corrpo.token_stats(np.zeros((3, 3), np.float32), [0, 1], backend="triton")
    with pytest.raises(corrpo.ShapeError, match="must be 2-D"):
        corrpo.token_stats(torch.zeros(2, 3, 4), [0, 1], backend="triton")
    with pytest.raises(corrpo.ConfigError, match="float32, float16 or bfloat16"):
        corrpo.token_stats(torch.zeros(2, 3, dtype=torch.int32), [0, 1], backend="triton")
    with pytest.raises(corrpo.InvalidValueError, match=r"hidden_norms\[1\]") as info:
        corrpo.token_stats(z, [0, 1], hidden_norms=[1.0, -2.0], backend="triton")
    assert (info.value.field, info.value.index) == ("hidden_norms", 1)
    with pytest.raises(corrpo.ConfigError, match="backend must be one of auto, cpu, triton"):
        corrpo.token_stats(z, [0, 1], backend="gpu")
    empty = corrpo.token_stats(np.zeros((0, 5), np.float32), [], backend="triton")
    assert len(empty) == 0


# -- corrpo.token_stats_from_hidden ---------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", sorted(TORCH_DTYPES))
def test_from_hidden_matches_reference(backend, dtype, rng, monkeypatch):
    monkeypatch.setattr(from_hidden, "_CHUNK_BYTES", 4 * 300 * 7)  # 7 rows per CPU chunk
    h, w, ids = hidden_case(rng, 45, 24, 300, dtype, scale=5.0)
    h, w = h.cpu(), w.cpu()
    stats = corrpo.token_stats_from_hidden(h, w, ids, temperature=0.9, backend=backend)
    logits = widened(h) @ widened(w).T
    assert_matches_reference(stats, logits, ids, 0.9, slack=FUSED_SLACK)
    norms = np.linalg.norm(widened(h), axis=1)
    want = reference.token_stats(logits, ids, temperature=0.9, hidden_norms=norms)["head_grad_norm"]
    np.testing.assert_allclose(stats.head_grad_norm, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_from_hidden_errors_name_the_row(backend, rng, monkeypatch):
    monkeypatch.setattr(from_hidden, "_CHUNK_BYTES", 4 * 60 * 4)  # the bad row sits in the third chunk
    h, w, ids = hidden_case(rng, 12, 8, 60, "float32")
    h, w = h.cpu(), w.cpu()
    bad_h = h.clone()
    bad_h[9, 3] = float("nan")
    with pytest.raises(corrpo.InvalidLogitsError, match=r"rollout 1, token 4 \(row 9\): vocabulary index 0 is NaN"):
        corrpo.token_stats_from_hidden(bad_h, w, ids, lengths=[5, 7], backend=backend)
    ids[10] = 60
    with pytest.raises(corrpo.InvalidTokenError, match=r"row 10\): 60 is outside the vocabulary \[0, 60\)"):
        corrpo.token_stats_from_hidden(h, w, ids, lengths=[5, 7], backend=backend)


def test_from_hidden_checks_its_inputs():
    h, w = torch.zeros(3, 4), torch.zeros(5, 4)
    with pytest.raises(corrpo.ShapeError, match="share d"):
        corrpo.token_stats_from_hidden(h, torch.zeros(5, 3), [0, 1, 2])
    with pytest.raises(corrpo.ShapeError, match="vocabulary of size 0"):
        corrpo.token_stats_from_hidden(h, torch.zeros(0, 4), [0, 1, 2])
    with pytest.raises(corrpo.ConfigError, match="share one float dtype"):
        corrpo.token_stats_from_hidden(h, w.bfloat16(), [0, 1, 2])
    with pytest.raises(corrpo.ConfigError, match="must be a torch tensor"):
        corrpo.token_stats_from_hidden(h.numpy(), w, [0, 1, 2])
    with pytest.raises(corrpo.ShapeError, match="3 entries, expected"):
        corrpo.token_stats_from_hidden(torch.zeros(4, 4), w, [0, 1, 2])
    h64, w64 = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    for backend in ("cpu", "triton"):
        want = corrpo.token_stats_from_hidden(h64.float(), w64.float(), [0, 1, 2], backend=backend)
        got = corrpo.token_stats_from_hidden(h64, w64, [0, 1, 2], backend=backend)
        np.testing.assert_array_equal(got.entropy, want.entropy)
        np.testing.assert_array_equal(got.head_grad_norm, want.head_grad_norm)
        with pytest.raises(corrpo.ConfigError, match="temperature"):
            corrpo.token_stats_from_hidden(h[:0], w, [], temperature=0.0, backend=backend)
        assert len(corrpo.token_stats_from_hidden(h[:0], w, [], backend=backend)) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_dispatch_to_the_kernels(rng):
    z, ids = random_logits(rng, 64, 5000, masked=0.1)
    logits = on_device(z, "bfloat16")
    gpu = corrpo.token_stats(logits, torch.from_numpy(ids).to(DEVICE))  # backend "auto"
    cpu = corrpo.token_stats(logits.cpu(), ids)
    np.testing.assert_allclose(gpu.entropy, cpu.entropy, atol=2e-6, rtol=2e-6)
    with pytest.raises(corrpo.ConfigError, match="reads CPU memory"):
        corrpo.token_stats(logits, ids, backend="cpu")
