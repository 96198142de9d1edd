"""Summaries, tables and plots of runs and studies."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .state import read_metrics

COLORS = {
    "grpo": "#1f77b4",
    "corrpo": "#d62728",
    "corrpo-gated": "#ff7f0e",
    "corrpo-logit-grad": "#9467bd",
    "corrpo-logit-grad-gated": "#8c564b",
    "sft": "#555555",
}
# Arms without a color of their own take these, in order, rather than repeat one above.
SPARE_COLORS = ("#17becf", "#bcbd22", "#e377c2", "#7f7f7f")


def _values(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["global_step"], r[key]) for r in records if r.get(key) is not None]
    if not pts:
        return np.empty(0), np.empty(0)
    x, y = zip(*pts)
    return np.asarray(x, float), np.asarray(y, float)


def _last(records: list[dict[str, Any]], key: str, phase: str | None = None) -> float | None:
    for r in reversed(records):
        if (phase is None or r["phase"] == phase) and r.get(key) is not None:
            return float(r[key])
    return None


def _mean_over(records: list[dict[str, Any]], key: str, phase: str, last: int) -> float | None:
    vals = [r[key] for r in records if r["phase"] == phase and r.get(key) is not None][-last:]
    return float(np.mean(vals)) if vals else None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures a run is judged by."""
    sft = [r for r in records if r["phase"] == "sft"]
    return {
        "sft_steps": len(sft),
        "rl_steps": len(records) - len(sft),
        "held_out_accuracy_after_sft": _last(records, "eval_accuracy", "sft"),
        "held_out_accuracy": _last(records, "eval_accuracy"),
        "rl_accuracy_last10": _mean_over(records, "accuracy", "rl", 10),
        "rl_reward_reg_last10": _mean_over(records, "reward_reg_mean", "rl", 10),
        "rho_pooled_samples_sft_first": next((r["rho_pooled_samples"] for r in sft if r.get("rho_pooled_samples") is not None), None),
        "rho_pooled_samples_sft_last": _last(records, "rho_pooled_samples", "sft"),
        "rho_pooled_samples_logit_grad_sft_last": _last(records, "rho_pooled_samples_logit_grad", "sft"),
        "rho_pooled_rl_last10": _mean_over(records, "rho_pooled", "rl", 10),
        "rho_pooled_logit_grad_rl_last10": _mean_over(records, "rho_pooled_logit_grad", "rl", 10),
        "strength_s_rl_mean": _mean_over(records, "strength_s", "rl", 10**9),
        "entropy_mean_rl_last10": _mean_over(records, "entropy_mean", "rl", 10),
        "elapsed_s": _last(records, "elapsed_s"),
    }


MEASURES_LINE = (
    "S is the paper's measure: l1_mean, the parameter-space gradient of the target {objective} "
    "(SPEC 3; estimator {strength}). G is logit_grad, the logit-space norm whose rho with H is near +1 by construction."
)
LOGIT_GRAD_LINE = (
    "S is G here (--strength logit_grad): the logit-space norm whose rho with H is near +1 by construction, "
    "not the paper's measure (use --strength exact or subsample for that)."
)


def _mean_of(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


SUMMARY_ROWS = (
    ("held-out accuracy after SFT", "held_out_accuracy_after_sft"),
    ("held-out accuracy at the end", "held_out_accuracy"),
    ("RL rollout accuracy (last 10 steps)", "rl_accuracy_last10"),
    ("pooled rho(H, S), first SFT evaluation (own samples)", "rho_pooled_samples_sft_first"),
    ("pooled rho(H, S), last SFT step (own samples)", "rho_pooled_samples_sft_last"),
    ("pooled rho(H, G), last SFT step (own samples)", "rho_pooled_samples_logit_grad_sft_last"),
    ("pooled rho(H, S), RL (last 10 steps)", "rho_pooled_rl_last10"),
    ("pooled rho(H, G), RL (last 10 steps)", "rho_pooled_logit_grad_rl_last10"),
    ("seconds per RL step for S", "strength_s_rl_mean"),
    ("mean entropy, RL (last 10 steps, nats)", "entropy_mean_rl_last10"),
    ("wall time (s)", "elapsed_s"),
)


def print_summary(summary: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for label, key in SUMMARY_ROWS:
        table.add_row(label, _fmt(summary.get(key)))
    Console().print(table)


def _panels(records: list[dict[str, Any]], titles: tuple[str, str, str]) -> tuple[Any, Any]:
    """The three panels (accuracy, reward, pooled rho) over the steps of ``records``, with
    the SFT steps shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), constrained_layout=True)
    sft_steps = sum(1 for r in records if r["phase"] == "sft")
    for ax, title in zip(axes, titles):
        if sft_steps:
            ax.axvspan(0, sft_steps, color="#eeeeee", zorder=0)
            ax.axvline(sft_steps, color="#999999", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("step (SFT shaded, then RL)")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.02)
    axes[2].set_ylim(-1.02, 1.02)
    axes[2].axhline(0, color="black", lw=0.6)
    return fig, axes


def _save(fig: Any, path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _smooth(y: np.ndarray, width: int) -> np.ndarray:
    if len(y) < width or width <= 1:
        return y
    kernel = np.ones(width) / width
    head = np.cumsum(y[: width - 1]) / np.arange(1, width)
    return np.concatenate([head, np.convolve(y, kernel, mode="valid")])


def plot_run(records: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Accuracy, reward, and pooled rho(H, S) and rho(H, G) over the SFT and RL steps of one
    run; the reward panel shows the RL steps alone."""
    fig, (acc, reward, rho) = _panels(records, ("accuracy", "RL reward (5-step mean)", "pooled Spearman rho(H, S) and rho(H, G)"))
    x, y = _values(records, "accuracy")
    acc.plot(x, _smooth(y, 5), lw=1, alpha=0.6, label="own samples (train prompts)")
    x, y = _values(records, "eval_accuracy")
    acc.plot(x, y, "o-", label="held-out (greedy)")
    acc.legend(loc="best")
    rl = [r for r in records if r["phase"] == "rl"]
    for key, label in (("reward_mean", "verifier reward"), ("reward_reg_mean", "r - coef * rho (sent to advantages)")):
        x, y = _values(rl, key)
        reward.plot(x, _smooth(y, 5), label=label)
    if rl:
        reward.set_xlim(rl[0]["global_step"] - 0.5, rl[-1]["global_step"] + 0.5)
        reward.set_xlabel("step (RL)")
    reward.legend(loc="best")
    for key, label, style in (
        ("rho_pooled", "S of --strength, RL rollouts", "-"),
        ("rho_pooled_samples", "S, own samples (SFT, exact)", "o-"),
        ("rho_pooled_logit_grad", "G, training batch (SFT: data; RL: rollouts)", "-"),
        ("rho_pooled_samples_logit_grad", "G, own samples (SFT)", "-"),
    ):
        x, y = _values(records, key)
        if len(x):
            rho.plot(x, y, style, lw=1, ms=3, label=label)
    rho.legend(loc="lower right", fontsize=8)
    return _save(fig, path, title)


def load_study(root: Path) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """{arm: {seed: records}} of a study directory (``seed<N>/<arm>/metrics.jsonl``)."""
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for metrics in sorted(root.glob("seed*/*/metrics.jsonl")):
        arm = metrics.parent.name
        if arm == "sft":
            continue
        seed = int(metrics.parent.parent.name.removeprefix("seed"))
        runs.setdefault(arm, {})[seed] = read_metrics(metrics)
    return runs


def _band(ax: Any, runs: dict[int, list[dict[str, Any]]], key: str, color: str, label: str, phase: str | None, smooth: int = 1) -> None:
    series = []
    for records in runs.values():
        chosen = [r for r in records if phase is None or r["phase"] == phase]
        series.append(_values(chosen, key))
    if not series or not len(series[0][0]):
        return
    n = min(len(s[0]) for s in series)
    x = series[0][0][:n]
    ys = np.stack([_smooth(s[1][:n], smooth) for s in series])
    ax.plot(x, ys.mean(axis=0), color=color, label=f"{label} (mean of {len(ys)})")
    ax.fill_between(x, ys.min(axis=0), ys.max(axis=0), color=color, alpha=0.18, lw=0)


def plot_study(study: dict[str, dict[int, list[dict[str, Any]]]], path: Path, title: str) -> Path:
    """Held-out accuracy, RL rollout accuracy and pooled rho per arm: mean over seeds, with the
    band from the lowest to the highest seed."""
    first = next(iter(study.values()))
    titles = ("held-out accuracy (greedy)", "RL rollout accuracy (9-step mean)", "pooled Spearman rho(H, S), each arm's S")
    fig, (acc, reward, rho) = _panels(next(iter(first.values())), titles)
    spare = iter(SPARE_COLORS * len(study))
    for arm, runs in study.items():
        color = COLORS[arm] if arm in COLORS else next(spare)
        _band(acc, runs, "eval_accuracy", color, arm, None)
        _band(reward, runs, "accuracy", color, arm, "rl", smooth=9)
        _band(rho, runs, "rho_pooled", color, arm, "rl")
    # Rollout accuracy exists only in RL: show those steps alone.
    sft_steps = sum(1 for r in next(iter(first.values())) if r["phase"] == "sft")
    total = len(next(iter(first.values())))
    if total > sft_steps:
        reward.set_xlim(sft_steps, total)
    _band(rho, first, "rho_pooled_samples", "#2ca02c", "SFT, own samples", "sft")
    for ax in (acc, reward, rho):
        ax.legend(loc="best", fontsize=8)
    return _save(fig, path, title)


def study_table(study: dict[str, dict[int, list[dict[str, Any]]]]) -> tuple[list[dict[str, Any]], str]:
    """Per arm: each seed's final held-out accuracy, their mean and spread, and the
    rho figures; also as a Markdown table."""
    rows = []
    for arm, runs in study.items():
        sums = {seed: summarize(records) for seed, records in sorted(runs.items())}
        final = np.array([s["held_out_accuracy"] for s in sums.values()], float)
        after_sft = np.array([s["held_out_accuracy_after_sft"] for s in sums.values()], float)
        rows.append(
            {
                "arm": arm,
                "seeds": list(sums),
                "held_out_after_sft": after_sft.tolist(),
                "held_out_final": final.tolist(),
                "held_out_final_mean": float(final.mean()),
                "held_out_final_std": float(final.std(ddof=1)) if len(final) > 1 else 0.0,
                "gain_mean": float((final - after_sft).mean()),
                "rho_pooled_rl_last10": [s["rho_pooled_rl_last10"] for s in sums.values()],
                "rho_pooled_logit_grad_rl_last10": [s["rho_pooled_logit_grad_rl_last10"] for s in sums.values()],
                "strength_s_rl_mean": [s["strength_s_rl_mean"] for s in sums.values()],
                "entropy_mean_rl_last10": [s["entropy_mean_rl_last10"] for s in sums.values()],
            }
        )
    lines = [
        "| arm | held-out after SFT (per seed) | held-out at the end (per seed) | mean ± std | mean gain over SFT "
        "| pooled rho(H, S), last 10 RL steps (per seed) | pooled rho(H, G), same steps | s per step for S |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['arm']} | {', '.join(_fmt(v) for v in row['held_out_after_sft'])} "
            f"| {', '.join(_fmt(v) for v in row['held_out_final'])} "
            f"| {row['held_out_final_mean']:.3f} ± {row['held_out_final_std']:.3f} "
            f"| {row['gain_mean']:+.3f} | {', '.join(_fmt(v, 2) for v in row['rho_pooled_rl_last10'])} "
            f"| {', '.join(_fmt(v, 2) for v in row['rho_pooled_logit_grad_rl_last10'])} "
            f"| {_fmt(_mean_of(row['strength_s_rl_mean']), 2)} |"
        )
    return rows, "\n".join(lines) + "\n"
