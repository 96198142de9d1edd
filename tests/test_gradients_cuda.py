"""corrpo.gradients on a CUDA device (``make gpu-check`` runs this file): every estimator,
run on the GPU in float32, gives what the same estimator gives on the CPU in float64, on a
Llama (grouped-query attention) and a Gemma 3 (sliding window). The random directions of
``jvp`` and ``jvp_cv`` are drawn from the same seed on both sides, so they agree too."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from corrpo.gradients import ESTIMATORS, token_strengths  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny(family: str) -> torch.nn.Module:
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, initializer_range=0.3)  # fmt: skip
    if family == "llama":
        config = transformers.LlamaConfig(**common)
    else:  # a window shorter than the sequence, so that it matters
        config = transformers.Gemma3TextConfig(**common, sliding_window=6, query_pre_attn_scalar=8,
                                               layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()


def compare(family: str, estimator: str, device: str) -> None:
    """``estimator`` on ``device`` in float32 against the CPU in float64."""
    reference = tiny(family)
    model = tiny(family).to(device, torch.float32)
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    positions = [list(range(4, 20)), [3, 8, 13, 19]]
    k = {"subsample": 3, "jvp": 8, "jvp_cv": 8}.get(estimator)
    want = token_strengths(reference, ids, positions, estimator=estimator, k=k, seed=5)
    got = token_strengths(model, ids.to(device), positions, estimator=estimator, k=k, seed=5)
    np.testing.assert_array_equal(got.positions, want.positions)
    np.testing.assert_allclose(got.entropy_bits, want.entropy_bits, rtol=1e-5, atol=1e-6)
    assert got.measures == want.measures
    for name in want.measures:
        values = want.measure(name)
        assert np.ptp(values) > 0, f"{name}: the check needs values that vary"
        np.testing.assert_allclose(got.measure(name), values, rtol=2e-4, atol=1e-6 * np.abs(values).max(), err_msg=name)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_every_estimator_on_the_gpu_equals_float64_on_the_cpu(family, estimator):
    compare(family, estimator, "cuda")
