"""How well each online estimator stands in for the exact measure (SPEC 3 and 8), on the
responses of a finished exact ``corrpo fingerprint`` run, and what it costs.

    corrpo fingerprint --model M --prompts P --measures l1_mean nuclear_qkvo frobenius --out runs/fp
    python bench/bench_estimators.py --run runs/fp [--model M] [--threads 1] [--only LABEL ...]

For each candidate (an estimator, its k, the measures it gives), over the same responses
and scored positions as the run:
- cost: its wall time over the time of one training forward+backward of the same
  sequences (forward, then backward of the summed target logits of every response token
  into every parameter). The two are timed response by response, interleaved, so a
  machine shared with other work slows both alike. The exact measure and ``subsample``
  (which is the exact measure on k drawn tokens) are timed so on the first
  ``--timed-responses`` responses only: the exact values come from the run, and
  subsample's are the run's at subsample's own draw (checked against the timed calls);
- per-token Spearman of its value against the run's exact value of the same measure
  (``logit_grad`` measures: against exact ``l1_mean``) and against exact ``l1_mean``;
- per-rollout rho(H, value) against the exact rho(H, same measure): the Spearman of the two
  across responses, the fraction of responses where they have the same sign, and what a
  constant guess of exact's majority sign would keep.
Also the standard deviation of log S across tokens for each exact measure (pooled, and the
mean within responses). Writes ``estimators.json``, ``estimators.npz`` (every candidate's
per-token values) and ``estimators.md`` into the run directory; ``--only`` updates those
candidates and keeps the others'.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import corrpo
from corrpo.fingerprinting.generate import read_responses
from corrpo.fingerprinting.pipeline import read_tokens_csv
from corrpo.fingerprinting.score import score_responses, scored_positions
from corrpo.models import load_model

EXACT_MEASURES = ("l1_mean", "nuclear_qkvo", "frobenius")
#: (estimator, k, measures it is judged on)
CANDIDATES = [
    ("exact", None, EXACT_MEASURES),
    *(("subsample", k, ("l1_mean",)) for k in (4, 8, 16, 32)),
    *(("jvp", k, ("frobenius",)) for k in (8, 32, 128)),
    ("jvp", 32, ("l1_mean",)),  # Cauchy directions: the median sketch of l1_mean
    *(("jvp_cv", k, ("frobenius",)) for k in (8, 32)),
    ("local", None, EXACT_MEASURES),
    ("last_block", None, EXACT_MEASURES),
    ("logit_grad", None, ("logit_grad", "head_logit_grad")),
]
#: Fewest scored tokens of a response for its rho (as ``corrpo fingerprint`` uses).
MIN_TOKENS = 8


def label(estimator: str, k: int | None, measures: tuple[str, ...]) -> str:
    cauchy = " Cauchy" if estimator == "jvp" and measures == ("l1_mean",) else ""
    return f"{estimator}{cauchy}" + ("" if k is None else f" k={k}")


def forward_backward(model: torch.nn.Module, response) -> float:
    """Seconds of one training step's autograd on a response: forward, then backward of
    the summed target logits of its tokens into every parameter."""
    ids = torch.tensor(response.prompt_ids + response.response_ids)
    pos = torch.arange(len(response.prompt_ids), len(ids))
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    logits = model(ids[None], use_cache=False).logits[0]
    logits[pos - 1, ids[pos]].sum().backward()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def interleaved(model, responses: list, run) -> tuple[float, float, list]:
    """(seconds of ``run`` over the responses, seconds of their forward+backwards, run's
    outputs), each response's forward+backward timed just before its run."""
    fb = est = 0.0
    outs = []
    for r in responses:
        fb += forward_backward(model, r)
        t0 = time.perf_counter()
        outs.append(run(r))
        est += time.perf_counter() - t0
    return est, fb, outs


def subsample_draw(response, stride: int, k: int) -> np.ndarray:
    """The positions ``token_strengths(estimator="subsample", k=k, seed=response.index)``
    scores (its draw, repeated here so that the run's exact values serve every response)."""
    positions = np.array(scored_positions(response, stride))
    if len(positions) <= k:
        return positions
    return np.sort(np.random.default_rng(response.index).choice(positions, size=k, replace=False))


def rollout_rho(h: np.ndarray, s: np.ndarray, lengths: np.ndarray, min_tokens: int = MIN_TOKENS) -> np.ndarray:
    return corrpo.rollout_correlations(h, s, lengths, min_tokens=min_tokens).rho


def log_spread(values: np.ndarray, response: np.ndarray) -> dict[str, float]:
    """Standard deviation of log S over all tokens, and its mean within responses."""
    logs = np.log(values)
    within = [logs[response == r].std() for r in np.unique(response)]
    return {"pooled": float(logs.std()), "within_mean": float(np.mean(within))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="output directory of an exact corrpo fingerprint run")
    ap.add_argument("--model", default=None, help="the run's model (default: as recorded in its summary.json)")
    ap.add_argument("--threads", type=int, default=1)
    labels = [label(*c) for c in CANDIDATES]
    ap.add_argument("--only", nargs="+", default=None, choices=labels, metavar="LABEL", help=f"candidates to run, of: {labels}")
    ap.add_argument("--timed-responses", type=int, default=2, help="responses exact and subsample are timed on")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    summary = json.loads((run / "summary.json").read_text())
    settings = summary["settings"]
    stride = int(settings.get("positions_stride", 1))
    loaded = load_model(args.model or summary["model"]["path"])
    model = loaded.model.eval()
    tokenizer = loaded.require_tokenizer("reading responses.jsonl")
    responses = read_responses(run / "responses.jsonl", tokenizer, chat_template=settings.get("chat_template", True))
    exact = read_tokens_csv(run / "tokens.csv")
    missing = [m for m in EXACT_MEASURES if m not in exact]
    if missing:
        raise SystemExit(f"{run / 'tokens.csv'} has no {missing} column: run the exact fingerprint with --measures {' '.join(EXACT_MEASURES)}")
    key = {(int(r), int(p)): i for i, (r, p) in enumerate(zip(exact["response"], exact["position"]))}
    lengths = np.array([np.sum(exact["response"] == r.index) for r in responses], dtype=np.int64)
    h = exact["entropy_bits"]
    exact_rho = {m: rollout_rho(h, exact[m], lengths) for m in EXACT_MEASURES}

    path_json, path_npz = run / "estimators.json", run / "estimators.npz"
    old = json.loads(path_json.read_text()) if args.only is not None and path_json.exists() else {"candidates": []}
    raw = dict(np.load(path_npz)) if args.only is not None and path_npz.exists() else {}
    rows = []
    for estimator, k, measures in CANDIDATES:
        name = label(estimator, k, measures)
        if args.only is not None and name not in args.only:
            continue
        timed = responses[: args.timed_responses]
        if estimator == "exact":
            seconds, fb, _ = interleaved(model, timed, lambda r: score_responses(
                model, [r], estimator="exact", stride=stride, measures=list(measures)))
            idx, est_lengths, values = np.arange(len(h)), lengths, {m: exact[m] for m in measures}
        elif estimator == "subsample":
            seconds, fb, outs = interleaved(model, timed, lambda r: score_responses(
                model, [r], estimator="subsample", k=k, stride=stride, measures=list(measures), seed=r.index))
            drawn = [subsample_draw(r, stride, k) for r in responses]
            for r, o, pos in zip(timed, outs, drawn):
                at = [key[(r.index, int(p))] for p in pos]
                if not np.array_equal(o.columns["position"], pos) or not np.allclose(o.columns["l1_mean"], exact["l1_mean"][at], rtol=1e-3):
                    raise SystemExit(f"subsample k={k} on response {r.index} is not the run's exact values at its draw")
            idx = np.array([key[(r.index, int(p))] for r, pos in zip(responses, drawn) for p in pos])
            est_lengths = np.array([len(pos) for pos in drawn])
            values = {m: exact[m][idx] for m in measures}
        else:
            seconds, fb, outs = interleaved(model, responses, lambda r: score_responses(
                model, [r], estimator=estimator, k=k, stride=stride, measures=list(measures), seed=r.index))
            cols = {c: np.concatenate([o.columns[c] for o in outs]) for c in ("response", "position", *measures)}
            idx = np.array([key[(int(r), int(p))] for r, p in zip(cols["response"], cols["position"])])
            est_lengths = np.concatenate([o.lengths for o in outs])
            values = {m: cols[m] for m in measures}
        # A subsample of k < MIN_TOKENS tokens gives a rho of all k of them.
        min_tokens = min(MIN_TOKENS, k) if estimator == "subsample" else MIN_TOKENS
        raw[f"{name}/index"] = idx
        for measure, v in values.items():
            raw[f"{name}/{measure}"] = v
            ref = measure if measure in EXACT_MEASURES else "l1_mean"
            rho = rollout_rho(h[idx], v, est_lengths, min_tokens)
            both = ~np.isnan(rho) & ~np.isnan(exact_rho[ref])
            sign = np.sign(exact_rho[ref][both])
            rows.append({
                "label": name, "estimator": estimator, "k": k, "measure": measure, "reference": ref,
                "tokens": int(len(v)), "seconds": seconds, "fwd_bwd_seconds": fb, "cost_vs_fwd_bwd": seconds / fb,
                "spearman_vs_exact": corrpo.correlation(v, exact[ref][idx]),
                "spearman_vs_exact_l1": corrpo.correlation(v, exact["l1_mean"][idx]),
                "rollouts_compared": int(both.sum()),
                "rho_spearman": corrpo.correlation(rho[both], exact_rho[ref][both]) if both.sum() > 2 else None,
                "rho_spearman_vs_exact_l1": corrpo.correlation(rho[both], exact_rho["l1_mean"][both]) if both.sum() > 2 else None,
                "rho_sign_kept": float(np.mean(np.sign(rho[both]) == sign)) if both.any() else None,
                "constant_guess_keeps": float(max(np.mean(sign < 0), np.mean(sign > 0))) if both.any() else None,
                "rho_mean": float(np.nanmean(rho)) if both.any() else None,
            })
            print(json.dumps(rows[-1]), flush=True)
        # Written after every candidate: a long sweep stopped part way keeps what it measured.
        fresh = {r["label"] for r in rows}
        order = [label(*c) for c in CANDIDATES]
        kept = sorted([r for r in old["candidates"] if r["label"] not in fresh] + rows, key=lambda r: order.index(r["label"]))
        out = {
            "run": str(run), "model": loaded.name, "threads": args.threads, "positions_stride": stride,
            "responses": len(responses), "tokens": int(len(h)),
            "exact_rho_mean": {m: float(np.nanmean(exact_rho[m])) for m in EXACT_MEASURES},
            "log_s_std": {m: log_spread(exact[m], exact["response"]) for m in EXACT_MEASURES},
            "candidates": kept,
        }
        path_json.write_text(json.dumps(out, indent=2))
        np.savez(path_npz, **raw)
        (run / "estimators.md").write_text(markdown(out))
    print(markdown(out))


def markdown(out: dict) -> str:
    def fmt(x: float | None, spec: str) -> str:
        return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)

    lines = [
        f"{out['model']}: {out['tokens']} tokens of {out['responses']} responses (positions stride {out['positions_stride']})",
        "",
        "| estimator | measure | x fwd+bwd | Spearman/token vs exact (same; l1_mean) | rho Spearman vs exact | rho sign kept (constant guess) | n rollouts |",
        "|---|---|---:|---|---:|---|---:|",
    ]
    for r in out["candidates"]:
        cost = fmt(r["cost_vs_fwd_bwd"], ".1f")
        if r["estimator"] == "exact" and out["positions_stride"] > 1:
            # Its cost grows with the tokens scored; the others' does not (subsample: k of them).
            cost += f" (every token: {r['cost_vs_fwd_bwd'] * out['positions_stride']:.0f})"
        lines.append(
            f"| {r['label']} | `{r['measure']}` | {cost} "
            f"| {fmt(r['spearman_vs_exact'], '+.2f')}; {fmt(r['spearman_vs_exact_l1'], '+.2f')} "
            f"| {fmt(r['rho_spearman'], '+.2f')} | {fmt(r['rho_sign_kept'], '.2f')} ({fmt(r['constant_guess_keeps'], '.2f')}) "
            f"| {r['rollouts_compared']} |"
        )
    spread = ", ".join(f"`{m}` {v['pooled']:.2f} ({v['within_mean']:.2f} within responses)" for m, v in out["log_s_std"].items())
    lines += ["", f"Standard deviation of log S across tokens: {spread}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
