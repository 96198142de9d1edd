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


# The paper's figures (arXiv 2605.17770; SPEC 1), quoted with their statistic, model and checkpoints. They
# are Spearman over unique token ids of nuclear_qkvo, so a run's pooled rho of l1_mean is not set beside
# them as a number: the plots draw no line for them and the reading names them as another statistic.
PAPER_FIGURES = (
    "Spearman over unique token ids of the Q/K/V/O nuclear norm, Llama-8B: +0.036 base, -0.468 after 200 SFT "
    "steps on long reasoning traces, -0.606 after 8000, -0.649 after RL"
)


# Why the binomial noise quoted beside an accuracy is not the whole error: one trained model is resampled.
RUN_TO_RUN = (
    "That noise is of one trained model; the same seed trains another model on another CPU (docs/results.md: "
    "held-out 0.289 after SFT on an AMD EPYC, 0.027 on an Intel Xeon), a larger variation."
)


def _paragraph(text: str) -> str:
    import textwrap

    return textwrap.fill(text, width=100, break_on_hyphens=False)


def _noise_points(accuracy: float, problems: int) -> float:
    """Half the 95% binomial interval of a held-out accuracy, in points."""
    return 196 * math.sqrt(max(accuracy * (1 - accuracy), 1e-4) / problems)


def _measured(summary: dict[str, Any], config: dict[str, Any], rl: bool = True) -> list[str]:
    """What S and G are, and what rho(H, S) came to against the paper's sign (through SFT
    alone without ``rl``, for a study whose arms may measure S in RL differently)."""
    if config["strength"] == "logit_grad":
        return [
            "S is G here (--strength logit_grad): the logit-space norm ||p - onehot(y)||, not the paper's measure; on "
            "a trained model's own samples its rho with H is pulled towards +1 (E[G^2] = 1 - sum p^2 rises with H). "
            "--strength exact, subsample or local measures the paper's S."
        ]
    how = f", by {config['strength']} in RL" if rl else ""
    parts = [
        f"S is the paper's measure, l1_mean: per token, the gradient of the target {config['objective']} with respect "
        f"to the weights (exact on the model's own solutions at each SFT evaluation{how}). "
        "G is logit_grad, the logit-space norm, logged for comparison: on a trained model's own samples its rho "
        "with H is pulled towards +1 (E[G^2] = 1 - sum p^2 rises with H)."
    ]
    first, last, in_rl = (summary.get(k) for k in ("rho_pooled_samples_sft_first", "rho_pooled_samples_sft_last", "rho_pooled_rl_last10"))
    if last is None:
        return parts
    figures = f"rho(H, S) on the model's own solutions: {last:+.2f} at the end of SFT"
    if first is not None:
        figures += f" ({first:+.2f} at its first evaluation)"
    if rl and in_rl is not None:
        figures += f", {in_rl:+.2f} on the RL rollouts (last 10 steps)"
    if last > 0:
        sign = "Positive: the tokens the model is unsure of have the larger gradient, the opposite of the paper's sign."
    else:
        sign = "Negative: the sign of the paper's inversion."
    compare = (
        f"This is a pooled rho of l1_mean; the paper's figures are another statistic ({PAPER_FIGURES}), so compare "
        "signs, not values (docs/results.md sets like against like)."
    )
    return [*parts, f"{figures}. {sign} {compare}"]


def reading(summary: dict[str, Any], config: dict[str, Any]) -> str:
    """What a run measured and how to read it, printed under its table: the figures alone
    (rho near +1, no inversion) read as a contradiction of the paper."""
    parts = _measured(summary, config)
    after_sft, end = summary.get("held_out_accuracy_after_sft"), summary.get("held_out_accuracy")
    if summary.get("rl_steps") and after_sft is not None and end is not None:
        problems = config["eval_size"]
        parts.append(
            f"Held-out accuracy (greedy, {problems} problems, about ±{_noise_points(end, problems):.0f} points of "
            f"binomial noise): {after_sft:.3f} after SFT, {end:.3f} after {summary['rl_steps']} RL steps of "
            f"{config['method']}. Whether that beats GRPO takes a GRPO run from the same SFT model: "
            f"corrpo-train study --arms grpo corrpo (docs/results.md). {RUN_TO_RUN}"
        )
    return "\n".join(_paragraph(p) for p in parts)


def study_reading(rows: list[dict[str, Any]], study: dict[str, dict[int, list[dict[str, Any]]]], config: dict[str, Any]) -> str:
    """``reading`` for a study: S and rho(H, S) of its first run, then each arm's held-out
    accuracy against GRPO's, paired by seed (a seed's arms start from one SFT model)."""
    first = next(iter(next(iter(study.values())).values()))
    parts = _measured(summarize(first), config, rl=False)
    problems = config["eval_size"]
    grpo = next((row for row in rows if row["arm"] == "grpo"), None)
    seeds = len(rows[0]["seeds"])
    noise = _noise_points(rows[0]["held_out_final_mean"], problems)
    arms = []
    for row in rows:
        arm = f"{row['arm']} {row['held_out_final_mean']:.3f}"
        if grpo is not None and row is not grpo:
            diffs = [100 * (a - b) for a, b in zip(row["held_out_final"], grpo["held_out_final"])]
            arm += f" ({np.mean(diffs):+.1f} points against grpo"
            arm += f"; per seed {', '.join(f'{d:+.1f}' for d in diffs)})" if seeds > 1 else ")"
        arms.append(arm)
    parts.append(
        f"Held-out accuracy after RL ({'one seed' if seeds == 1 else f'mean of {seeds} seeds'}; greedy, {problems} "
        f"problems, about ±{noise:.0f} points of binomial noise each; after SFT "
        f"{', '.join(_fmt(v) for v in rows[0]['held_out_after_sft'])}): {'; '.join(arms)}. {RUN_TO_RUN}"
    )
    return "\n".join(_paragraph(p) for p in parts)


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


def summary_table(summary: dict[str, Any], title: str) -> Any:
    """The rich table of a run's figures (``SUMMARY_ROWS``)."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right", no_wrap=True)
    for label, key in SUMMARY_ROWS:
        table.add_row(label, _fmt(summary.get(key)))
    return table


def study_console_table(rows: list[dict[str, Any]]) -> Any:
    """``study_table``'s rows as a rich table that fits 80 columns: one line per seed, so
    that no column holds a list and no ``mean ± std`` breaks (the seconds spent on S are
    in results.md and study.json)."""
    from rich.table import Table

    table = Table(
        title="Held-out accuracy (greedy), and pooled rho over the last 10 RL steps",
        caption="one line per seed; gain: the mean of end - after SFT; rho S, rho G: rho(H, S), rho(H, G)",
    )
    table.add_column("arm", overflow="fold")  # free text: the one column that may wrap
    for header in ("seed", "after SFT", "end", "mean ± std", "gain", "rho S", "rho G"):
        table.add_column(header, justify="right", no_wrap=header == "mean ± std")

    def per_seed(values: list[Any], digits: int = 3) -> str:
        return "\n".join(_fmt(v, digits) for v in values)

    for row in rows:
        table.add_row(
            row["arm"],
            per_seed(row["seeds"]),
            per_seed(row["held_out_after_sft"]),
            per_seed(row["held_out_final"]),
            f"{row['held_out_final_mean']:.3f} ± {row['held_out_final_std']:.3f}",
            f"{row['gain_mean']:+.3f}",
            per_seed(row["rho_pooled_rl_last10"], 2),
            per_seed(row["rho_pooled_logit_grad_rl_last10"], 2),
        )
    return table


def print_table(table: Any) -> None:
    from rich.console import Console

    Console().print(table)


# One color per quantity in every panel of a run.
HELD_OUT, SAMPLED, REGULARIZED, RHO_S, RHO_G, RHO_G_DATA = "#ff7f0e", "#1f77b4", "#9467bd", "#2ca02c", "#555555", "#aaaaaa"
READING = "rho > 0: the tokens the model is unsure of have the larger gradient; the paper's inversion is rho < 0"


def _steps(records: list[dict[str, Any]], key: str, phase: str) -> tuple[np.ndarray, np.ndarray]:
    """``key`` over the steps of one phase, numbered from 1 within it."""
    pts = [(r["step"], r[key]) for r in records if r["phase"] == phase and r.get(key) is not None]
    if not pts:
        return np.empty(0), np.empty(0)
    x, y = zip(*pts)
    return np.asarray(x, float), np.asarray(y, float)


def _grid(records: list[dict[str, Any]]) -> tuple[Any, Any]:
    """Two rows (accuracy, rho) by two columns (SFT, RL), each phase on its own step axis so
    that a short RL phase is not squeezed beside a long SFT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9), constrained_layout=True)
    for row, what in enumerate(("accuracy", "pooled Spearman rho(H, strength)")):
        for col, phase in enumerate(("sft", "rl")):
            ax = axes[row, col]
            n = sum(1 for r in records if r["phase"] == phase)
            ax.set_title(f"{'SFT' if phase == 'sft' else 'RL'} ({n} steps): {what}")
            ax.set_xlabel(f"{'SFT' if phase == 'sft' else 'RL'} step")
            ax.grid(alpha=0.3)
            if n:
                ax.set_xlim(0, n * 1.02)
            if row == 1:
                ax.set_ylim(-1.05, 1.05)
                # No line for the paper's figures: they are over unique token ids, these curves are pooled.
                ax.axhline(0, color="black", lw=0.6)
            else:
                ax.set_ylim(-0.02, 1.02)
    return fig, axes


def _legend(ax: Any) -> None:
    """The legend below its panel, where it can hide no curve."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8, frameon=False)


def _save(fig: Any, path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    fig.suptitle(f"{title}\n{READING}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _smooth(y: np.ndarray, width: int) -> np.ndarray:
    if len(y) < width or width <= 1:
        return y
    kernel = np.ones(width) / width
    head = np.cumsum(y[: width - 1]) / np.arange(1, width)
    return np.concatenate([head, np.convolve(y, kernel, mode="valid")])


def _held_out_rl(records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Held-out accuracy through RL, starting at RL step 0 from the last SFT evaluation."""
    x, y = _steps(records, "eval_accuracy", "rl")
    start = _last(records, "eval_accuracy", "sft")
    if start is None:
        return x, y
    return np.concatenate([[0.0], x]), np.concatenate([[start], y])


def plot_run(records: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Accuracy and pooled rho(H, S) and rho(H, G) of one run, SFT and RL side by side, each
    phase on its own step axis."""
    return _save(run_figure(records), path, title)


def run_figure(records: list[dict[str, Any]]) -> Any:
    """The figure of ``plot_run``, unsaved."""
    fig, ((sft_acc, rl_acc), (sft_rho, rl_rho)) = _grid(records)
    x, y = _steps(records, "accuracy", "sft")
    sft_acc.plot(x, _smooth(y, 5), lw=1, color=SAMPLED, label="own samples, train prompts (5-step mean)")
    x, y = _steps(records, "eval_accuracy", "sft")
    sft_acc.plot(x, y, "o-", color=HELD_OUT, label="held-out, greedy")
    x, verifier = _steps(records, "reward_mean", "rl")
    rl_acc.plot(x, _smooth(verifier, 5), color=SAMPLED, label="verifier reward = rollout accuracy, sampled (5-step mean)")
    x, y = _steps(records, "reward_reg_mean", "rl")
    if len(y) and (len(y) != len(verifier) or np.any(y != verifier)):
        rl_acc.plot(x, _smooth(y, 5), color=REGULARIZED, label="r - coef * rho(H, S), sent to the advantages (5-step mean)")
        # r - coef * rho leaves [0, 1] on either side: above 1 exactly where rho < 0 (the paper's inversion).
        rl_acc.set_ylim(min(-0.02, float(y.min()) - 0.02), max(1.02, float(y.max()) + 0.02))
    x, y = _held_out_rl(records)
    rl_acc.plot(x, y, "o-", color=HELD_OUT, label="held-out, greedy (step 0: after SFT)")
    for key, label, style, color in (
        ("rho_pooled_samples", "rho(H, S), own samples (exact S)", "o-", RHO_S),
        ("rho_pooled_samples_logit_grad", "rho(H, G), own samples", "-", RHO_G),
        ("rho_pooled_logit_grad", "rho(H, G), written-out solutions", "-", RHO_G_DATA),
    ):
        x, y = _steps(records, key, "sft")
        if len(x):
            sft_rho.plot(x, y, style, lw=1, ms=4, color=color, label=label)
    for key, label, color in (
        ("rho_pooled", "rho(H, S), rollouts (S of --strength)", RHO_S),
        ("rho_pooled_logit_grad", "rho(H, G), rollouts", RHO_G),
    ):
        x, y = _steps(records, key, "rl")
        if len(x):
            rl_rho.plot(x, y, lw=1, color=color, label=label)
    for ax in (sft_acc, rl_acc, sft_rho, rl_rho):
        _legend(ax)
    return fig


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


def _band(
    ax: Any,
    runs: dict[int, list[dict[str, Any]]],
    key: str,
    color: str,
    phase: str,
    smooth: int = 1,
    style: str = "-",
    label: str | None = None,
    lw: float = 1.2,
) -> None:
    """Mean over seeds of ``key`` through ``phase``, with the band from the lowest seed to the highest."""
    series = [_steps(records, key, phase) for records in runs.values()]
    if not series or not len(series[0][0]):
        return
    n = min(len(s[0]) for s in series)
    x = series[0][0][:n]
    ys = np.stack([_smooth(s[1][:n], smooth) for s in series])
    ax.plot(x, ys.mean(axis=0), style, color=color, ms=4, lw=lw, alpha=0.5 if lw > 2 else 1.0, label=label)
    if len(ys) > 1:
        ax.fill_between(x, ys.min(axis=0), ys.max(axis=0), color=color, alpha=0.15, lw=0)


def plot_study(study: dict[str, dict[int, list[dict[str, Any]]]], path: Path, title: str) -> Path:
    """The shared SFT (held-out accuracy, rho on the model's own samples), then each arm's RL:
    rollout and held-out accuracy, and pooled rho(H, S) of each arm's S; means over seeds with
    the band from the lowest seed to the highest, one color per arm."""
    seeds = len(next(iter(study.values())))
    which = "one seed" if seeds == 1 else f"mean of {seeds} seeds; bands: lowest to highest seed"
    return _save(study_figure(study), path, f"{title} ({which})")


def study_figure(study: dict[str, dict[int, list[dict[str, Any]]]]) -> Any:
    """The figure of ``plot_study``, unsaved."""
    from matplotlib.lines import Line2D

    first = next(iter(study.values()))
    fig, ((sft_acc, rl_acc), (sft_rho, rl_rho)) = _grid(next(iter(first.values())))
    # Greys and green: colors no arm takes.
    _band(sft_acc, first, "eval_accuracy", COLORS["sft"], "sft", style="o-", label="held-out, greedy")
    _band(sft_rho, first, "rho_pooled_samples", RHO_S, "sft", style="o-", label="rho(H, S), own samples (exact S)")
    _band(sft_rho, first, "rho_pooled_samples_logit_grad", RHO_G_DATA, "sft", label="rho(H, G), own samples")
    rl_steps = sum(1 for r in next(iter(first.values())) if r["phase"] == "rl")
    smooth = max(1, min(9, rl_steps // 5))
    spare = iter(SPARE_COLORS * len(study))
    # GRPO, the baseline, first, wide and pale: an arm that ties it stays visible on top.
    arms = sorted(study, key=lambda arm: arm != "grpo")
    colors = {arm: COLORS[arm] if arm in COLORS else next(spare) for arm in arms}
    for arm in arms:
        lw = 3.5 if arm == "grpo" else 1.2
        _band(rl_acc, study[arm], "accuracy", colors[arm], "rl", smooth=smooth, lw=lw)
        held = [_held_out_rl(records) for records in study[arm].values()]
        n = min(len(x) for x, _ in held)
        if n:
            mean = np.mean([y[:n] for _, y in held], axis=0)
            rl_acc.plot(held[0][0][:n], mean, "o--", color=colors[arm], ms=4, lw=lw - 0.2, alpha=0.5 if arm == "grpo" else 1.0)
        _band(rl_rho, study[arm], "rho_pooled", colors[arm], "rl", lw=lw)
    grey = "#333333"
    rl_acc.legend(
        handles=[
            Line2D([], [], color=grey, label=f"rollouts, sampled ({smooth}-step mean)"),
            Line2D([], [], color=grey, ls="--", marker="o", ms=4, label="held-out, greedy (step 0: after SFT)"),
        ],
        loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8, frameon=False,
    )  # fmt: skip
    rl_rho.plot([], [], color=grey, label="rho(H, S), each arm's S")
    for ax in (sft_acc, sft_rho, rl_rho):
        _legend(ax)
    fig.legend(
        handles=[Line2D([], [], color=c, lw=3.5 if arm == "grpo" else 1.5, alpha=0.5 if arm == "grpo" else 1.0, label=arm) for arm, c in colors.items()],
        loc="outside lower center", ncol=min(6, len(colors)), fontsize=9, frameon=False, title="arms",
    )  # fmt: skip
    return fig


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
