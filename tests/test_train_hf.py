"""corrpo-train's model as a Hugging Face Llama (python/corrpo/train/hf.py): a saved directory
loads through corrpo.models as a LlamaForCausalLM with the trainer's logits, its weights come
back bit for bit, its character tokenizer encodes as the task does, and a directory is
replaced whole even when a write is killed half way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from corrpo.models import load_model  # noqa: E402
from corrpo.train import hf  # noqa: E402
from corrpo.train.config import TrainConfig  # noqa: E402
from corrpo.train.loop import build_model, save_model  # noqa: E402
from corrpo.train.state import settle_dir, write_dir_atomic  # noqa: E402
from corrpo.train.task import AdditionTask, Problem  # noqa: E402

CFG = TrainConfig(model="tiny", digits=2, eval_size=4, seed=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A trainer model with weights far from its init (so the logits vary), saved as sft/."""
    torch.set_num_threads(1)
    model = build_model(CFG, AdditionTask(digits=2, eval_size=4))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    return save_model(model, CFG, tmp_path_factory.mktemp("hf") / "sft"), model.eval()


def test_saved_model_loads_as_a_llama_with_the_trainers_logits(trained) -> None:
    path, model = trained
    assert {"config.json", "model.safetensors", "tokenizer.json", hf.TRAINER_FILE} <= {p.name for p in path.iterdir()}
    loaded = load_model(path)
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.kind == "hf"
    tokens = torch.randint(0, model.cfg.vocab_size, (3, model.cfg.max_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens)[1]
        got = loaded.model(tokens).logits
        # float64 on both sides: what is left is the rotary tables, which both compute in float32.
        wide = build_model(CFG, AdditionTask(digits=2, eval_size=4)).double()
        wide.load_state_dict(model.state_dict())
        got64 = load_model(path, dtype="float64").model(tokens).logits
        expected64 = wide(tokens)[1]
    assert expected.abs().max() > 5  # logits that vary, not a flat init
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, expected64, rtol=1e-5, atol=1e-5)


def test_weights_and_settings_come_back_exactly(trained) -> None:
    path, model = trained
    back = hf.load_pretrained(path)
    assert back.cfg == model.cfg
    for (name, a), (other, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert name == other and torch.equal(a, b), name
    assert hf.read_trainer_file(path) == {"settings": CFG.training_identity()}
    # The two conversions are inverses, name for name.
    assert set(hf.transformer_state_dict(hf.llama_state_dict(model), model.cfg.n_layers)) == set(model.state_dict())


def test_the_saved_tokenizer_encodes_as_the_task(trained) -> None:
    tokenizer = load_model(trained[0]).tokenizer
    task = AdditionTask(digits=2, eval_size=4)
    for p in (Problem(7, 35), Problem(99, 1)):
        assert tokenizer(task.prompt(p))["input_ids"] == task.prompt_ids(p)
        assert tokenizer.decode(task.solution_ids(p), skip_special_tokens=True) == task.solution(p)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


def test_not_a_trainer_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"is not a corrpo-train model directory \\(no {hf.TRAINER_FILE}\\)"):
        hf.read_trainer_file(tmp_path)


def test_a_directory_is_replaced_whole_even_when_a_write_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint"

    def version(n: int):
        return lambda d: (d / "v").write_text(str(n))

    write_dir_atomic(path, version(1))
    write_dir_atomic(path, version(2))
    assert (path / "v").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]

    class Killed(Exception):
        pass

    def half(d: Path) -> None:
        (d / "v").write_text("half")
        raise Killed

    # Killed while writing: the old directory stands, the half-written one goes.
    with pytest.raises(Killed):
        write_dir_atomic(path, half)
    settle_dir(path)
    assert (path / "v").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    # Killed between moving the old one aside and renaming the new one: the new one is whole.
    (tmp_path / "checkpoint.new").mkdir()
    (tmp_path / "checkpoint.new" / "v").write_text("3")
    path.rename(tmp_path / "checkpoint.old")
    settle_dir(path)
    assert (path / "v").read_text() == "3" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_resume_metadata_and_optimizer_are_kept(tmp_path: Path) -> None:
    model = build_model(CFG, AdditionTask(digits=2, eval_size=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 4, dtype=torch.long))[1].sum().backward()
    optimizer.step()
    resume = {"phase": "rl", "step": 8, "metrics_lines": 38}
    hf.save_pretrained(model, tmp_path, CFG.training_identity(), resume=resume, optimizer=optimizer.state_dict())
    assert json.loads((tmp_path / hf.TRAINER_FILE).read_text()) == {"settings": CFG.training_identity(), **resume}
    state = torch.load(tmp_path / hf.OPTIMIZER_FILE)
    for a, b in zip(optimizer.state_dict()["state"].values(), state["state"].values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
