"""Each CPU example of examples/integrations runs as its docs say (one command, exit 0) and
prints its results: the examples are the recipes of docs/integrations.md run end to end, so
a stack's upgrade or a corrpo change that breaks one fails here. The values themselves are
checked against corrpo's in-process answers by tests/test_integrations_*.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

EXAMPLES = {
    # script: (the stack it needs, arguments, a line its output must have)
    "trl_grpo.py": ("trl", ["--steps", "1"], r"step 1: reward [+-]\d\.\d{3}  corrpo/rho_pooled [+-]\d\.\d{3}"),
    "verl_grpo.py": ("verl", [], r"advantages: [+-]\d\.\d{3}"),
    "slime_grpo.py": ("torch", [], r"advantage=[+-]\d+\.\d{3}"),
    "openrlhf_rm.py": ("fastapi", [], r"reward_func form: the same rewards"),
}


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs(script):
    stack, args, expected = EXAMPLES[script]
    pytest.importorskip(stack)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "integrations" / script), *args],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert re.search(expected, done.stdout), f"{script} did not print {expected!r}:\n{done.stdout[-3000:]}"
