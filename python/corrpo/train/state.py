"""What a run leaves in its output directory, and how a killed run picks up from it.

    OUT/config.json       the settings
    OUT/metrics.jsonl     one JSON object per step
    OUT/checkpoint/       the latest checkpoint (every ``checkpoint_every`` steps and at
                          each phase's end): a Hugging Face model directory (``hf.py``)
                          with what a resumed run needs beside it, written to a temporary
                          directory and renamed, so a kill never leaves half of one
    OUT/sft/              the model at the end of SFT (a Hugging Face model directory):
                          RL's KL reference, and where a study's methods start from
                          (``init_from``)
    OUT/summary.json      the final figures
    OUT/training.png      accuracy, reward and pooled rho over SFT and RL
    OUT/server.log        the local reward server's request log, when the run started one
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    """JSON has no NaN: undefined figures are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends one JSON line per step; ``truncate`` drops what a killed run wrote after its
    last checkpoint, so a resumed run never repeats a step."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> int:
        if not self.path.exists():
            return 0
        with open(self.path, "rb") as f:
            return sum(1 for _ in f)

    def truncate(self, keep: int) -> None:
        kept = self.read()[:keep] if self.path.exists() else []
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _aside(path: Path, what: str) -> Path:
    return path.with_name(f"{path.name}.{what}")


def write_dir_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Replaces the directory ``path`` by what ``write`` puts into an empty directory. A
    directory cannot be renamed over another, so the old one is moved aside first; a kill
    at any moment leaves a whole directory that ``settle_dir`` puts back at ``path``."""
    new, old = _aside(path, "new"), _aside(path, "old")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    write(new)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def settle_dir(path: Path) -> None:
    """After a kill inside ``write_dir_atomic``: with ``path`` gone, ``.old`` only exists once
    ``.new`` was whole (it is moved aside after the write), so ``.new`` takes its place;
    otherwise ``.new`` may be half written and goes."""
    new, old = _aside(path, "new"), _aside(path, "old")
    if not path.exists() and old.exists():
        os.replace(new if new.exists() else old, path)
    shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_clean) + "\n")
    os.replace(tmp, path)
