"""`corrpo fingerprint` end to end on a tiny random Llama with a locally trained tokenizer
(no downloads): the files it writes, its statistics against scipy on its own tokens.csv,
tokens.csv against a direct token_strengths call, --responses, --compare, corrpo-train
checkpoints (Hugging Face directories; their conversion is tests/test_train_hf.py), and its
error exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
stats = pytest.importorskip("scipy.stats")

import corrpo  # noqa: E402
from corrpo.fingerprinting import read_tokens_csv  # noqa: E402
from corrpo.testing import build_tiny_model  # noqa: E402

MEASURES = ["l1_mean", "nuclear_qkvo", "frobenius", "logit_grad", "head_logit_grad"]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "corrpo.cli", "fingerprint", *args], capture_output=True, text=True, env=env, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fingerprint")
    build_tiny_model(root / "tiny")
    lines = [
        {"prompt": "what is two plus three ?"},
        {"prompt": "the cat sat", "id": "cat"},
        {"messages": [{"role": "user", "content": "a dog ran"}]},
        {"prompt": "one and one"},
    ]
    (root / "prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


@pytest.fixture(scope="module")
def generated(work: Path) -> Path:
    out = work / "gen"
    proc = cli(
        "--model", str(work / "tiny"), "--prompts", str(work / "prompts.jsonl"), "--generate", "2",
        "--temperature", "1", "--max-new-tokens", "14", "--threads", "1", "--bootstrap", "300",
        "--measures", *MEASURES, "--per-block-columns", "--no-progress", "--out", str(out),
    )  # fmt: skip
    assert "l1_mean" in proc.stdout  # the rich summary table
    return out


@pytest.fixture(scope="module")
def rescored(work: Path, generated: Path) -> Path:
    out = work / "rescored"
    cli(
        "--model", str(work / "tiny"), "--responses", str(generated / "responses.jsonl"), "--threads", "1",
        "--bootstrap", "300", "--measures", *MEASURES, "--no-progress", "--label", "again", "--out", str(out),
    )  # fmt: skip
    return out


def summary_of(d: Path) -> dict:
    return json.loads((d / "summary.json").read_text())


def assert_image(path: Path) -> None:
    import matplotlib.image

    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0  # not a blank canvas


def test_generate_writes_every_file(generated: Path) -> None:
    for name in ("responses.jsonl", "tokens.csv", "summary.json"):
        assert (generated / name).stat().st_size > 0
    for name in ("scatter.png", "per_block.png", "proxies.png"):
        assert_image(generated / name)
    responses = [json.loads(line) for line in (generated / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == 8  # 4 prompts x 2
    assert [r["prompt_index"] for r in responses] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert responses[2]["id"] == "cat"
    assert all(1 <= len(r["response_ids"]) <= 14 for r in responses)
    assert responses[0]["prompt"].startswith("<s> what is two plus three ? </s>")  # the chat template
    s = summary_of(generated)
    assert s["n_responses"] == 8
    assert s["n_tokens"] == sum(len(r["response_ids"]) for r in responses)
    assert s["settings"]["objective"] == "logit" and s["settings"]["estimator"] == "exact"
    assert sorted(s["statistics"]["measures"]) == sorted(MEASURES)
    assert s["statistics"]["proxies"]["reference"] == "l1_mean"
    assert len(s["statistics"]["per_block"]["block_names"]) == 2
    assert s["timing"]["wall_s"] > 0 and s["model"]["kind"] == "hf"


def test_summary_statistics_match_scipy_on_tokens_csv(generated: Path) -> None:
    s = summary_of(generated)
    t = read_tokens_csv(generated / "tokens.csv")
    h = t["entropy_bits"]
    for m in MEASURES:
        st = s["statistics"]["measures"][m]
        assert st["spearman"]["pooled"]["rho"] == pytest.approx(stats.spearmanr(h, t[m]).statistic, abs=1e-9)
        assert st["pearson"]["pooled"]["rho"] == pytest.approx(stats.pearsonr(h, t[m]).statistic, abs=1e-9)
        # Within responses: the mean of the defined per-response rho (>= 8 tokens).
        per = [
            stats.spearmanr(h[t["response"] == r], t[m][t["response"] == r]).statistic
            for r in np.unique(t["response"])
            if (t["response"] == r).sum() >= 8
        ]
        per = [x for x in per if np.isfinite(x)]
        assert st["spearman"]["within"]["n_defined"] == len(per)
        assert st["spearman"]["within"]["rho"] == pytest.approx(np.mean(per), abs=1e-9)
        # Over unique token ids: per-id means.
        ids = np.unique(t["token_id"])
        mh = [h[t["token_id"] == i].mean() for i in ids]
        ms = [t[m][t["token_id"] == i].mean() for i in ids]
        assert st["spearman"]["unique"]["n_ids"] == len(ids)
        assert st["spearman"]["unique"]["rho"] == pytest.approx(stats.spearmanr(mh, ms).statistic, abs=1e-9)
    proxies = s["statistics"]["proxies"]["spearman_vs_reference"]
    assert proxies["logit_grad"] == pytest.approx(stats.spearmanr(t["l1_mean"], t["logit_grad"]).statistic, abs=1e-9)
    # Per-block rho against the per-block columns.
    rho0 = s["statistics"]["per_block"]["l1_mean"][0]
    assert rho0 == pytest.approx(stats.spearmanr(h, t["l1_mean.block0"]).statistic, abs=1e-9)


def test_bootstrap_cis_contain_their_point_estimates(generated: Path) -> None:
    s = summary_of(generated)
    assert s["statistics"]["bootstrap"]["resamples"] == 300
    checked = 0
    for st in s["statistics"]["measures"].values():
        for method in ("spearman", "pearson"):
            for view in ("pooled", "within", "unique"):
                v = st[method][view]
                if v["rho"] is None:
                    continue
                lo, hi = v["ci"]
                assert -1 <= lo <= v["rho"] <= hi <= 1, (method, view, v)
                checked += 1
    assert checked >= 20


def test_tokens_csv_equals_a_direct_token_strengths_call(work: Path, generated: Path) -> None:
    from transformers import AutoModelForCausalLM

    from corrpo.gradients import token_strengths

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(work / "tiny", dtype=torch.float32).eval()
    t = read_tokens_csv(generated / "tokens.csv")
    responses = [json.loads(line) for line in (generated / "responses.jsonl").read_text().splitlines()]
    for i, r in enumerate(responses):
        ids = r["prompt_ids"] + r["response_ids"]
        start = len(r["prompt_ids"])
        out = token_strengths(model, torch.tensor(ids), list(range(start, len(ids))), measures=MEASURES)
        rows = t["response"] == i
        np.testing.assert_array_equal(t["position"][rows], out.positions)
        np.testing.assert_array_equal(t["token_id"][rows], r["response_ids"])
        np.testing.assert_allclose(t["entropy_bits"][rows], out.entropy_bits, rtol=1e-6)
        for m in MEASURES:
            np.testing.assert_allclose(t[m][rows], out.measure(m), rtol=1e-5, err_msg=m)
        np.testing.assert_allclose(t["l1_mean.block1"][rows], out.per_block["l1_mean"][:, 1], rtol=1e-5)


def test_responses_file_rescored_gives_the_same_tokens(generated: Path, rescored: Path) -> None:
    a, b = read_tokens_csv(generated / "tokens.csv"), read_tokens_csv(rescored / "tokens.csv")
    np.testing.assert_array_equal(a["token_id"], b["token_id"])
    for m in MEASURES:
        np.testing.assert_allclose(a[m], b[m], rtol=1e-5)
    s = summary_of(rescored)
    assert s["label"] == "again" and s["settings"]["source"] == "responses"


def test_responses_given_as_text_are_tokenized(work: Path, tmp_path: Path) -> None:
    """A response file with text only: the prompt goes through the chat template, the
    response is tokenized alone; a stride keeps every 2nd token."""
    import corrpo.fingerprinting as fp

    path = tmp_path / "texts.jsonl"
    path.write_text(json.dumps({"prompt": "the cat", "response": "sat on the mat </s>"}) + "\n")
    result = fp.run(
        work / "tiny", tmp_path / "out", responses=path, positions_stride=2, measures=["l1_mean", "logit_grad"],
        bootstrap=0, progress=False, print_table=False, threads=1,
    )  # fmt: skip
    (r,) = result.responses
    assert r.prompt_ids[:1] == [2] and len(r.response_ids) == 5
    assert list(result.scored.columns["response_position"]) == [0, 2, 4]
    assert result.summary["statistics"]["measures"]["l1_mean"]["spearman"]["pooled"]["ci"] is None  # one response


def test_compare_two_runs(work: Path, generated: Path, rescored: Path) -> None:
    out = work / "compare"
    cli("--compare", str(generated), str(rescored), "--out", str(out))
    assert_image(out / "compare.png")
    md = (out / "compare.md").read_text()
    assert "| tiny |" in md and "| again |" in md and "l1_mean" in md


def test_console_tables_fit_80_columns_without_breaking_a_ci(generated: Path, rescored: Path) -> None:
    """The summary and --compare tables rendered as a log gets them (80 columns): every CI
    of summary.json whole on one line, nothing cut short."""
    import io

    from rich.console import Console

    from corrpo.fingerprinting.pipeline import compare_table, load_run, print_summary

    summaries = [summary_of(generated), summary_of(rescored)]
    cis = {
        f"[{view['ci'][0]:+.2f},{view['ci'][1]:+.2f}]"
        for s in summaries
        for st in s["statistics"]["measures"].values()
        for view in st["spearman"].values()
        if view.get("ci")
    }
    assert len(cis) > 5
    console = Console(width=80, file=io.StringIO())
    for s in summaries:
        print_summary(s, console=console)
    console.print(compare_table([load_run(generated), load_run(rescored)]))
    text = console.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    assert all(text.count(ci) >= 2 for ci in cis)  # in its run's summary and in the comparison


# ---- corrpo-train checkpoints ----------------------------------------------------------------


def trainer_checkpoint(tmp_path: Path) -> tuple[Path, object]:
    """A trainer model saved as the trainer saves sft/ (a Hugging Face directory)."""
    from corrpo.train.config import TrainConfig
    from corrpo.train.loop import build_model, save_model
    from corrpo.train.task import AdditionTask

    cfg = TrainConfig(model="tiny", digits=2, eval_size=4, seed=3)
    model = build_model(cfg, AdditionTask(digits=2, eval_size=4))
    with torch.no_grad():  # larger weights than the init's, so the logits vary
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return save_model(model, cfg, tmp_path / "sft"), model.eval()


def test_train_checkpoint_random_init_is_seeded(tmp_path: Path) -> None:
    """--random-init of a trainer checkpoint: the same architecture, other (seeded) weights."""
    from corrpo.models import load_model

    path, trainer_model = trainer_checkpoint(tmp_path)
    tokens = torch.randint(0, trainer_model.cfg.vocab_size, (3, trainer_model.cfg.max_len))
    fresh = load_model(path, random_init=True, seed=1)
    again = load_model(path, random_init=True, seed=1)
    other = load_model(path, random_init=True, seed=2)
    with torch.no_grad():
        a, b, c = (m.model(tokens).logits for m in (fresh, again, other))
        trained = trainer_model(tokens)[1]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, trained)
    assert fresh.tokenizer is not None and type(fresh.model).__name__ == "LlamaForCausalLM"


def test_train_checkpoint_fingerprint_run(tmp_path: Path) -> None:
    import corrpo.fingerprinting as fp

    path, _ = trainer_checkpoint(tmp_path)
    prompts = tmp_path / "add.jsonl"
    prompts.write_text('{"prompt": "07+35="}\n{"prompt": "61+29="}\n')
    result = fp.run(
        path, tmp_path / "out", prompts=prompts, generate=2, temperature=1.0, max_new_tokens=12,
        measures=["l1_mean", "nuclear_qkvo", "logit_grad"], bootstrap=50, progress=False, print_table=False, threads=1,
    )  # fmt: skip
    assert len(result.responses) == 4 and result.summary["model"]["kind"] == "hf"
    assert result.summary["model"]["architecture"] == "LlamaForCausalLM"
    assert result.responses[0].prompt_ids[:3] == [1, 3, 10]  # BOS, '0', '7'
    assert (tmp_path / "out" / "tokens.csv").is_file()
    # A character outside the task's alphabet would encode as <pad>: refused, not scored.
    prompts.write_text('{"prompt": "07+35=?"}\n')
    with pytest.raises(corrpo.ConfigError, match=r"line 1: \['\?'\] are not in the tokenizer's vocabulary \(each would encode as its unknown token '<pad>'\)"):
        fp.run(path, tmp_path / "bad", prompts=prompts, progress=False, print_table=False, threads=1)


def test_a_model_without_a_tokenizer_is_refused_where_text_is_needed(tmp_path: Path) -> None:
    import corrpo.fingerprinting as fp
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "bare")  # fmt: skip
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    with pytest.raises(corrpo.ConfigError, match="corrpo fingerprint .* needs a tokenizer, and the model directory .*bare' has none"):
        fp.run(tmp_path / "bare", tmp_path / "out", prompts=prompts, progress=False, print_table=False)
    assert not (tmp_path / "out").exists()


# ---- errors ---------------------------------------------------------------------------------


def one_line_error(proc_or_text: subprocess.CompletedProcess | str) -> str:
    text = proc_or_text if isinstance(proc_or_text, str) else proc_or_text.stderr
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def test_missing_model_path_exits_2(work: Path, tmp_path: Path) -> None:
    proc = cli("--model", str(tmp_path / "nope"), "--prompts", str(work / "prompts.jsonl"), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2
    assert "does not exist" in one_line_error(proc)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"prompt": "a"}\n{"prompt": \n', "2: not valid JSON"),
        ('["a list"]\n', "must be a JSON object"),
        ('{"text": "a"}\n', "needs a string 'prompt'"),
        ("", "has no lines"),
    ],
)
def test_bad_prompts_exit_2(work: Path, tmp_path: Path, capsys, content: str, expected: str) -> None:
    from corrpo.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    assert main(["fingerprint", "--model", str(work / "tiny"), "--prompts", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert expected in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--objective", "loss"], "objective"),
        (["--estimator", "magic"], "estimator"),
        (["--measures", "l2"], "l2"),
        (["--dtype", "int8"], "dtype"),
        (["--positions-stride", "0"], "stride"),
    ],
)
def test_unknown_settings_exit_2(work: Path, generated: Path, tmp_path: Path, capsys, flags: list[str], expected: str) -> None:
    from corrpo.cli import main

    args = ["fingerprint", "--model", str(work / "tiny"), "--responses", str(generated / "responses.jsonl")]
    assert main([*args, "--no-progress", "--out", str(tmp_path / "o"), *flags]) == 2
    assert expected in one_line_error(capsys.readouterr().err)


def test_compare_of_a_directory_without_summary_exits_2(tmp_path: Path, capsys) -> None:
    from corrpo.cli import main

    assert main(["fingerprint", "--compare", str(tmp_path), "--out", str(tmp_path / "c")]) == 2
    assert "no summary.json" in one_line_error(capsys.readouterr().err)


def test_usage_errors_exit_2(work: Path, tmp_path: Path) -> None:
    from corrpo.cli import main

    with pytest.raises(SystemExit) as err:  # argparse: neither --prompts nor --responses
        main(["fingerprint", "--model", str(work / "tiny"), "--out", str(tmp_path)])
    assert err.value.code == 2
