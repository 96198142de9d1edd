"""``make gpu-check``: everything a lent GPU should run, in one command, in under 8 minutes.

    python bench/gpu_check.py [--out DIR] [--budget 470]
    python bench/gpu_check.py --smoke     # on the CPU: checks the script, its numbers mean nothing

Steps, each in its own process with its own time limit (a step past its limit is killed with
its children, and the next one starts), within the whole run's budget:
1. cuda-tests: pytest of the tests that run differently on a CUDA device (``CUDA_TESTS``):
   the Triton kernels compiled for the card, not through the CPU interpreter; every
   ``token_strengths`` estimator on the GPU against float64 on the CPU.
2. bench-gpu: ``bench/bench_gpu.py --sweep --no-compile`` (the kernels against the device
   copy bandwidth, torch eager and Liger-Kernel; launch configs; rows x vocab x dtype). The
   torch.compile peers are left to ``make bench-gpu``: compiling them can take minutes.
3. strengths: ``bench/bench_gpu_strengths.py`` (tokens/s of every ``token_strengths``
   estimator on SmolLM2-135M and Gemma-3-270M in bf16 at 1k and 4k tokens, one training
   forward+backward as the unit, the share of the card's bf16 matmul rate).
4. sglang: tests/test_integrations_sglang_engine.py on the GPU (SGLang's engine with
   corrpo's plugin, no stub), where SGLang is installed; else the reason it was skipped.

Writes ``gpu-check.md`` (tables to paste into docs/benchmarks.md, headed with the card's
name), ``gpu-check.json`` (every number) and ``gpu-check.log`` (each step's output) into
--out: $OUT where that is set (the device tool's output folder), else runs/gpu-check. On a
machine without a CUDA device it says so in one line and exits 0. docs/benchmarks.md ("When
a GPU is lent") gives the device tool's command.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: The tests whose code path changes on a CUDA device: every test of the Triton kernels (on
#: a GPU they compile for it), corrpo.gradients' estimators on the GPU against float64 on the
#: CPU, the server's Triton backend and device tensors, the SGLang plugin's kernel reduction,
#: the model loader's device placement. tests/test_gpu_check.py checks that each exists, and
#: that every test file that asks for CUDA is here or in NOT_CUDA_TESTS.
CUDA_TESTS = (
    "tests/test_triton_kernels.py",
    "tests/test_gradients_cuda.py",
    "tests/test_server_scores.py::test_triton_backend_reduces_streamed_and_unary_logits",
    "tests/test_server_scores.py::test_client_reduces_device_tensors_where_they_are",
    "tests/test_integrations_sglang.py::test_the_plugins_reductions_equal_float64",
    "tests/test_models.py::test_dtype_and_device",
    "tests/test_models.py::test_device_map_places_the_model",
)
#: Test files that mention CUDA but need nothing from a GPU here, and why.
NOT_CUDA_TESTS = {
    "tests/test_server_ops.py": "its CUDA branch checks the error a CPU-only machine gives",
    "tests/test_integrations_sglang_engine.py": "step sglang runs it, in SGLang's own environment",
    "tests/test_gpu_check.py": "this script's own tests",
}

#: Seconds each step may run (8 minutes in all, with room for the interpreter starts).
LIMITS = {"cuda-tests": 110, "bench-gpu": 110, "strengths": 210, "sglang": 40}


@dataclass
class Step:
    name: str
    status: str  # ok | failed (exit N) | stopped at its limit | skipped: why
    seconds: float
    limit: float


def run_step(name: str, argv: list[str], limit: float, log: Path) -> Step:
    """Runs ``argv`` from the repository root with its output appended to ``log``; past
    ``limit`` seconds its whole process group (its children too) is killed."""
    start = time.monotonic()
    with open(log, "a") as out:
        out.write(f"\n===== {name}: {' '.join(argv)} (limit {limit:.0f} s)\n")
        out.flush()
        process = subprocess.Popen(
            argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            code = process.wait(timeout=limit)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = "stopped at its limit"
    step = Step(name, status, time.monotonic() - start, limit)
    print(f"gpu-check: {name}: {status} after {step.seconds:.0f} s (limit {limit:.0f} s)", flush=True)
    return step


def junit_counts(path: Path) -> dict[str, Any] | None:
    """Totals of a pytest --junitxml file, and the ids of the tests that failed."""
    if not path.exists():
        return None
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for suite in ET.parse(path).getroot().iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed}


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a step killed mid-write
            break
    return rows


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def machine(smoke: bool) -> dict[str, Any]:
    """The card as torch and nvidia-smi name it, and the software that ran on it."""
    import torch
    import triton
    import transformers

    info: dict[str, Any] = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "card": "CPU (smoke run)" if smoke else torch.cuda.get_device_name(0), "nvidia_smi": None,
    }  # fmt: skip
    query = "name,driver_version,memory.total,clocks.max.sm,power.limit"
    try:
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)  # fmt: skip
        if smi.returncode == 0:
            info["nvidia_smi"] = dict(zip(query.split(","), (v.strip() for v in smi.stdout.splitlines()[0].split(","))))
    except (OSError, subprocess.TimeoutExpired, IndexError):
        pass
    return info


def sglang_python() -> tuple[str | None, str]:
    """The interpreter that has SGLang (``.venv-sglang`` of ``make test-integrations``, else
    this one), or None and why there is none."""
    venv = ROOT / ".venv-sglang" / "bin" / "python"
    if venv.exists():
        return str(venv), ""
    if importlib.util.find_spec("sglang") is not None:
        return sys.executable, ""
    return None, (
        f"SGLang is not installed here (no .venv-sglang, no sglang module for {sys.executable}); the device "
        "tool's machine has no network to install it, and SGLang with its dependencies (about 9.7 GB) cannot "
        "travel in the 64 MiB a call carries"
    )


# ---- the results file ------------------------------------------------------------------


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(header: list[str], rows: list[list[str]], right: int = 1) -> list[str]:
    """A markdown table; columns from ``right`` on are right-aligned."""
    align = ["---" if i < right else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |", *("| " + " | ".join(r) + " |" for r in rows)]


def kernel_sections(bench: dict | None, status: str) -> list[str]:
    out = ["## Kernels (`bench/bench_gpu.py --sweep --no-compile`)", ""]
    if not bench or not bench.get("logits"):
        return out + [f"Not measured: step bench-gpu {status}.", ""]
    logits = bench["logits"]
    gb, paths = logits["bytes"] / 1e9, logits["paths"]
    ours = paths["corrpo token_stats"]["seconds"]
    copy_gbs = 2 * gb / paths["device copy"]["seconds"]
    rows = []
    for name, r in paths.items():
        rate = 2 * gb / r["seconds"] if name == "device copy" else gb / r["seconds"]
        peak = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20
        rows.append([name, fmt(r["seconds"] * 1e3, ".3f"), fmt(rate, ",.0f") + (" (r+w)" if name == "device copy" else ""),
                     fmt(peak, ",.0f"), f"{r['seconds'] / ours:.2f}x"])  # fmt: skip
    share = (gb / ours) / copy_gbs
    eager = paths["torch eager"]["seconds"] / ours
    out += [f"[{logits['rows']} x {logits['vocab']}] bf16 logits ({gb:.2f} GB):", ""]
    out += table(["path", "ms", "GB/s", "peak MiB", "time / corrpo's"], rows) + [""]
    out.append(f"corrpo reads at **{share:.0%}** of the device copy bandwidth ({copy_gbs:,.0f} GB/s): bar 85% "
               f"{'met' if share >= 0.85 else 'MISSED'}. **{eager:.1f}x** torch eager: bar 10x "
               f"{'met' if eager >= 10 else 'MISSED'}.")  # fmt: skip
    liger = paths.get("liger fused_selective_log_softmax")
    if liger:
        vs = liger["seconds"] / ours
        out[-1] += f" {vs:.2f}x Liger's single-pass logprob kernel: bar >= 1x {'met' if vs >= 1 else 'MISSED'}."
    else:
        out[-1] += " Liger-Kernel was not installed: its bar is not measured."
    out.append("")
    fused = bench.get("fused")
    if fused:
        ours = fused["paths"]["corrpo token_stats_from_hidden"]["seconds"]
        rows = [[name, fmt(r["seconds"] * 1e3, ".3f"), fmt(fused["flops"] / r["seconds"] / 1e12, ",.0f"),
                 fmt(None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20, ",.0f"), f"{r['seconds'] / ours:.2f}x"]
                for name, r in fused["paths"].items()]  # fmt: skip
        out += [f"Fused from hidden states, T={fused['rows']}, d={fused['dim']}, V={fused['vocab']} bf16:", ""]
        out += table(["path", "ms", "TFLOP/s", "peak MiB", "time / corrpo's"], rows) + [""]
    if bench.get("shapes"):
        rows = [[str(r["rows"]), str(r["vocab"]), r["dtype"], fmt(r["seconds"] * 1e3, ".3f"), fmt(r["gbs"], ",.0f"),
                 fmt(r["copy_gbs"], ",.0f"), fmt(r["share"], ".0%")] for r in bench["shapes"]]  # fmt: skip
        out += ["The logits kernel over rows x vocab x dtype (share: of the device copy's GB/s on the same buffer, read + written):", ""]
        out += table(["rows", "vocab", "dtype", "ms", "GB/s", "copy GB/s", "share"], rows, right=0) + [""]
    for kind, unit in (("logits", "GB/s"), ("fused", "TFLOP/s")):
        swept = sorted((bench.get("sweep") or {}).get(kind, []), key=lambda r: r["seconds"])
        if swept:
            rows = [[f"`{json.dumps(r['config'])}`", fmt(r["seconds"] * 1e3, ".3f"), fmt(r["rate"], ",.0f")] for r in swept[:5]]
            out += [f"Launch configs of the {kind} kernel, the five fastest of {len(swept)}:", ""]
            out += table(["config", "ms", unit], rows) + [""]
    return out


def strength_sections(rows: list[dict], status: str) -> list[str]:
    out = ["## `token_strengths` throughput (`bench/bench_gpu_strengths.py`)", ""]
    cells = [r for r in rows if r.get("kind") == "cell"]
    ceiling = next((r for r in rows if r.get("kind") == "ceiling"), None)
    rate = ceiling["tflops"] if ceiling else None
    if ceiling:
        out.append(f"The card's matmul rate: **{rate:,.0f} TFLOP/s** ({ceiling['what']}, random data, median).")
    for m in (r for r in rows if r.get("kind") == "model"):
        if "error" in m:
            out.append(f"- {m['label']}: could not be built: {m['error']}")
            continue
        out.append(f"- {m['label']}: {m['parameters'] / 1e6:,.0f}M parameters, {m['layers']} layers, hidden {m['hidden']}, "
                   f"vocab {m['vocab']}, {m['dtype']}, attention {m['attention']}; weights: {m['weights']}.")  # fmt: skip
    if not cells:
        return out + ([""] if len(out) > 2 else []) + [f"Not measured: step strengths {status}.", ""]
    out += [
        "",
        "Random token ids; the second half of each trace is the response. `exact` scores tokens spread evenly over it, "
        "`subsample` k of them (both as many as fit in a few seconds, after a probe on 2 tokens; at most 64 and the "
        "default k), every other path the whole response. x fwd+bwd: time over one training forward+backward "
        "of the same trace; TFLOP/s: the FLOPs torch counts (matrix products and attention) over the time; share: of "
        "the matmul rate above.",
        "",
    ]
    unit = {(r["model"], r["length"]): r.get("seconds") for r in cells if r["label"] == "fwd+bwd" and "error" not in r}
    labels = {m["model"]: m["label"] for m in rows if m.get("kind") == "model"}
    body = []
    for r in cells:
        if "error" in r:
            body.append([labels.get(r["model"], r["model"]), str(r["length"]), r["label"], *["-"] * 7,
                         r["error"].replace("|", "/")])  # fmt: skip
            continue
        fb = unit.get((r["model"], r["length"]))
        tflops = None if r.get("flops") is None else r["flops"] / r["seconds"] / 1e12
        body.append([
            labels.get(r["model"], r["model"]), str(r["length"]), r["label"], str(r["tokens"]), fmt(r["seconds"] * 1e3, ",.1f"),
            fmt(r["tokens"] / r["seconds"], ",.0f"), fmt(None if fb is None else r["seconds"] / fb, ",.1f"),
            fmt(tflops, ",.1f"), fmt(None if tflops is None or rate is None else tflops / rate, ".1%"),
            fmt(r.get("peak_gib"), ",.2f"),
        ])  # fmt: skip
    header = ["model", "trace", "path", "tokens", "ms", "tokens/s", "x fwd+bwd", "TFLOP/s", "share", "peak GiB"]
    if any("error" in r for r in cells):
        header.append("error")
        body = [b + [""] * (len(header) - len(b)) for b in body]
    return out + table(header, body, right=3) + [""]


def pytest_lines(counts: dict[str, Any], what: str = "") -> list[str]:
    """A pytest run's counts (``junit_counts``) and its failed tests, as markdown lines."""
    head = (f"{counts['passed']} passed, {counts['failures']} failed, {counts['errors']} errors, "
            f"{counts['skipped']} skipped, of {counts['tests']}{what}.")  # fmt: skip
    return [head, *(f"- failed: `{name}`" for name in counts["failed"])]


def render(results: dict) -> str:
    m = results["machine"]
    smi = m.get("nvidia_smi")
    steps = {s["name"]: s["status"] for s in results["steps"]}

    def status(name: str) -> str:
        return steps.get(name, "has not run yet")
    lines = [
        f"# GPU check: {m['card']}",
        "",
        f"{results['started']}, `make gpu-check` (bench/gpu_check.py), {results['seconds']:.0f} s of a "
        f"{results['budget']:.0f} s budget.",
        f"Card: {m['card']} (torch.cuda.get_device_name)"
        + (f"; nvidia-smi: {smi['name']}, driver {smi['driver_version']}, {smi['memory.total']}, max SM clock "
           f"{smi['clocks.max.sm']}, power limit {smi['power.limit']}" if smi else "; nvidia-smi: not available")
        + f". torch {m['torch']} (CUDA {m['cuda']}), triton {m['triton']}, transformers {m['transformers']}, "
        f"Python {m['python']}.",
        "",
        "## Steps",
        "",
        *table(["step", "status", "seconds", "limit s"],
               [[s["name"], s["status"], f"{s['seconds']:.0f}", f"{s['limit']:.0f}"] for s in results["steps"]], right=2),
        "",
        "## CUDA tests",
        "",
    ]  # fmt: skip
    tests = results.get("cuda_tests")
    if tests:
        lines += pytest_lines(tests, f": `{' '.join(CUDA_TESTS)}`")
    else:
        lines.append(f"No results: step cuda-tests {status('cuda-tests')}.")
    lines.append("")
    lines += kernel_sections(results.get("bench_gpu"), status("bench-gpu"))
    lines += strength_sections(results.get("strengths", []), status("strengths"))
    lines += ["## SGLang engine with corrpo's plugin, no stub", ""]
    sg = results.get("sglang")
    if sg:
        lines += pytest_lines(sg)
    else:
        lines.append(f"Step sglang {status('sglang')}.")
    return "\n".join(lines) + "\n"


# ---- the run ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "runs" / "gpu-check"))
    ap.add_argument("--budget", type=float, default=float(sum(LIMITS.values())), help="seconds for all the steps")
    ap.add_argument("--smoke", action="store_true", help="on the CPU: the benches' smoke runs, no tests")
    args = ap.parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False): nothing to check")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "gpu-check.log"
    log.write_text("")
    started = time.monotonic()
    results: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "budget": args.budget, "machine": machine(args.smoke), "steps": [],
    }  # fmt: skip
    print(f"gpu-check: {results['machine']['card']}; writing {args.out}", flush=True)
    py = sys.executable

    def write() -> str:
        # After every step too, so that a run cut short still leaves its tables.
        results["seconds"] = time.monotonic() - started
        (args.out / "gpu-check.json").write_text(json.dumps(results, indent=2))
        text = render(results)
        (args.out / "gpu-check.md").write_text(text)
        return text

    def step(name: str, argv: list[str] | None, skipped: str = "") -> None:
        left = args.budget - (time.monotonic() - started)
        if argv is None or left < 10:
            why = skipped or "the run's budget is spent"
            result = Step(name, f"skipped: {why}", 0.0, 0.0)
            print(f"gpu-check: {name}: {result.status}", flush=True)
        else:
            # The last step may use whatever the earlier ones left of the budget.
            limit = left if name == "sglang" else min(LIMITS[name], left)
            result = run_step(name, argv, limit, log)
        results["steps"].append(vars(result))

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        if importlib.util.find_spec("pytest_timeout") is not None:
            # One hung test fails alone, and the step still ends with its results file.
            pytest.append("--timeout=90")
        step("cuda-tests", None if args.smoke else [*pytest, f"--junitxml={work / 'cuda.xml'}", *CUDA_TESTS],
             skipped="a smoke run has no CUDA device")  # fmt: skip
        results["cuda_tests"] = junit_counts(work / "cuda.xml")
        write()

        bench = [py, "bench/bench_gpu.py", "--json", str(work / "bench_gpu.json")]
        step("bench-gpu", [*bench, "--no-compile", *(["--smoke"] if args.smoke else ["--sweep"])])
        results["bench_gpu"] = read_json(work / "bench_gpu.json")
        write()

        step("strengths", [py, "bench/bench_gpu_strengths.py", "--jsonl", str(work / "strengths.jsonl"),
                           *(["--smoke", "--models", "smollm2"] if args.smoke else [])])  # fmt: skip
        results["strengths"] = read_jsonl(work / "strengths.jsonl")
        write()

        sg_python, why = sglang_python()
        sg_argv = None if args.smoke or sg_python is None else [
            sg_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={work / 'sglang.xml'}",
            "tests/test_integrations_sglang_engine.py",
        ]  # fmt: skip
        step("sglang", sg_argv, skipped="a smoke run has no CUDA device" if args.smoke else why)
        results["sglang"] = junit_counts(work / "sglang.xml")

    print(write())
    # The results file is written either way; the exit code says whether every step that ran passed.
    return 0 if all(s["status"] == "ok" for s in results["steps"] if not s["status"].startswith("skipped")) else 1


if __name__ == "__main__":
    sys.exit(main())
