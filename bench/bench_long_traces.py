"""What the measure costs on long traces (issue 19): time and peak memory of each estimator
on one trace of 1k to 8k tokens, in units of a training forward+backward of the same trace.

    python bench/bench_long_traces.py                          # SmolLM2, 1k 2k 4k 8k, all methods
    python bench/bench_long_traces.py --lengths 1024 2048 --methods exact local --out runs/long-traces

Every (length, method) cell runs in a fresh subprocess (``--cell``), so each peak is its own:
the cell loads the model, times one training forward+backward of the trace (forward, then
``backward()`` of the summed target logits of every token into every parameter), then the
method. Peak memory is the resident set's high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` before each step) above the resident set before it: what the step
adds to a process that already holds the model.

The trace is natural text: the repository's README and docs as committed at ``--commit``
(default HEAD; the text is fixed in ``trace.txt`` beside the results, so later edits do not
move it), tokenized without a chat template, cut to each length; every token after the
first is scored. Where scoring the
whole trace would take hours on a CPU, a cell scores a part and extrapolates, and says so
(``extrapolated`` in the results):
- exact: ``--exact-tokens`` tokens at the midpoints of equal slices of the trace (one
  batched backward each; the cost of a token grows with its prefix, so slice midpoints give
  the mean), times (tokens scored) / (tokens timed);
- subsample k: exact on k random tokens; above ``--subsample-max-length`` it is not run and
  its row is the exact cell's: k times exact's mean per-token cost (the same computation on
  k tokens), and exact's peak;
- jvp k: ``--jvp-directions`` directions (fewer than k) times k / (directions timed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TEXT_FILES = ("README.md", "docs/fingerprint.md", "docs/benchmarks.md", "docs/integrations.md", "docs/results.md")


def memory_kib() -> tuple[int, int]:
    """(resident set, its high-water mark) of this process, in KiB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]), int(status["VmHWM"].split()[0])


def measured(fn) -> tuple[object, float, float]:
    """fn(), its wall seconds, and the GiB its peak resident set rose above the set before it."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before, _ = memory_kib()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    _, peak = memory_kib()
    return out, seconds, (peak - before) / 2**20


def committed_text(commit: str, files: list[str]) -> str:
    show = lambda f: subprocess.run(["git", "show", f"{commit}:{f}"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return "\n\n".join(show(f) for f in files)


def trace_ids(tokenizer, length: int, text: str) -> tuple[torch.Tensor, str]:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < length:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than the {length} asked for; add --text files")
    return torch.tensor(ids[:length]), hashlib.sha256(text.encode()).hexdigest()[:16]


def forward_backward(model: torch.nn.Module, ids: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    logits = model(ids[None], use_cache=False).logits[0]
    logits[:-1].gather(1, ids[1:, None]).sum().backward()
    model.zero_grad(set_to_none=True)


def cell(args: argparse.Namespace) -> dict:
    from corrpo.gradients import token_strengths
    from corrpo.models import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    model = loaded.model.eval()
    ids, digest = trace_ids(loaded.tokenizer, args.length, Path(args.trace).read_text())
    scored = np.arange(1, len(ids))
    forward_backward(model, ids[:64])  # warm-up
    _, fb_s, fb_gib = measured(lambda: forward_backward(model, ids))
    method, k = args.method, args.k
    out = {"length": len(ids), "method": method, "k": k, "model": loaded.name, "threads": args.threads,
           "text_sha256": digest, "fwd_bwd_s": fb_s, "fwd_bwd_peak_gib": fb_gib, "extrapolated": None}
    if method == "exact":
        # Slice midpoints: the mean per-token cost over the trace, whatever its growth with the prefix.
        n = args.exact_tokens
        timed = np.unique(((np.arange(n) + 0.5) * len(ids) / n).astype(np.int64))
        _, s, gib = measured(lambda: token_strengths(model, ids, timed, measures=["l1_mean", "nuclear_qkvo"]))
        per_token = s / len(timed)
        out.update(seconds=per_token * len(scored), peak_gib=gib, seconds_per_token=per_token,
                   extrapolated=f"exact on {len(timed)} tokens (positions {timed.tolist()}), x {len(scored)}/{len(timed)}")
    elif method == "subsample":
        _, s, gib = measured(lambda: token_strengths(model, ids, scored, estimator="subsample", k=k, measures=["l1_mean", "nuclear_qkvo"]))
        out.update(seconds=s, peak_gib=gib)
    elif method == "jvp":
        d = min(k, args.jvp_directions)
        _, s, gib = measured(lambda: token_strengths(model, ids, scored, estimator="jvp", k=d, measures=["frobenius"]))
        out.update(seconds=s * k / d, peak_gib=gib, seconds_per_direction=s / d,
                   extrapolated=None if d == k else f"{d} directions, x {k}/{d}")
    else:
        _, s, gib = measured(lambda: token_strengths(model, ids, scored, estimator=method, k=k))
        out.update(seconds=s, peak_gib=gib)
    out["x_fwd_bwd"] = out["seconds"] / fb_s
    return out


METHODS = {"exact": None, "subsample": 16, "jvp": 32, "local": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="a model corrpo.models.load_model takes (default smollm2)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--text", nargs="+", default=list(TEXT_FILES), help="files (relative to the repository) the trace is cut from")
    ap.add_argument("--commit", default="HEAD", help="the commit those files are read at")
    ap.add_argument("--exact-tokens", type=int, default=4, help="tokens exact is timed on")
    ap.add_argument("--subsample-max-length", type=int, default=2048, help="longest trace subsample is run on (beyond: k x exact per token)")
    ap.add_argument("--jvp-directions", type=int, default=2, help="directions jvp is timed with (extrapolated to k)")
    ap.add_argument("--out", default="runs/long-traces", help="directory of results.json (cells are merged into it)")
    ap.add_argument("--cell", nargs=3, metavar=("LENGTH", "METHOD", "TRACE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cell:
        args.length, args.method, args.trace = int(args.cell[0]), args.cell[1], args.cell[2]
        args.k = METHODS[args.method]
        print(json.dumps(cell(args)), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    trace = out / "trace.txt"
    commit = subprocess.run(["git", "rev-parse", args.commit], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    if not trace.exists():
        trace.write_text(committed_text(commit, args.text))
    rows = json.loads(path.read_text()) if path.exists() else []
    passed = ["--model", args.model, "--threads", str(args.threads), "--exact-tokens", str(args.exact_tokens),
              "--subsample-max-length", str(args.subsample_max_length), "--jvp-directions", str(args.jvp_directions)]
    def save(row: dict) -> None:
        nonlocal rows
        print(json.dumps(row), flush=True)
        rows = [r for r in rows if (r["length"], r["method"]) != (row["length"], row["method"])] + [row]
        rows.sort(key=lambda r: (r["length"], list(METHODS).index(r["method"])))
        path.write_text(json.dumps(rows, indent=2))

    for length in args.lengths:
        for method in args.methods:
            if method == "subsample" and length > args.subsample_max_length:
                exact = [r for r in rows if (r["length"], r["method"]) == (length, "exact")]
                if not exact:
                    raise SystemExit(f"subsample at {length} tokens comes from the exact cell: add exact to --methods")
                e, k = exact[0], METHODS["subsample"]
                save({**e, "method": method, "k": k, "seconds": e["seconds_per_token"] * k,
                      "x_fwd_bwd": e["seconds_per_token"] * k / e["fwd_bwd_s"],
                      "extrapolated": f"{k} x exact's mean per-token time ({e['extrapolated']})"})
                continue
            cmd = [sys.executable, __file__, "--cell", str(length), method, str(trace), *passed]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if done.returncode != 0:
                print(f"{length} {method}: failed\n{done.stderr[-3000:]}", file=sys.stderr, flush=True)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["text"] = {"commit": commit, "files": args.text}
            save(row)
    print(table(rows))


def table(rows: list[dict]) -> str:
    """Markdown: per length, each method's cost in forward+backwards and peak memory."""
    lines = ["| tokens | fwd+bwd s (peak GiB) | method | x fwd+bwd | peak GiB | note |", "|---:|---:|---|---:|---:|---|"]
    for r in rows:
        k = f" k={r['k']}" if r["k"] else ""
        lines.append(
            f"| {r['length']} | {r['fwd_bwd_s']:.1f} ({r['fwd_bwd_peak_gib']:.2f}) | {r['method']}{k} | {r['x_fwd_bwd']:.1f} "
            f"| {r['peak_gib']:.2f} | {r['extrapolated'] or 'measured'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
