"""The paper's measure where trainers run the policy in reduced precision (SPEC 3): bf16 and
fp16 weights, and forwards that accelerate wraps in ``torch.autocast`` (TRL's default
``bf16=True``). Each is compared with the float64 copy of the same model, whose strengths
tests/test_gradients.py holds to a brute-force oracle: the values agree within the
precision's rounding through the network, and the ranking of tokens (what rho uses) holds."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from scipy import stats  # noqa: E402

from corrpo.testing import build_tiny_model  # noqa: E402

MEASURES = {
    "exact": ("l1_mean", "nuclear_qkvo", "frobenius"),
    "subsample": ("l1_mean", "nuclear_qkvo"),
    "jvp": ("frobenius",),
    "last_block": ("l1_mean", "nuclear_qkvo", "frobenius"),
    "local": ("l1_mean", "nuclear_qkvo", "frobenius"),
    "jvp_cv": ("frobenius",),
    "logit_grad": ("logit_grad", "head_logit_grad"),
}
#: Largest relative error against float64, and smallest per-token Spearman, per precision.
#: bf16 keeps 8 bits of mantissa (unit roundoff 2^-9 relative... 2^-8 absolute per op), and
#: the strengths go through a forward and a backward of a few blocks: a few percent.
BOUNDS = {"bf16": (0.08, 0.98), "fp16": (0.01, 0.995), "autocast": (0.08, 0.98)}
#: jvp_cv adds (J v)^2 - (L v)^2, a difference of two close squares, each from a pass in the
#: model's precision: the rounding of bf16 passes is amplified (up to 23% on a few tokens of
#: the tiny Llama, docs/fingerprint.md says so). Under autocast the passes run in float32.
JVP_CV_BOUNDS = {"bf16": (0.35, 0.95), "fp16": (0.05, 0.99), "autocast": (0.08, 0.98)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    path = tmp_path_factory.mktemp("tiny")
    build_tiny_model(path, seed=3)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(4, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    return model, ids


def _variant(model, kind: str):
    if kind == "bf16":
        return copy.deepcopy(model).to(torch.bfloat16)
    if kind == "fp16":
        return copy.deepcopy(model).to(torch.float16)
    from accelerate import Accelerator

    # What TRL and the HF Trainer do with bf16=True: the weights stay float32 and the
    # forward runs under torch.autocast(bfloat16).
    wrapped = Accelerator(mixed_precision="bf16", cpu=True).prepare_model(copy.deepcopy(model))
    with torch.no_grad():
        out = wrapped(input_ids=torch.tensor([[5, 6, 7]])).logits
    # accelerate hands the logits back as float32, rounded to bfloat16 by the autocast head.
    assert wrapped.lm_head.weight.dtype == torch.float32 and torch.equal(out, out.bfloat16().float()), "autocast is on"
    return wrapped


@pytest.mark.parametrize("kind", ["bf16", "fp16", "autocast"])
@pytest.mark.parametrize("estimator", list(MEASURES))
def test_reduced_precision_matches_float64(models, kind, estimator):
    from corrpo.gradients import token_strengths

    model, ids = models
    settings = {"estimator": estimator, "measures": MEASURES[estimator], "k": 6 if estimator == "subsample" else None}
    if estimator in ("jvp", "jvp_cv"):
        settings["k"] = 4  # the same directions (same seed) on both sides: the draws cancel out
    want = token_strengths(copy.deepcopy(model).double(), ids, **settings)
    got = token_strengths(_variant(model, kind), ids, **settings)
    assert np.array_equal(got.positions, want.positions)
    rtol, rank = (JVP_CV_BOUNDS if estimator == "jvp_cv" else BOUNDS)[kind]
    np.testing.assert_allclose(got.entropy_bits, want.entropy_bits, rtol=rtol, atol=rtol)
    for measure in MEASURES[estimator]:
        a, b = got.measure(measure), want.measure(measure)
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=rtol, err_msg=f"{kind} {estimator} {measure}")
        assert stats.spearmanr(a, b)[0] >= rank, (kind, estimator, measure)


def test_a_head_that_differs_is_still_refused_in_bf16(models):
    """The precision-aware check still catches a head corrpo does not model (logits scaled by
    1.25 after the head), and says what precision it saw."""
    from corrpo.gradients import ArchitectureError, token_strengths

    model, ids = models
    wrapped = _variant(model, "autocast")
    inner = wrapped.forward

    def scaled(*args, **kwargs):
        out = inner(*args, **kwargs)
        out.logits = out.logits * 1.25
        return out

    wrapped.forward = scaled
    with pytest.raises(ArchitectureError, match=r"autocast torch.bfloat16 at the head.*reduced precision"):
        token_strengths(wrapped, ids, measures=("l1_mean",))
