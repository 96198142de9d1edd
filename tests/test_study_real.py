"""examples/study/real_models.py (make study-real): the report's statistics against
independent references, the chat template it gives Gemma-3's base model, and the report
end to end on results written here. The runs themselves need the model packages and hours;
`make study-real` is their test."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("real_models", ROOT / "examples" / "study" / "real_models.py")
real_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(real_models)


@pytest.mark.parametrize(("k", "n"), [(0, 32), (1, 32), (7, 32), (16, 32), (32, 32), (3, 5)])
def test_wilson_matches_scipy(k, n):
    stats = pytest.importorskip("scipy.stats")
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert real_models.wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-6)


def _acc(correct: list[int]) -> dict:
    return {"per_problem": [{"id": f"p{i}", "correct": c} for i, c in enumerate(correct)]}


def test_paired_difference_and_counts():
    before = [1, 0, 0, 1, 0, 1, 0, 0, 1, 0]
    after = [1, 1, 0, 0, 1, 1, 1, 0, 1, 0]
    d = real_models.paired(_acc(before), _acc(after))
    assert d["diff"] == pytest.approx(np.mean(after) - np.mean(before))
    assert (d["only_a"], d["only_b"], d["n"]) == (1, 3, 10)
    assert -1 <= d["ci"][0] <= d["diff"] <= d["ci"][1] <= 1
    # Every problem gained: no resample can give another difference.
    assert real_models.paired(_acc([0] * 6), _acc([1] * 6))["ci"] == (1.0, 1.0)


def test_paired_refuses_other_problems():
    other = {"per_problem": [{"id": "q0", "correct": 1}]}
    with pytest.raises(SystemExit, match="same problems"):
        real_models.paired(_acc([1]), other)


def test_gemma_template_renders_gemma3_turns():
    jinja2 = pytest.importorskip("jinja2")

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = jinja2.Environment()
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(real_models.GEMMA3_TEMPLATE)
    conversation = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5\n#### 5\n"}]
    text = template.render(messages=conversation, bos_token="<bos>", add_generation_prompt=False)
    assert text == "<bos><start_of_turn>user\nWhat is 2 + 3?<end_of_turn>\n<start_of_turn>model\n2 + 3 = 5\n#### 5<end_of_turn>\n"
    prompt = template.render(messages=conversation[:1], bos_token="<bos>", add_generation_prompt=True)
    assert prompt == "<bos><start_of_turn>user\nWhat is 2 + 3?<end_of_turn>\n<start_of_turn>model\n"
    with pytest.raises(jinja2.TemplateError, match="no system role"):
        template.render(messages=[{"role": "system", "content": "x"}, *conversation], bos_token="<bos>")


def _metrics(rho: float) -> dict:
    key = "fingerprint/unique/nuclear_qkvo"
    return {key: rho, f"{key}/ci_low": rho - 0.1, f"{key}/ci_high": rho + 0.1, "fingerprint/n_ids": 40, "fingerprint/seconds": 3.0}


def test_report_tables_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    root = tmp_path / "runs"
    before, after = _acc([0, 0, 1, 0]), _acc([1, 0, 1, 1])
    for acc in (before, after):
        acc.update(n=4, correct=sum(r["correct"] for r in acc["per_problem"]), rate=np.mean([r["correct"] for r in acc["per_problem"]]))
    sft = {
        "phase": "sft", "model": "smollm2", "label": "SmolLM2-135M-Instruct", "seed": 0, "steps": 2, "tokens_seen": 2400,
        "train_seconds": 20.0, "step_seconds": {"n": 2, "median": 5.0, "total": 10.0, "cpu_median": 4.5},
        "accuracy": {"before": before, "after": after},
        "history": [
            {"step": 0, "num_input_tokens_seen": 0, "metrics": _metrics(0.05)},
            {"step": 2, "num_input_tokens_seen": 2400, "metrics": _metrics(-0.25)},
        ],
    }  # fmt: skip
    control = {"phase": "control", "model": "smollm2", "label": "SmolLM2-135M-Instruct, random init", "seed": 0,
               "used": "teacher_forced", "metrics": _metrics(-0.02)}  # fmt: skip
    for name, result in (("smollm2/sft-seed0", sft), ("smollm2/control", control)):
        (root / name).mkdir(parents=True)
        (root / name / "result.json").write_text(json.dumps(result))
    out_md = tmp_path / "report.md"
    real_models.main(["report", str(root), "--out-md", str(out_md), "--out-img", str(tmp_path / "img")])
    text = out_md.read_text()
    assert "| SmolLM2-135M-Instruct | SFT seed 0 | 0 | 0 | +0.050 [-0.05, +0.15] | 40 | base: +0.036 |" in text
    assert "| SmolLM2-135M-Instruct | SFT seed 0 | 2 | 2,400 | -0.250 [-0.35, -0.15] | 40 | after 200 SFT steps: -0.468" in text
    assert "| random init (seed 0, teacher-forced) | - | - | -0.020 [-0.12, +0.08] | 40 |" in text
    lo, hi = real_models.wilson(3, 4)
    assert f"3/4 = 0.750 [{lo:.3f}, {hi:.3f}]" in text
    assert "+0.500 [" in text and "(0 lost, 2 gained of 4)" in text
    assert (tmp_path / "img" / "sft-nuclear_qkvo.png").stat().st_size > 0
    assert not (tmp_path / "img" / "rl-nuclear_qkvo.png").exists()  # no RL runs, no RL plot
