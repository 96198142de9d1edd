"""How well each online estimator stands in for the exact measure (SPEC 3 and 8), on the
responses of a finished exact ``corrpo fingerprint`` run, and what it costs.

    corrpo fingerprint --model M --prompts P --out runs/fp        # exact, the reference
    python bench/bench_estimators.py --run runs/fp [--model M] [--threads 1]

For each estimator, over the same responses and scored positions as the run:
- cost: its wall time over the time of one training forward+backward of the same
  sequences (forward, then backward of the summed target logits into every parameter);
  the exact measure (l1_mean and nuclear_qkvo) is re-timed on the first responses;
- Spearman per token of its value against the run's exact ``l1_mean`` (pooled over tokens);
- per-rollout rho(H, value) against rho(H, exact l1_mean): the fraction of responses where
  the two have the same sign, and the Spearman of the two across responses.
Writes ``estimators.json`` and ``estimators.md`` into the run directory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import corrpo
from corrpo.fingerprinting.generate import read_responses
from corrpo.fingerprinting.models import load_model
from corrpo.fingerprinting.pipeline import read_tokens_csv
from corrpo.fingerprinting.score import score_responses, scored_positions

#: (label, estimator, k, measure compared with exact l1_mean)
CANDIDATES = [
    ("exact frobenius", "exact", None, "frobenius"),
    ("exact nuclear_qkvo", "exact", None, "nuclear_qkvo"),
    ("subsample k=16", "subsample", 16, "l1_mean"),
    ("subsample k=8", "subsample", 8, "l1_mean"),
    ("jvp k=8", "jvp", 8, "frobenius"),
    ("jvp k=32", "jvp", 32, "frobenius"),
    ("jvp Cauchy k=32", "jvp", 32, "l1_mean"),
    ("last_block l1", "last_block", None, "l1_mean"),
    ("last_block nuclear", "last_block", None, "nuclear_qkvo"),
    ("logit_grad", "logit_grad", None, "logit_grad"),
    ("head_logit_grad", "logit_grad", None, "head_logit_grad"),
]


def forward_backward_seconds(model: torch.nn.Module, responses: list, stride: int) -> list[float]:
    """Per response: one forward, then backward of the summed target logits."""
    out = []
    for r in responses:
        ids = torch.tensor(r.prompt_ids + r.response_ids)
        pos = torch.tensor(scored_positions(r, stride))
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        logits = model(ids[None]).logits[0]
        logits[pos - 1, ids[pos]].sum().backward()
        out.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return out


def rollout_rho(h: np.ndarray, s: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return corrpo.rollout_correlations(h, s, lengths, min_tokens=5).rho


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="output directory of an exact corrpo fingerprint run")
    ap.add_argument("--model", default=None, help="the run's model (default: as recorded in its summary.json)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=None, help="labels of the candidates to run")
    ap.add_argument("--exact-responses", type=int, default=2, help="responses the exact measure is re-timed on")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    summary = json.loads((run / "summary.json").read_text())
    settings = summary["settings"]
    stride = int(settings.get("positions_stride", 1))
    model_path = args.model or summary["model"]["path"]
    loaded = load_model(model_path)
    model = loaded.model.eval()
    responses = read_responses(run / "responses.jsonl", loaded.tokenizer)
    exact = read_tokens_csv(run / "tokens.csv")
    key = {(int(r), int(p)): i for i, (r, p) in enumerate(zip(exact["response"], exact["position"]))}
    lengths = np.array([np.sum(exact["response"] == r.index) for r in responses], dtype=np.int64)
    h, ref = exact["entropy_bits"], exact["l1_mean"]
    ref_rho = rollout_rho(h, ref, lengths)

    fb_each = forward_backward_seconds(model, responses, stride)
    fb = sum(fb_each)
    # The exact values come from the run; its cost is re-measured here, beside the others.
    n = args.exact_responses
    t0 = time.perf_counter()
    score_responses(model, responses[:n], estimator="exact", stride=stride)
    exact_cost = (time.perf_counter() - t0) / sum(fb_each[:n])
    rows = []
    for label, estimator, k, measure in CANDIDATES:
        if args.only and label not in args.only:
            continue
        if estimator == "exact":
            values, seconds = exact[measure], exact_cost * fb
            idx, est_lengths = np.arange(len(ref)), lengths
        else:
            t0 = time.perf_counter()
            scored = score_responses(model, responses, estimator=estimator, k=k, stride=stride, measures=[measure])
            seconds = time.perf_counter() - t0
            cols = scored.columns
            idx = np.array([key[(int(r), int(p))] for r, p in zip(cols["response"], cols["position"])])
            values, est_lengths = cols[measure], scored.lengths
        spearman = corrpo.correlation(values, ref[idx])
        rho = rollout_rho(h[idx], values, est_lengths)
        both = ~np.isnan(rho) & ~np.isnan(ref_rho)
        rows.append({
            "label": label,
            "estimator": estimator,
            "k": k,
            "measure": measure,
            "tokens": int(len(values)),
            "seconds": seconds,
            "cost_vs_fwd_bwd": None if seconds is None else seconds / fb,
            "spearman_vs_exact_l1": spearman,
            "rollouts_compared": int(both.sum()),
            "rho_sign_agreement": float(np.mean(np.sign(rho[both]) == np.sign(ref_rho[both]))) if both.any() else None,
            "rho_spearman_across_rollouts": corrpo.correlation(rho[both], ref_rho[both]) if both.sum() > 2 else None,
            "rho_mean": float(np.nanmean(rho)) if both.any() else None,
        })
        print(json.dumps(rows[-1]), flush=True)
    # A run with --only updates its candidates' rows and keeps the others'.
    path = run / "estimators.json"
    if args.only and path.exists():
        fresh = {r["label"] for r in rows}
        rows = [r for r in json.loads(path.read_text())["candidates"] if r["label"] not in fresh] + rows
        rows.sort(key=lambda r: [c[0] for c in CANDIDATES].index(r["label"]))
    out = {"run": str(run), "model": loaded.name, "threads": args.threads, "forward_backward_seconds": fb,
           "exact_rho_mean": float(np.nanmean(ref_rho)), "candidates": rows}
    path.write_text(json.dumps(out, indent=2))
    table = Table(title=f"estimators vs exact l1_mean on {loaded.name} ({len(ref)} tokens, {len(responses)} responses)")
    cols = ("candidate", "x fwd+bwd", "Spearman per token", "rho sign kept", "rho Spearman", "mean rho")
    for c in cols:
        table.add_column(c)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def fmt(x: float | None, spec: str) -> str:
        return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)

    for r in rows:
        cells = (r["label"], fmt(r["cost_vs_fwd_bwd"], ".1f"), fmt(r["spearman_vs_exact_l1"], "+.2f"),
                 f"{fmt(r['rho_sign_agreement'], '.2f')} (n={r['rollouts_compared']})",
                 fmt(r["rho_spearman_across_rollouts"], "+.2f"), fmt(r["rho_mean"], "+.3f"))
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    (run / "estimators.md").write_text("\n".join(lines) + "\n")
    Console().print(table)


if __name__ == "__main__":
    main()
