"""SPEC 8's GPU bar: corrpo's Triton kernels against their peers, measured in the same run.

Logits case, [8192 x 151936] bf16: corrpo_kernels.token_stats (one read of the logits);
the device copy bandwidth on the same buffer (dst.copy_(src): bytes read + written per
second); the four quantities composed in torch eager (log_softmax + entropy + gather +
sum p^2) and under torch.compile; Liger-Kernel's fused_selective_log_softmax (one pass,
logprob only; it scores rows 1..T-1 of a [1, T, V] batch).

Fused case, T=8192, d=4096, V=151936 bf16: corrpo_kernels.token_stats_from_hidden against
cuBLAS's h @ W^T alone (the floor of any fused kernel), h @ W^T followed by our logits
kernel, and the torch eager and compiled compositions.

Every path is timed with triton.testing.do_bench (median, L2 flushed between runs) and
its peak memory above the inputs is recorded. Results are checked against each other
before they are timed.

    python bench/bench_gpu.py [--rows 8192] [--vocab 151936] [--dim 4096] [--json out.json]
    python bench/bench_gpu.py --sweep    # also other launch configs, and the logits kernel over
                                         # rows x vocab x dtype against the device copy
    python bench/bench_gpu.py --smoke    # tiny shapes on the CPU interpreter: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--rows", type=int, default=8192)
parser.add_argument("--vocab", type=int, default=151_936)
parser.add_argument("--dim", type=int, default=4096)
parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers")
parser.add_argument("--smoke", action="store_true", help="tiny shapes through Triton's CPU interpreter")
parser.add_argument(
    "--sweep", action="store_true",
    help="time alternative launch configs of both kernels, and the logits kernel over rows x vocab x dtype",
)
parser.add_argument("--json", help="also write the raw results here")
ARGS = parser.parse_args()
if ARGS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import corrpo_kernels  # noqa: E402
from corrpo_kernels import torch_reference  # noqa: E402

DEVICE = torch.device("cpu" if ARGS.smoke else "cuda")


def timed(fn: Callable[[], object]) -> float:
    """Median seconds of one call."""
    if DEVICE.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], object]) -> int | None:
    """Device memory the call allocates at its peak, above what was allocated before."""
    if DEVICE.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def liger() -> Callable | None:
    if DEVICE.type != "cuda":
        return None
    try:
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
    except ImportError:
        return None
    return fused_selective_log_softmax


def compiled(fn: Callable) -> Callable | None:
    return None if ARGS.no_compile else torch.compile(fn, dynamic=False)


def check(name: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    err = (got.float() - want.float()).abs().max().item()
    if not err <= atol:
        sys.exit(f"{name} disagrees with corrpo's kernel by {err:.3g} (> {atol}): the results are not comparable")


def measure(paths: dict[str, Callable | None]) -> dict[str, dict]:
    out = {}
    for name, fn in paths.items():
        if fn is None:
            continue
        fn()  # compile, autotune, warm the allocator
        out[name] = {"seconds": timed(fn), "peak_bytes": peak_bytes(fn)}
    return out


def logits_case(rows: int, vocab: int) -> dict:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    logits = (2.5 * torch.randn((rows, vocab), generator=gen, device=DEVICE)).to(torch.bfloat16)
    ids = torch.randint(0, vocab, (rows,), generator=gen, device=DEVICE)
    copy = torch.empty_like(logits)
    ours = corrpo_kernels.token_stats(logits, ids)
    check("torch eager", torch_reference.token_stats(logits, ids), ours.stats, atol=2e-3)
    liger_fn = liger()
    batch, shifted_ids = logits[None], ids[None, 1:]
    if liger_fn is not None:
        check("liger logprob", liger_fn(batch, shifted_ids, 1.0)[0], ours.logprob[1:], atol=2e-3)
    eager = lambda: torch_reference.token_stats(logits, ids)  # noqa: E731
    compiled_fn = compiled(torch_reference.token_stats)
    paths = {
        "corrpo token_stats": lambda: corrpo_kernels.token_stats(logits, ids),
        "device copy": lambda: copy.copy_(logits),
        "torch eager": eager,
        "torch.compile": compiled_fn and (lambda: compiled_fn(logits, ids)),
        "liger fused_selective_log_softmax": liger_fn and (lambda: liger_fn(batch, shifted_ids, 1.0)),
    }
    return {"rows": rows, "vocab": vocab, "bytes": logits.numel() * logits.element_size(), "paths": measure(paths)}


def fused_case(rows: int, dim: int, vocab: int) -> dict:
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    hidden = torch.randn((rows, dim), generator=gen, device=DEVICE).to(torch.bfloat16)
    weight = (torch.randn((vocab, dim), generator=gen, device=DEVICE) / dim**0.5 * 3).to(torch.bfloat16)
    ids = torch.randint(0, vocab, (rows,), generator=gen, device=DEVICE)
    ours = corrpo_kernels.token_stats_from_hidden(hidden, weight, ids)
    # The unfused paths round the logits to bf16; the fused kernel keeps them in float32.
    check("matmul + kernel", corrpo_kernels.token_stats(hidden @ weight.T, ids).stats, ours.stats, atol=5e-2)
    compiled_fn = compiled(torch_reference.token_stats_from_hidden)
    paths = {
        "corrpo token_stats_from_hidden": lambda: corrpo_kernels.token_stats_from_hidden(hidden, weight, ids),
        "cuBLAS h @ W^T alone": lambda: hidden @ weight.T,
        "h @ W^T + corrpo token_stats": lambda: corrpo_kernels.token_stats(hidden @ weight.T, ids),
        "torch eager": lambda: torch_reference.token_stats_from_hidden(hidden, weight, ids),
        "torch.compile": compiled_fn and (lambda: compiled_fn(hidden, weight, ids)),
    }
    return {"rows": rows, "dim": dim, "vocab": vocab, "flops": 2 * rows * dim * vocab, "paths": measure(paths)}


LOGITS_SWEEP = [
    {"BLOCK_T": 1, "BLOCK_V": block, "num_warps": warps}
    for block in (1024, 2048, 4096, 8192)
    for warps in (1, 2, 4, 8, 16)
    if block // (32 * warps) >= 4
]
FUSED_SWEEP = [
    {"BLOCK_T": t, "BLOCK_V": v, "BLOCK_D": d, "num_warps": w, "num_stages": st}
    for t, v, d, w, st in [
        (64, 128, 32, 8, 3), (64, 128, 64, 8, 3), (128, 128, 32, 8, 3), (128, 64, 64, 8, 3),
        (64, 256, 32, 8, 3), (128, 256, 32, 8, 2), (64, 64, 64, 4, 4),
    ]
]


def sweep(console: Console, rows: int, dim: int, vocab: int) -> dict:
    """Times each config of LOGITS_SWEEP and FUSED_SWEEP on the benchmark's shapes."""
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    logits = (2.5 * torch.randn((rows, vocab), generator=gen, device=DEVICE)).to(torch.bfloat16)
    hidden = torch.randn((rows, dim), generator=gen, device=DEVICE).to(torch.bfloat16)
    weight = (torch.randn((vocab, dim), generator=gen, device=DEVICE) / dim**0.5 * 3).to(torch.bfloat16)
    ids = torch.randint(0, vocab, (rows,), generator=gen, device=DEVICE)
    results = {"logits": [], "fused": []}
    for kind, configs, run, unit in (
        ("logits", LOGITS_SWEEP, lambda c: corrpo_kernels.token_stats(logits, ids, config=c), 2 * rows * vocab / 1e9),
        ("fused", FUSED_SWEEP, lambda c: corrpo_kernels.token_stats_from_hidden(hidden, weight, ids, config=c),
         2 * rows * dim * vocab / 1e12),
    ):
        for config in configs:
            try:
                seconds = timed(lambda: run(config))
            except Exception as err:  # a config the device cannot run (shared memory, registers)
                console.print(f"{kind} {config}: {type(err).__name__}: {err}")
                continue
            results[kind].append({"config": config, "seconds": seconds, "rate": unit / seconds})
        best = sorted(results[kind], key=lambda r: r["seconds"])
        table = Table(title=f"sweep: {kind} kernel ({'GB/s' if kind == 'logits' else 'TFLOP/s'})")
        for col in ("config", "ms", "rate"):
            table.add_column(col, justify="left" if col == "config" else "right")
        for r in best:
            table.add_row(str(r["config"]), f"{r['seconds'] * 1e3:.3f}", f"{r['rate']:,.0f}")
        console.print(table)
    return results


#: The logits kernel across the shapes it meets (the vocabularies of Llama 2, SmolLM2, Qwen and
#: Gemma 3; a small and a large batch of rows) and the dtypes it reads.
SHAPE_SWEEP = [(rows, vocab) for rows in (1024, 8192) for vocab in (32_000, 49_152, 151_936, 262_144)]
SWEEP_DTYPES = ("bfloat16", "float16", "float32")


def shape_sweep(console: Console) -> list[dict]:
    """The logits kernel's read rate on each shape and dtype, against a device copy of the
    same buffer (bytes read + written), after checking it against torch on the first rows."""
    shapes = [(16, 1000), (33, 4097)] if ARGS.smoke else SHAPE_SWEEP
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    results = []
    for rows, vocab in shapes:
        for name in SWEEP_DTYPES:
            logits = (2.5 * torch.randn((rows, vocab), generator=gen, device=DEVICE)).to(getattr(torch, name))
            ids = torch.randint(0, vocab, (rows,), generator=gen, device=DEVICE)
            # The float32 torch composition of the whole batch would need several times its
            # memory: 64 rows check the kernel on this shape and dtype.
            head = slice(0, 64)
            ours = corrpo_kernels.token_stats(logits, ids).stats[:, head]
            check(f"torch eager ({name}, [{rows} x {vocab}])", torch_reference.token_stats(logits[head], ids[head]), ours, atol=2e-3)
            copy = torch.empty_like(logits)
            seconds = timed(lambda: corrpo_kernels.token_stats(logits, ids))
            copy_seconds = timed(lambda: copy.copy_(logits))
            gb = logits.numel() * logits.element_size() / 1e9
            results.append({
                "rows": rows, "vocab": vocab, "dtype": name, "gb": gb, "seconds": seconds, "gbs": gb / seconds,
                "copy_seconds": copy_seconds, "copy_gbs": 2 * gb / copy_seconds, "share": (gb / seconds) / (2 * gb / copy_seconds),
            })  # fmt: skip
            del logits, ids, copy
    table = Table(title="sweep: logits kernel over rows x vocab x dtype (share: of the device copy's GB/s, read + written)")
    for col in ("rows", "vocab", "dtype", "GB", "ms", "GB/s", "copy GB/s", "share"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(str(r["rows"]), str(r["vocab"]), r["dtype"], f"{r['gb']:.3f}", f"{r['seconds'] * 1e3:.3f}",
                      f"{r['gbs']:,.0f}", f"{r['copy_gbs']:,.0f}", f"{r['share']:.0%}")
    console.print(table)
    return results


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def report(console: Console, logits: dict, fused: dict) -> None:
    p = logits["paths"]
    gb = logits["bytes"] / 1e9
    ours = p["corrpo token_stats"]["seconds"]
    copy_gbs = 2 * gb / p["device copy"]["seconds"]
    table = Table(title=f"[{logits['rows']} x {logits['vocab']}] bf16 logits ({gb:.2f} GB)")
    for col in ("path", "ms", "GB/s of logits", "peak MiB", "corrpo speedup"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for name, r in p.items():
        rate = f"{2 * gb / r['seconds']:,.0f} (r+w)" if name == "device copy" else f"{gb / r['seconds']:,.0f}"
        table.add_row(name, f"{r['seconds'] * 1e3:.3f}", rate, mib(r["peak_bytes"]), f"{r['seconds'] / ours:.2f}x")
    console.print(table)
    share = (gb / ours) / copy_gbs
    eager = p["torch eager"]["seconds"] / ours
    console.print(f"corrpo reads at {share:.0%} of the device copy bandwidth ({copy_gbs:,.0f} GB/s): bar 85% "
                  f"{'met' if share >= 0.85 else 'MISSED'}")
    console.print(f"{eager:.1f}x torch eager: bar 10x {'met' if eager >= 10 else 'MISSED'}")
    if "liger fused_selective_log_softmax" in p:
        vs = p["liger fused_selective_log_softmax"]["seconds"] / ours
        console.print(f"{vs:.2f}x Liger's single-pass logprob kernel: bar >= 1x {'met' if vs >= 1 else 'MISSED'}")

    f = fused["paths"]
    ours = f["corrpo token_stats_from_hidden"]["seconds"]
    table = Table(title=f"fused: T={fused['rows']}, d={fused['dim']}, V={fused['vocab']} bf16")
    for col in ("path", "ms", "TFLOP/s", "peak MiB", "corrpo speedup"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for name, r in f.items():
        tflops = fused["flops"] / r["seconds"] / 1e12
        table.add_row(name, f"{r['seconds'] * 1e3:.3f}", f"{tflops:,.0f}", mib(r["peak_bytes"]), f"{r['seconds'] / ours:.2f}x")
    console.print(table)


def main() -> None:
    console = Console()
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device (or --smoke for the CPU interpreter)")
    rows, vocab, dim = (64, 1000, 64) if ARGS.smoke else (ARGS.rows, ARGS.vocab, ARGS.dim)
    where = "Triton interpreter (smoke run: timings mean nothing)" if ARGS.smoke else torch.cuda.get_device_name()
    import triton

    console.print(f"{where}; torch {torch.__version__}, triton {triton.__version__}")
    results: dict = {"device": where, "logits": None, "fused": None, "sweep": None, "shapes": None}

    def save(key: str, value: object) -> None:
        # After every stage, so that a run stopped by a time limit keeps what it measured.
        results[key] = value
        if ARGS.json:
            with open(ARGS.json + ".part", "w") as out:
                json.dump(results, out, indent=2)
            os.replace(ARGS.json + ".part", ARGS.json)  # never a half-written file

    save("logits", logits_case(rows, vocab))
    save("fused", fused_case(rows, dim, vocab))
    report(console, results["logits"], results["fused"])
    if ARGS.sweep:
        save("shapes", shape_sweep(console))
        save("sweep", sweep(console, rows, dim, vocab))


if __name__ == "__main__":
    main()
