"""SPEC 8's CPU bar: corrpo.token_stats on [256 x 151936] against peers, same run.

Prints, for f32 and bf16 logits: time and GB/s of corrpo; the same four quantities composed
in torch on the CPU and in NumPy; and the machine's read bandwidth measured on the same
buffer (the faster of a NumPy and a multi-threaded torch sum). Ratios are corrpo's speedup
over each peer, and corrpo's share of the read bandwidth.

    python bench/bench_token_stats.py [--rows 256] [--vocab 151936] [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import ml_dtypes
import numpy as np
import torch

import corrpo
from corrpo_kernels.torch_reference import token_stats as torch_composition


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm up: page faults, thread pools, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def numpy_composition(z: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, ...]:
    z = z.astype(np.float32, copy=False)
    shifted = z - z.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    s = e.sum(axis=1, keepdims=True)
    logp = shifted - np.log(s)
    p = e / s
    entropy = -(p * logp).sum(axis=1)
    logprob = logp[np.arange(len(ids)), ids]
    collision = (p * p).sum(axis=1)
    grad_norm = np.sqrt(np.maximum(0, 1 - 2 * np.exp(logprob) + collision))
    return entropy, logprob, collision, grad_norm


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, corrpo SIMD {corrpo.simd_isa()}, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def bench(dtype: str, rows: int, vocab: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    z32 = (2.5 * rng.standard_normal((rows, vocab))).astype(np.float32)
    ids = rng.integers(0, vocab, rows)
    z = z32 if dtype == "float32" else z32.astype(ml_dtypes.bfloat16)
    zt = torch.from_numpy(z32) if dtype == "float32" else torch.from_numpy(z32).to(torch.bfloat16)
    idt = torch.from_numpy(ids)
    nbytes = z.nbytes

    # The same values through every path, so the results must agree.
    ours = corrpo.token_stats(z, ids)
    theirs = torch_composition(zt, idt)
    np.testing.assert_allclose(ours.entropy, theirs[0].float().numpy(), rtol=1e-3, atol=1e-3)

    t = {
        "corrpo": median_seconds(lambda: corrpo.token_stats(z, ids), repeats),
        "torch": median_seconds(lambda: torch_composition(zt, idt), max(3, repeats // 2)),
        "numpy": median_seconds(lambda: numpy_composition(z, ids), max(3, repeats // 2)),
        "read (torch sum)": median_seconds(lambda: zt.sum(), repeats),
    }
    if dtype == "float32":  # NumPy has no fast bfloat16 sum
        t["read (numpy sum)"] = median_seconds(lambda: z.sum(), repeats)
    read = min(v for k, v in t.items() if k.startswith("read"))
    return {"dtype": dtype, "rows": rows, "vocab": vocab, "bytes": nbytes, "seconds": t, "read_seconds": read}


def report(r: dict) -> None:
    t, gb = r["seconds"], r["bytes"] / 1e9
    ours = t["corrpo"]
    print(f"\n[{r['rows']} x {r['vocab']}] {r['dtype']} ({gb:.3f} GB)")
    print(f"  {'path':<18} {'ms':>9} {'GB/s':>8} {'corrpo speedup':>15}")
    for name, sec in t.items():
        print(f"  {name:<18} {sec * 1e3:>9.2f} {gb / sec:>8.2f} {sec / ours:>14.1f}x")
    share = r["read_seconds"] / ours
    print(f"  corrpo runs at {share:.0%} of the measured read bandwidth ({gb / r['read_seconds']:.1f} GB/s)")
    print(f"  bars: >= 10x torch CPU: {'met' if t['torch'] / ours >= 10 else 'MISSED'}; >= 50% of read bandwidth: {'met' if share >= 0.5 else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()

    print(machine())
    results = [bench(dtype, args.rows, args.vocab, args.repeats) for dtype in ("float32", "bfloat16")]
    for r in results:
        report(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
