"""Progress where nobody watches a terminal: corrpo.progress writes whole lines to a log or a
pipe (a tqdm bar there is a string of carriage-return records, and a bar refreshed while its
count stands still repeats its 100% line), and a bar on a terminal; corrpo-train's run as a
process whose stderr is a pipe."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from corrpo.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_in_a_log_come_at_milestones_and_at_the_end_once() -> None:
    log = io.StringIO()
    bar = Progress(10, desc="work", unit="step", stream=log, every_s=3600)
    bar.update(1)
    bar.update(1)
    assert log.getvalue() == ""  # no milestone, and the minute has not passed
    bar.update(1, status="loss 0.5", milestone=True)
    bar.goto(3)  # the same count again: nothing new to say
    bar.goto(10)
    bar.goto(10)
    bar.close()
    bar.close()
    assert log.getvalue() == "work: step 3/10 (30%), 0 s, loss 0.5\nwork: step 10/10 (100%), 0 s, loss 0.5\n"


def test_a_line_per_interval_when_the_count_moves_and_none_when_disabled() -> None:
    log = io.StringIO()
    with Progress(4, desc="scoring", unit="tok", stream=log, every_s=0.0, initial=1) as bar:
        bar.goto(1)  # a resumed start is not news
        for _ in range(3):
            bar.update(1)
            bar.goto(bar.n)
    assert [line.split(",")[0] for line in log.getvalue().splitlines()] == [
        "scoring: tok 2/4 (50%)", "scoring: tok 3/4 (75%)", "scoring: tok 4/4 (100%)"
    ]  # fmt: skip
    quiet = io.StringIO()
    with Progress(4, desc="scoring", unit="tok", stream=quiet, every_s=0.0, enabled=False) as bar:
        bar.update(4, milestone=True)
    assert quiet.getvalue() == ""


def test_a_terminal_gets_a_redrawn_bar() -> None:
    term = Terminal()
    with Progress(3, desc="work", unit="step", stream=term) as bar:
        bar.update(3, status="done")
    text = term.getvalue()
    assert "\r" in text and "3/3" in text and "done" in text  # tqdm's redraws


def test_a_training_run_logs_one_line_per_evaluation_to_a_pipe(server, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "run"
    flags = [
        "--model", "tiny", "--digits", "2", "--eval-size", "32", "--sft-steps", "12", "--rl-steps", "4", "--sft-batch", "16",
        "--prompts-per-step", "2", "--group-size", "4", "--eval-every", "6", "--threads", "1", "--server", server.target,
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "corrpo.train", "run", "--out", str(out), *flags],
        env={**os.environ, "RAYON_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "\r" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("corrpo-train: step ")]
    counts = [int(line.split()[2].split("/")[0]) for line in lines]
    # A line at each evaluation (SFT steps 6 and 12, the last RL step: global step 16), a
    # minute apart at most between them, never a count twice.
    assert counts == sorted(set(counts)) and {6, 12, 16} <= set(counts) and counts[-1] == 16
    assert lines[-1].startswith("corrpo-train: step 16/16 (100%), ")
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert lines[-1].endswith(f"| held-out {last['eval_accuracy']:.3f}")
