"""``make gpu-check`` (bench/gpu_check.py) where no GPU is: the one-line exit, the step time
limits, the test list, the results tables; and bench/bench_gpu_strengths.py's smoke run (its
FLOP count against torch's own counter, its rows)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check")
strengths = _load("bench_gpu_strengths")


def test_without_a_cuda_device_it_says_so_in_one_line_and_exits_0(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
        timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines() == [
        "gpu-check: no CUDA device here (torch.cuda.is_available() is False): nothing to check"
    ]
    assert not out.exists()


def _state(pid: int) -> str | None:
    """The process's state letter (Z: a zombie, dead but not reaped), None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def test_a_step_past_its_limit_is_stopped_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    # The step starts a child that would outlive it, then hangs.
    script = (
        "import subprocess, sys, time, pathlib; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"pathlib.Path({str(pid_file)!r}).write_text(str(child.pid)); print('started', flush=True); time.sleep(120)"
    )
    log = tmp_path / "log"
    start = time.monotonic()
    step = gpu_check.run_step("hang", [sys.executable, "-c", script], 3.0, log)
    assert step.status == "stopped at its limit" and step.limit == 3.0
    assert 3.0 <= step.seconds < 15 and time.monotonic() - start < 15
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _state(child) not in (None, "Z") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _state(child) in (None, "Z"), "the step's child was left running"
    assert "===== hang:" in log.read_text() and "started" in log.read_text()

    assert gpu_check.run_step("fails", [sys.executable, "-c", "raise SystemExit(3)"], 30, log).status == "failed (exit 3)"
    passes = gpu_check.run_step("passes", [sys.executable, "-c", "print('fine')"], 30, log)
    assert passes.status == "ok" and passes.seconds < 30


def test_junit_counts_of_a_real_pytest_run(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_passes(): assert 1 + 1 == 2\n"
        "def test_fails(): assert 1 + 1 == 3\n"
        "@pytest.mark.skip(reason='no')\n"
        "def test_skipped(): pass\n"
        "@pytest.fixture\n"
        "def broken(): raise RuntimeError('fixture')\n"
        "def test_errors(broken): pass\n"
    )
    xml = tmp_path / "out.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", "test_sample.py"],
                   cwd=tmp_path, capture_output=True, timeout=120)  # fmt: skip
    counts = gpu_check.junit_counts(xml)
    assert {k: counts[k] for k in ("tests", "passed", "failures", "errors", "skipped")} == {
        "tests": 4, "passed": 1, "failures": 1, "errors": 1, "skipped": 1,
    }  # fmt: skip
    assert sorted(counts["failed"]) == ["test_sample::test_errors", "test_sample::test_fails"]
    assert gpu_check.junit_counts(tmp_path / "missing.xml") is None


def test_the_cuda_tests_exist_and_every_test_file_that_asks_for_cuda_is_placed():
    for test in gpu_check.CUDA_TESTS:
        path, _, name = test.partition("::")
        source = (ROOT / path).read_text()
        assert not name or re.search(rf"^def {name}\(", source, re.M), f"{test} does not exist"
    listed = {t.partition("::")[0] for t in gpu_check.CUDA_TESTS} | set(gpu_check.NOT_CUDA_TESTS)
    asking = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py") if "cuda" in p.read_text()}
    assert asking <= listed, f"test files that use CUDA but are in neither list: {sorted(asking - listed)}"


def test_the_flop_count_equals_torchs_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(strengths.smollm2_config(**strengths.SMOKE), dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 24))

    def step():
        model(ids).logits.float().square().mean().backward()

    ours = strengths.FlopCount()
    with ours:
        step()
    with FlopCounterMode(display=False) as theirs:
        step()
    assert ours.total > 0 and ours.total == theirs.get_total_flops()


def _bench_gpu_results() -> dict:
    """bench_gpu.py's JSON for a 2 GB logits case whose rates are round numbers."""
    path = lambda ms, peak=None: {"seconds": ms / 1e3, "peak_bytes": peak}  # noqa: E731
    return {
        "device": "NVIDIA H100 80GB HBM3",
        "logits": {"rows": 8192, "vocab": 151936, "bytes": 2e9, "paths": {
            "corrpo token_stats": path(1.0, 3 * 2**20), "device copy": path(1.6), "torch eager": path(12.0),
            "liger fused_selective_log_softmax": path(0.9),
        }},
        "fused": {"rows": 8192, "dim": 4096, "vocab": 151936, "flops": 4e13, "paths": {
            "corrpo token_stats_from_hidden": path(80.0), "cuBLAS h @ W^T alone": path(50.0),
        }},
        "shapes": [{"rows": 1024, "vocab": 32000, "dtype": "float16", "gb": 0.0655, "seconds": 5e-5, "gbs": 1310.0,
                    "copy_seconds": 4e-5, "copy_gbs": 3276.0, "share": 0.4}],
        "sweep": {"logits": [{"config": {"BLOCK_V": b}, "seconds": s, "rate": 2 / s} for b, s in ((1024, 2e-3), (4096, 1e-3))],
                  "fused": []},
    }  # fmt: skip


def test_the_kernel_tables_carry_the_rates_and_bars():
    text = "\n".join(gpu_check.kernel_sections(_bench_gpu_results(), "ok"))
    # 2 GB read in 1 ms: 2,000 GB/s; the copy moves 4 GB in 1.6 ms: 2,500 GB/s; 80% of it.
    assert "| corrpo token_stats | 1.000 | 2,000 | 3 | 1.00x |" in text
    assert "| device copy | 1.600 | 2,500 (r+w) | - | 1.60x |" in text
    assert "**80%** of the device copy bandwidth (2,500 GB/s): bar 85% MISSED" in text
    assert "**12.0x** torch eager: bar 10x met" in text
    assert "0.90x Liger's single-pass logprob kernel: bar >= 1x MISSED" in text
    # 4e13 FLOPs in 80 ms: 500 TFLOP/s.
    assert "| corrpo token_stats_from_hidden | 80.000 | 500 | - | 1.00x |" in text
    assert "| 1024 | 32000 | float16 | 0.050 | 1,310 | 3,276 | 40% |" in text
    fastest = text.index('`{"BLOCK_V": 4096}`')
    assert fastest < text.index('`{"BLOCK_V": 1024}`'), "the sweep lists the fastest config first"
    assert "Not measured: step bench-gpu stopped at its limit." in "\n".join(
        gpu_check.kernel_sections(None, "stopped at its limit")
    )


def test_the_kernel_tables_of_a_real_bench_gpu_json(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "bench/bench_gpu.py", "--smoke", "--no-compile", "--json", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    bench = json.loads(out.read_text())
    logits = bench["logits"]
    ours = logits["paths"]["corrpo token_stats"]["seconds"]
    text = "\n".join(gpu_check.kernel_sections(bench, "ok"))
    assert f"| corrpo token_stats | {ours * 1e3:.3f} | {logits['bytes'] / 1e9 / ours:,.0f} | - | 1.00x |" in text
    assert f"T={bench['fused']['rows']}, d={bench['fused']['dim']}" in text


def test_a_smoke_run_of_the_strengths_bench_and_its_table(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    smoke = ["--smoke", "--models", "smollm2", "--lengths", "64", "--exact-tokens", "8"]
    # Time enough for every cap, whatever the machine's load.
    strengths.main([*smoke, "--estimators", "exact", "subsample", "logit_grad", "--cell-seconds", "600", "--jsonl", str(jsonl)])
    rows = gpu_check.read_jsonl(jsonl)
    ceiling, model, *cells = rows
    assert ceiling["kind"] == "ceiling" and ceiling["tflops"] > 0
    assert model["kind"] == "model" and "random init" in model["weights"] and model["layers"] == 2
    # The unit, then the estimators in the order asked for.
    assert [(c["length"], c["label"]) for c in cells] == [(64, label) for label in ("fwd+bwd", "exact", "subsample", "logit_grad")]
    assert all("error" not in c and c["seconds"] > 0 and c["flops"] > 0 for c in cells)
    # exact and subsample score at most their cap (8 tokens, k = 16), after a probe on 2.
    tokens = {c["label"]: c["tokens"] for c in cells}
    assert tokens == {"fwd+bwd": 32, "exact": 8, "subsample": 16, "logit_grad": 32}
    assert [c["label"] for c in cells if "probe_seconds" in c] == ["exact", "subsample"]

    text = "\n".join(gpu_check.strength_sections(rows, "ok"))
    fb = next(c for c in cells if c["length"] == 64 and c["label"] == "fwd+bwd")
    exact = next(c for c in cells if c["length"] == 64 and c["label"] == "exact")
    tflops = exact["flops"] / exact["seconds"] / 1e12
    want = (f"| SmolLM2-135M (smoke) | 64 | exact | 8 | {exact['seconds'] * 1e3:,.1f} | {8 / exact['seconds']:,.0f} | "
            f"{exact['seconds'] / fb['seconds']:,.1f} | {tflops:,.1f} | {tflops / ceiling['tflops']:.1%} | - |")  # fmt: skip
    assert want in text
    # No time at all: the probe's 2 tokens.
    strengths.main([*smoke, "--estimators", "exact", "subsample", "--cell-seconds", "1e-9", "--jsonl", str(tmp_path / "short.jsonl")])
    assert [c["tokens"] for c in gpu_check.read_jsonl(tmp_path / "short.jsonl")[3:]] == [2, 2]
    # A row that failed keeps its place, with the error.
    failed = dict(exact, label="jvp", error="OutOfMemoryError: CUDA out of memory")
    text = "\n".join(gpu_check.strength_sections([*rows, failed], "ok"))
    assert "| SmolLM2-135M (smoke) | 64 | jvp | - | - | - | - | - | - | - | OutOfMemoryError: CUDA out of memory |" in text


def test_the_results_file_names_the_card_and_every_step(tmp_path):
    steps = [vars(gpu_check.Step("cuda-tests", "ok", 61.2, 100)), vars(gpu_check.Step("bench-gpu", "stopped at its limit", 150.0, 150)),
             vars(gpu_check.Step("strengths", "ok", 80.4, 170)), vars(gpu_check.Step("sglang", "skipped: no SGLang", 0, 0))]  # fmt: skip
    results = {
        "started": "2026-12-06 08:00 UTC", "budget": 470.0, "seconds": 300.0, "steps": steps,
        "machine": {"card": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "cuda": "13.0", "triton": "3.6.0",
                    "transformers": "5.17.0", "python": "3.12.3", "nvidia_smi": {
                        "name": "NVIDIA H100 80GB HBM3", "driver_version": "580.159.04", "memory.total": "81559 MiB",
                        "clocks.max.sm": "1980 MHz", "power.limit": "700.00 W"}},
        "cuda_tests": {"tests": 90, "passed": 88, "failures": 1, "errors": 0, "skipped": 1, "failed": ["tests.test_x::test_y"]},
        "bench_gpu": _bench_gpu_results(), "strengths": [], "sglang": None,
    }  # fmt: skip
    text = gpu_check.render(results)
    assert text.startswith("# GPU check: NVIDIA H100 80GB HBM3\n")
    assert "nvidia-smi: NVIDIA H100 80GB HBM3, driver 580.159.04, 81559 MiB" in text
    assert "| bench-gpu | stopped at its limit | 150 | 150 |" in text
    assert "88 passed, 1 failed, 0 errors, 1 skipped, of 90" in text and "- failed: `tests.test_x::test_y`" in text
    assert "Not measured: step strengths ok." in text
    assert "Step sglang skipped: no SGLang." in text
    json.dumps(results)  # what gpu-check.json holds
    # Written after each step: the steps to come are said to be still ahead.
    early = gpu_check.render({**results, "steps": steps[:1], "bench_gpu": None})
    assert "Not measured: step bench-gpu has not run yet." in early and "Step sglang has not run yet." in early


def _gguf_metadata(path: Path) -> dict:
    """A GGUF file's key-value header (GGUF v2/v3), arrays as their length: enough of the
    format to read a model's shape without gguf.GGUFReader's parse of every token string."""
    import mmap
    import struct

    scalars = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        assert buf[:4] == b"GGUF", f"{path} is not a GGUF file"
        _, _, count = struct.unpack_from("<IQQ", buf, 4)
        at = 24

        def take(fmt: str):
            nonlocal at
            (value,) = struct.unpack_from("<" + fmt, buf, at)
            at += struct.calcsize("<" + fmt)
            return value

        def string() -> str:
            nonlocal at
            n = take("Q")
            at += n
            return bytes(buf[at - n : at]).decode()

        meta = {}
        for _ in range(count):
            key, kind = string(), take("I")
            if kind == 8:
                meta[key] = string()
            elif kind == 9:
                inner, n = take("I"), take("Q")
                if inner == 8:
                    for _ in range(n):
                        string()
                else:
                    at += n * struct.calcsize("<" + scalars[inner])
                meta[key] = n
            else:
                meta[key] = take(scalars[kind])
    return meta


@pytest.mark.parametrize("name", ["smollm2", "gemma3-270m"])
def test_the_configs_are_the_real_models(name):
    from corrpo.models import PACKAGES, package_model

    if not all(importlib.util.find_spec(m) for m in PACKAGES[name].modules):
        pytest.skip(f"needs the model package: {PACKAGES[name].install}")
    meta = _gguf_metadata(package_model(name))
    arch = meta["general.architecture"]
    cfg = strengths.CONFIGS[name][1]()
    got = {
        "num_hidden_layers": "block_count", "hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
        "num_attention_heads": "attention.head_count", "num_key_value_heads": "attention.head_count_kv",
        "max_position_embeddings": "context_length",
    }  # fmt: skip
    assert {a: getattr(cfg, a) for a in got} == {a: meta[f"{arch}.{k}"] for a, k in got.items()}
    assert cfg.vocab_size == meta["tokenizer.ggml.tokens"]
    if arch == "gemma3":
        assert (cfg.head_dim, cfg.sliding_window) == (meta["gemma3.attention.key_length"], meta["gemma3.attention.sliding_window"])
        # Every sixth layer attends to the whole context (as transformers reads the GGUF).
        assert [t == "full_attention" for t in cfg.layer_types] == [(i + 1) % 6 == 0 for i in range(cfg.num_hidden_layers)]
    else:
        assert cfg.head_dim == meta["llama.rope.dimension_count"]
