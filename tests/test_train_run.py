"""corrpo-train end to end, as processes: runs against a real reward server process,
determinism, a kill and resume, and a two-rank DDP run under torchrun (gloo)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from corrpo.train.state import read_metrics

SFT, RL = 30, 40
TINY = [
    "--model", "tiny", "--digits", "2", "--eval-size", "64",
    "--sft-steps", str(SFT), "--rl-steps", str(RL), "--sft-batch", "32",
    "--prompts-per-step", "4", "--group-size", "4",
    "--eval-every", "10", "--checkpoint-every", "4", "--threads", "1", "--gate", "none",
]  # fmt: skip
ENV = {**os.environ, "RAYON_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def command(out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "corrpo.train", "run", "--out", str(out), "--no-progress", *TINY, *flags]


def train(out: Path, *flags: str) -> subprocess.CompletedProcess:
    done = subprocess.run(command(out, *flags), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def steady(records: list[dict]) -> list[dict]:
    """The records without wall-clock times."""
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "strength_s")} for r in records]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, server) -> Path:
    out = tmp_path_factory.mktemp("train") / "corrpo"
    train(out, "--server", server.target)
    return out


def test_run_writes_every_step_and_the_server_scored_each_rl_step(reference_run: Path, server) -> None:
    records = read_metrics(reference_run / "metrics.jsonl")
    assert [r["phase"] for r in records] == ["sft"] * SFT + ["rl"] * RL
    assert [r["step"] for r in records] == list(range(1, SFT + 1)) + list(range(1, RL + 1))
    assert [r["global_step"] for r in records] == list(range(1, SFT + RL + 1))
    for r in records:
        for key in ("phase", "step", "reward_mean", "accuracy", "loss"):
            assert key in r
        assert 0 <= r["accuracy"] <= 1 and r["loss"] is not None
    sft = [r for r in records if r["phase"] == "sft"]
    rl = [r for r in records if r["phase"] == "rl"]
    # Both measures: the paper's (S, of --strength) and the logit-space G.
    assert all(-1 <= r["rho_pooled_logit_grad"] <= 1 for r in sft + rl)
    assert all(r["rho_pooled"] is not None and -1 <= r["rho_pooled"] <= 1 for r in rl)
    evaluated = [r["step"] for r in sft if r.get("rho_pooled_samples") is not None]
    assert evaluated == [10, 20, 30]
    assert sorted(p.name for p in (reference_run / "strengths").iterdir()) == [
        "rl-00010.npz", "rl-00020.npz", "rl-00030.npz", "rl-00040.npz", "sft-00010.npz", "sft-00020.npz", "sft-00030.npz"
    ]  # fmt: skip
    # The server's figures and the verifier's agree: with gate "none",
    # mean(r - coef * rho) = mean(r) - coef * (mean defined rho) * (fraction defined).
    for r in rl:
        expected = r["reward_mean"] - 0.1 * (r["rho_rollout_mean"] or 0.0) * r["rho_defined"]
        assert r["reward_reg_mean"] == pytest.approx(expected, abs=1e-9)
    assert any(r["rho_defined"] > 0 for r in rl)
    # Every RL step went through the server as one Score request of P x G rollouts.
    config = json.loads((reference_run / "config.json").read_text())  # written at the end
    assert config["method"] == "corrpo"
    # Other runs of this module score on the same server (request ids corrpo-train/<run>/rl/<step>):
    # this run is the one with RL steps.
    runs: dict[str, list[dict]] = {}
    for e in server.events():
        if str(e.get("request_id", "")).startswith("corrpo-train/") and e["status"] == "OK":
            runs.setdefault(e["request_id"].split("/")[1], []).append(e)
    mine = [events for events in runs.values() if len(events) >= RL]
    assert len(mine) == 1, {run: len(events) for run, events in runs.items()}
    assert sorted(int(e["request_id"].rsplit("/", 1)[1]) for e in mine[0]) == list(range(1, RL + 1))
    assert all(e["rollouts"] == 16 for e in mine[0])
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["rl_steps"] == RL and summary["held_out_accuracy"] == records[-1]["eval_accuracy"]
    assert (reference_run / "training.png").stat().st_size > 10_000


def test_the_models_a_run_leaves_are_hugging_face_directories(reference_run: Path) -> None:
    """sft/ and checkpoint/ load through corrpo.models like any model (a Llama with the
    task's tokenizer); the checkpoint also holds what a resumed run needs, and no run leaves
    a half-written directory beside them."""
    from corrpo.models import load_model
    from corrpo.train.hf import OPTIMIZER_FILE, read_trainer_file

    config = json.loads((reference_run / "config.json").read_text())
    for name in ("sft", "checkpoint"):
        loaded = load_model(reference_run / name)
        assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.tokenizer("12+34=")["input_ids"][0] == 1
        assert all(config[k] == v for k, v in read_trainer_file(reference_run / name)["settings"].items())
    state = read_trainer_file(reference_run / "checkpoint")
    assert (state["phase"], state["step"], state["metrics_lines"]) == ("rl", RL, SFT + RL)
    assert (reference_run / "checkpoint" / OPTIMIZER_FILE).is_file() and not (reference_run / "sft" / OPTIMIZER_FILE).exists()
    assert not [p.name for p in reference_run.iterdir() if p.name.endswith((".new", ".old"))]


def test_sft_loss_falls(reference_run: Path) -> None:
    losses = [r["loss"] for r in read_metrics(reference_run / "metrics.jsonl") if r["phase"] == "sft"]
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5


def test_same_seed_same_metrics(reference_run: Path, server, tmp_path: Path) -> None:
    train(tmp_path / "again", "--server", server.target)
    assert steady(read_metrics(tmp_path / "again" / "metrics.jsonl")) == steady(read_metrics(reference_run / "metrics.jsonl"))
    train(tmp_path / "other", "--server", server.target, "--seed", "1", "--rl-steps", "1")
    first = read_metrics(tmp_path / "other" / "metrics.jsonl")[0]
    assert first["loss"] != read_metrics(reference_run / "metrics.jsonl")[0]["loss"]


def test_deterministic_runs_repeat_bit_for_bit(server, tmp_path: Path) -> None:
    """--deterministic with threads = 0: torch's deterministic algorithms and one thread per
    pool (not torch's default of one per core), and two runs give the same metrics, value for
    value, and the same per-token H, S and G, bit for bit."""
    short = ["--sft-steps", "12", "--rl-steps", "4", "--eval-every", "6", "--server", server.target]
    runs = [tmp_path / "first", tmp_path / "second"]
    for out in runs:
        train(out, *short, "--threads", "0", "--deterministic")
    first, second = (json.loads((out / "summary.json").read_text()) for out in runs)
    assert first["runtime"] == second["runtime"] == {"torch_threads": 1, "deterministic_algorithms": True}
    assert first["config"]["deterministic"] is True
    a, b = (read_metrics(out / "metrics.jsonl") for out in runs)
    assert len(a) == 16 and steady(a) == steady(b)
    names = sorted(p.name for p in (runs[0] / "strengths").iterdir())
    assert names == sorted(p.name for p in (runs[1] / "strengths").iterdir()) == ["rl-00004.npz", "sft-00006.npz", "sft-00012.npz"]
    for name in names:
        with np.load(runs[0] / "strengths" / name) as x, np.load(runs[1] / "strengths" / name) as y:
            assert sorted(x.files) == sorted(y.files)
            for key in x.files:
                assert x[key].tobytes() == y[key].tobytes(), (name, key)


def test_killed_run_resumes_where_it_stopped(reference_run: Path, tmp_path: Path) -> None:
    """Killed (SIGKILL) in the middle of RL, then started again with the same command: it
    picks up from the last checkpoint and ends with exactly the uninterrupted run's
    metrics. This run starts its own local server, which must not outlive the kill."""
    out = tmp_path / "killed"
    process = subprocess.Popen(command(out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= SFT + 10):
        assert process.poll() is None, process.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    written = len(metrics.read_text().splitlines())
    assert written < SFT + RL, "the run finished before it could be killed"
    # The local server got SIGTERM when its parent died, drained and stopped.
    deadline = time.monotonic() + 30
    while '"stopped"' not in (out / "server.log").read_text():
        assert time.monotonic() < deadline, "the run's local server outlived it"
        time.sleep(0.05)

    done = train(out)
    assert "resuming" in done.stderr
    assert steady(read_metrics(metrics)) == steady(read_metrics(reference_run / "metrics.jsonl"))
    # A finished run resumed again has nothing left to do, and changes nothing.
    train(out)
    assert steady(read_metrics(metrics)) == steady(read_metrics(reference_run / "metrics.jsonl"))


def test_changed_settings_do_not_resume(reference_run: Path, server) -> None:
    done = subprocess.run(
        command(reference_run, "--server", server.target, "--coef", "0.5"), env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "holds a run with other settings (coef)" in done.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--group-size", "1"], "group_size must be >= 2"),
        (["--method", "ppo"], "invalid choice"),
        (["--strength", "l2"], "invalid choice"),
        (["--strength", "exact", "--strength-k", "4"], "strength_k applies to the subsample and jvp strengths, not 'exact'"),
        (["--sync-every", "0"], "sync_every must be >= 1"),
        # No prefix matching: a misspelled flag is not taken for the one it begins.
        (["--rl-step", "5"], "unrecognized arguments: --rl-step 5"),
    ],
)
def test_bad_settings_are_refused(tmp_path: Path, flags: list[str], message: str) -> None:
    done = subprocess.run(command(tmp_path / "bad", *flags), env=ENV, capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('rl_steps = "24"\n', 'rl_steps must be an integer (e.g. rl_steps = 100), got \'24\' (a string)'),
        ('coef = "0.1"\n', "coef must be a number (e.g. coef = 0.1), got '0.1' (a string)"),
        ("server_model = 1\n", "server_model must be true or false (e.g. server_model = false), got 1 (an integer)"),
        ("digits = [3]\n", "digits must be an integer (e.g. digits = 4), got [3] (a TOML list)"),
        ("threads = 1.5\n", "threads must be an integer (e.g. threads = 0), got 1.5 (a number)"),
        ("rl_steps = \n", "not valid TOML: Invalid value (at line 1, column 12)"),
        ("rl_stpes = 3\n", "unknown settings ['rl_stpes']"),
    ],
)
@pytest.mark.parametrize("command", ["run", "study"])
def test_config_file_errors_are_one_line_before_anything_starts(tmp_path: Path, toml: str, message: str, command: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "corrpo.train", command, "--config", str(config), "--out", str(out)],
                          env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines()[0].startswith(f"corrpo-train: error: {config}: {message}")
    assert len(done.stderr.splitlines()) == 1 and not out.exists()  # no traceback, no server, nothing written


def test_missing_or_unreadable_config_files(tmp_path: Path) -> None:
    for config, message in ((tmp_path / "nope.toml", "no such config file (configs/ holds the shipped ones)"), (tmp_path, "cannot read the config file: Is a directory")):
        done = subprocess.run([sys.executable, "-m", "corrpo.train", "run", "--config", str(config), "--out", str(tmp_path / "out")],
                              env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 2 and done.stderr == f"corrpo-train: error: {config}: {message}\n"
    # An integer where a number is expected is the number.
    from corrpo.train import config as configuration

    (tmp_path / "ok.toml").write_text("coef = 1\nrl_steps = 7\n")
    cfg = configuration.load(tmp_path / "ok.toml", {"rl_steps": 9})
    assert (cfg.coef, type(cfg.coef), cfg.rl_steps) == (1.0, float, 9)


def test_threads_size_every_pool_of_the_trainer_and_its_server() -> None:
    """threads = N reaches torch (set before it is imported), the native core and the local
    server's environment; on a 2-core machine torch would otherwise take 2."""
    from corrpo.train.cli import THREAD_VARIABLES

    if not Path("/proc/self/environ").exists():
        pytest.skip("reads the server's environment from /proc")
    code = """
        import sys
        from corrpo.train.cli import THREAD_VARIABLES, _set_threads
        assert "torch" not in sys.modules
        _set_threads(1)
        import torch
        from corrpo_server import ServerProcess
        with ServerProcess() as server:
            environ = open(f"/proc/{server.process.pid}/environ").read().split("\\0")
        env = dict(v.split("=", 1) for v in environ if "=" in v)
        print(torch.get_num_threads(), *(env[k] for k in THREAD_VARIABLES))
        """
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["1"] * (1 + len(THREAD_VARIABLES))


def test_plot_gives_each_phase_its_own_axis_and_keeps_legends_off_the_curves(reference_run: Path) -> None:
    from corrpo.train import report

    records = read_metrics(reference_run / "metrics.jsonl")
    fig = report.run_figure(records)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    sft_acc, rl_acc, sft_rho, rl_rho = fig.axes[:4]
    for ax, steps in ((sft_acc, SFT), (sft_rho, SFT), (rl_acc, RL), (rl_rho, RL)):
        assert ax.get_xlim() == pytest.approx((0, steps * 1.02))
        # Below its panel, a legend hides no curve.
        assert ax.get_legend().get_window_extent(renderer).y1 < ax.get_window_extent(renderer).y0
    curves = {line.get_label(): line for line in rl_rho.get_lines()}
    s = curves["rho(H, S), rollouts (S of --strength)"]
    np.testing.assert_array_equal(s.get_xdata(), np.arange(1, RL + 1))
    np.testing.assert_allclose(s.get_ydata(), [r["rho_pooled"] for r in records if r["phase"] == "rl"])
    # The rho panels are pooled: their one horizontal line is 0, none for the paper's unique-id figures.
    for ax in (sft_rho, rl_rho):
        assert [list(line.get_ydata()) for line in ax.get_lines() if list(line.get_xdata()) == [0, 1]] == [[0, 0]]
    held = {line.get_label(): line for line in rl_acc.get_lines()}["held-out, greedy (step 0: after SFT)"]
    assert held.get_xdata()[0] == 0 and held.get_ydata()[0] == [r for r in records if r["phase"] == "sft"][-1]["eval_accuracy"]


def test_the_run_table_fits_80_columns(reference_run: Path) -> None:
    """Every figure of the run's table on one line with its value, in an 80-column log."""
    from rich.console import Console

    from corrpo.train import report

    summary = json.loads((reference_run / "summary.json").read_text())
    console = Console(width=80, file=io.StringIO())
    console.print(report.summary_table(summary, "corrpo-train: corrpo, seed 0"))
    lines = console.file.getvalue().splitlines()
    assert max(map(len, lines)) <= 80
    for label, key in report.SUMMARY_ROWS:
        value = "-" if summary[key] is None else f"{summary[key]:.3f}"
        assert sum(label in line and line.rstrip(" │").endswith(" " + value) for line in lines) == 1, (label, value)


def test_reading_says_what_rho_came_to_against_the_papers_sign(reference_run: Path) -> None:
    from corrpo.train import report

    summary = json.loads((reference_run / "summary.json").read_text())
    config = summary["config"]
    paper = ("This is a pooled rho of l1_mean; the paper's figures are another statistic (Spearman over unique token ids "
             "of the Q/K/V/O nuclear norm, Llama-8B: +0.036 base, -0.468 after 200 SFT steps on long reasoning traces, "
             "-0.606 after 8000, -0.649 after RL), so compare signs, not values")
    for rho, sign in ((0.62, "Positive: the tokens the model is unsure of have the larger gradient, the opposite of the paper's sign."),
                      (-0.41, "Negative: the sign of the paper's inversion.")):  # fmt: skip
        text = " ".join(report.reading({**summary, "rho_pooled_samples_sft_last": rho}, config).split())
        assert f"rho(H, S) on the model's own solutions: {rho:+.2f} at the end of SFT" in text
        assert f"{sign} {paper}" in text
        assert "the same seed trains another model on another CPU" in text
        assert f", {summary['rho_pooled_rl_last10']:+.2f} on the RL rollouts (last 10 steps)" in text
        after, end = summary["held_out_accuracy_after_sft"], summary["held_out_accuracy"]
        assert f"{after:.3f} after SFT, {end:.3f} after {RL} RL steps of corrpo" in text
    text = " ".join(report.reading(summary, {**config, "strength": "logit_grad"}).split())
    assert text.startswith("S is G here (--strength logit_grad)") and "rho(H, S) on" not in text


def test_two_rank_ddp_run_matches_one_process(reference_run: Path, server, tmp_path: Path) -> None:
    """torchrun --nproc_per_node=2 with gloo: each rank takes half of every batch, and
    since losses are normalized by the global token count and the randomness is drawn
    per prompt, the two ranks train the same model as one process does."""
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "corrpo.train"]
    flags = ["run", "--out", str(out), "--no-progress", *TINY, "--server", server.target]
    done = subprocess.run([*torchrun, *flags], env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ddp = read_metrics(out / "metrics.jsonl")
    single = read_metrics(reference_run / "metrics.jsonl")
    assert [r["step"] for r in ddp] == [r["step"] for r in single]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    sft = [(a["loss"], b["loss"]) for a, b in zip(ddp, single) if a["phase"] == "sft"]
    for a, b in sft:
        assert a == pytest.approx(b, rel=1e-4)
    # The same rollouts, so the same rewards, while float summation order keeps the
    # parameters within rounding of each other.
    rl = [(a, b) for a, b in zip(ddp, single) if a["phase"] == "rl"][:10]
    for a, b in rl:
        assert a["reward_mean"] == b["reward_mean"]
        assert a["rho_pooled"] == pytest.approx(b["rho_pooled"], abs=1e-3)


def test_study_compares_arms_from_one_sft_model_per_seed(server, tmp_path: Path) -> None:
    root = tmp_path / "study"
    flags = [*TINY, "--sft-steps", "12", "--rl-steps", "3", "--server", server.target]
    done = subprocess.run(
        [sys.executable, "-m", "corrpo.train", "study", "--out", str(root), "--seeds", "0", "1", "--jobs", "2",
         "--arms", "grpo", "corrpo", "gated:method=corrpo,gate=correct", *flags],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Its progress, in a pipe: whole lines, the last (2 seeds x (12 SFT + 3 arms x 3 RL steps)) once.
    assert "\r" not in done.stderr and done.stderr.count("corrpo-train study: step 42/42 (100%)") == 1, done.stderr[-3000:]
    study = json.loads((root / "study.json").read_text())
    assert [r["arm"] for r in study["results"]] == ["corrpo", "gated", "grpo"]
    assert all(r["seeds"] == [0, 1] for r in study["results"])
    assert study["arms"]["gated"] == {"method": "corrpo", "gate": "correct"}
    for seed in (0, 1):
        sft = read_metrics(root / f"seed{seed}" / "sft" / "metrics.jsonl")
        runs = {arm: read_metrics(root / f"seed{seed}" / arm / "metrics.jsonl") for arm in ("grpo", "corrpo", "gated")}
        for arm, records in runs.items():
            assert records[:12] == sft and len(records) == 15
            assert json.loads((root / f"seed{seed}" / arm / "config.json").read_text())["method"] == study["arms"][arm]["method"]
        # The arms start from the same model and draw the same noise, so their first RL
        # batch is the same rollouts: they differ in the regularizer alone.
        first = [records[12] for records in runs.values()]
        assert len({r["reward_mean"] for r in first}) == 1 and len({r["rho_pooled"] for r in first}) == 1
        grpo, corrpo = runs["grpo"][12], runs["corrpo"][12]
        assert grpo["reward_reg_mean"] == grpo["reward_mean"]
        assert corrpo["reward_reg_mean"] == pytest.approx(corrpo["reward_mean"] - 0.1 * corrpo["rho_rollout_mean"] * corrpo["rho_defined"])
        assert corrpo["reward_reg_mean"] != corrpo["reward_mean"]
    assert (root / "study.png").stat().st_size > 10_000
    assert "| grpo |" in (root / "results.md").read_text()
    # Its console table in 80 columns (as a log gets it): every mean ± std whole on one line.
    from rich.console import Console

    from corrpo.train import report

    console = Console(width=80, file=io.StringIO())
    console.print(report.study_console_table(study["results"]))
    text = console.file.getvalue()
    assert max(map(len, text.splitlines())) <= 80 and "…" not in text
    for r in study["results"]:
        assert f"{r['held_out_final_mean']:.3f} ± {r['held_out_final_std']:.3f}" in text
    # Each arm against GRPO, paired by seed, in the words under the table.
    rows = {r["arm"]: r for r in study["results"]}
    printed = " ".join(done.stdout.split())
    for arm in ("corrpo", "gated"):
        diffs = [100 * (a - b) for a, b in zip(rows[arm]["held_out_final"], rows["grpo"]["held_out_final"])]
        mean = rows[arm]["held_out_final_mean"]
        assert f"{arm} {mean:.3f} ({np.mean(diffs):+.1f} points against grpo; per seed {diffs[0]:+.1f}, {diffs[1]:+.1f})" in printed
    redraw = subprocess.run([sys.executable, "-m", "corrpo.train", "plot", str(root)], env=ENV, capture_output=True, text=True)
    assert redraw.returncode == 0 and "study.png" in redraw.stdout


def test_arm_specs() -> None:
    from corrpo.train.cli import parse_arm

    assert parse_arm("grpo") == ("grpo", {"method": "grpo"})
    assert parse_arm("c2:method=corrpo,coef=0.2,gate=correct") == ("c2", {"method": "corrpo", "coef": 0.2, "gate": "correct"})
    with pytest.raises(ValueError, match="needs method"):
        parse_arm("mine:coef=0.2")
    with pytest.raises(ValueError, match="not setting=value"):
        parse_arm("corrpo:colour=red")
    # Bool settings read true/false, and become --flag / --no-flag on the arm's command line;
    # an arm on a model-backed server gets its own (a shared one would be reloaded by every run).
    from corrpo.train import config as configuration
    from corrpo.train.cli import _flags

    name, settings = parse_arm("served:method=corrpo,strength=exact,server_model=true")
    assert settings == {"method": "corrpo", "strength": "exact", "server_model": True}
    flags = _flags(settings)
    assert flags == ["--method", "corrpo", "--strength", "exact", "--server-model", "--server", ""]
    import argparse

    parser = argparse.ArgumentParser()
    configuration.add_flags(parser)
    overrides = configuration.overrides(parser.parse_args(flags))
    assert (overrides["server_model"], overrides["server"], overrides["strength"]) == (True, "", "exact")
    assert configuration.overrides(parser.parse_args(["--no-server-model"]))["server_model"] is False
    with pytest.raises(ValueError, match="server_model must be true or false"):
        parse_arm("x:method=corrpo,server_model=yes")


def _brute_force_l1_mean(model, prompt: list[int], response: list[int]) -> list[float]:
    """The paper's measure with plain autograd on the trainer's own model: per response
    token, backward from its target logit, then the mean over blocks of the L1 norm of the
    block's gradient."""
    ids = torch.tensor([prompt + response])
    out = []
    for t in range(len(prompt), len(prompt) + len(response)):
        model.zero_grad(set_to_none=True)
        _, logits = model(ids[:, : t + 1])
        logits[0, t - 1, ids[0, t]].backward()
        out.append(float(np.mean([sum(p.grad.abs().sum().item() for p in b.parameters()) for b in model.blocks])))
    return out


def test_exact_strength_in_process_and_on_a_model_backed_server(tmp_path: Path) -> None:
    """--strength exact computes the paper's measure in the trainer; --server-model sends token
    ids to a local model-backed server it syncs every step. Same rollouts, same numbers; and
    the SFT figures equal plain autograd on the trainer's own model."""
    flags = ["--sft-steps", "10", "--rl-steps", "3", "--eval-every", "10", "--strength", "exact", "--device", "cpu"]
    train(tmp_path / "inproc", *flags)
    train(tmp_path / "served", *flags, "--server-model")
    a = read_metrics(tmp_path / "inproc" / "metrics.jsonl")
    b = read_metrics(tmp_path / "served" / "metrics.jsonl")
    for x, y in zip(a, b):
        assert x["reward_mean"] == y["reward_mean"] and x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        for key in ("rho_pooled", "rho_rollout_mean", "rho_pooled_logit_grad", "rho_pooled_samples"):
            if x.get(key) is not None:
                assert x[key] == pytest.approx(y[key], abs=2e-3), key
    rl = [r for r in b if r["phase"] == "rl"]
    assert all(r["rho_pooled"] != r["rho_pooled_logit_grad"] for r in rl)
    events = [json.loads(line) for line in (tmp_path / "served" / "server.log").read_text().splitlines() if line.startswith("{")]
    reloads = [e for e in events if e.get("event") == "weights_reloaded"]
    assert len(reloads) == 3 and reloads[-1]["weights_version"].endswith("/rl/3")
    tokens = [e for e in events if e.get("rpc") == "Score" and e.get("status") == "OK"]
    assert len(tokens) == 3
    # The SFT evaluation's exact strengths against plain autograd, token by token.
    from corrpo.train.hf import load_pretrained

    model = load_pretrained(tmp_path / "inproc" / "sft")
    saved = np.load(tmp_path / "inproc" / "strengths" / "sft-00010.npz")
    ends = np.cumsum(saved["lengths"])
    for row in range(2):
        start = ends[row] - saved["lengths"][row]
        response = saved["token_ids"][start : ends[row]].tolist()
        want = _brute_force_l1_mean(model, saved["prompts"][row].tolist(), response)
        np.testing.assert_allclose(saved["strength"][start : ends[row]], want, rtol=1e-4)
