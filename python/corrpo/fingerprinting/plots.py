"""The fingerprint's figures (matplotlib, Agg): scatter.png, per_block.png, proxies.png, and
compare.png for several runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

LABELS = {
    "l1_mean": "L1, mean over blocks",
    "nuclear_qkvo": "nuclear norm of q/k/v/o, mean over blocks",
    "frobenius": "Frobenius norm, all block parameters",
    "logit_grad": "logit gradient ||p - e_y||",
    "head_logit_grad": "||p - e_y|| * ||h||",
}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _grid(n: int, width: float = 5.2, height: float = 4.2) -> tuple[Any, Any, list[Any]]:
    plt = _plt()
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return plt, fig, flat[:n]


def _positive_log(ax: Any, values: np.ndarray, axis: str = "y") -> None:
    finite = values[np.isfinite(values)]
    if len(finite) and np.all(finite > 0) and finite.max() / finite.min() > 3:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def scatter(path: Path, columns: dict[str, np.ndarray], measures: tuple[str, ...], stats: dict[str, Any], title: str) -> Path:
    """H (bits) against each measure, one point per token, coloured by response."""
    plt, fig, axes = _grid(len(measures))
    h, resp = columns["entropy_bits"], columns["response"]
    n_resp = max(int(resp.max()) + 1, 1) if len(resp) else 1
    cmap = plt.get_cmap("tab10" if n_resp <= 10 else "viridis")
    colours = cmap((resp % 10) if n_resp <= 10 else resp / max(n_resp - 1, 1))
    for ax, m in zip(axes, measures):
        y = columns[m]
        ax.scatter(h, y, c=colours, s=12, alpha=0.75, linewidths=0)
        _positive_log(ax, y)
        sp = stats[m]["spearman"]
        ax.set_title(
            f"{m}: rho = {_fmt(sp['pooled']['rho'])}{_ci(sp['pooled'].get('ci'))}\n"
            f"within {_fmt(sp['within']['rho'])}, unique ids {_fmt(sp['unique']['rho'])}",
            fontsize=10,
        )
        ax.set_xlabel("entropy H (bits)")
        ax.set_ylabel(LABELS.get(m, m), fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title} - Spearman rho(H, strength), pooled [95% CI over responses]; colour = response", fontsize=11)
    return _save(fig, path)


def per_block(path: Path, blocks: dict[str, Any], title: str) -> Path | None:
    """Pooled Spearman rho(H, block term) against block index, one line per measure."""
    measures = [m for m in blocks if m != "block_names"]
    if not measures:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for m in measures:
        rhos = np.array([np.nan if r is None else r for r in blocks[m]], dtype=float)
        ax.plot(np.arange(len(rhos)), rhos, marker="o", ms=4, label=m)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylim(-1.05, 1.05)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder block")
    ax.set_ylabel("Spearman rho(H, block term)")
    ax.set_title(f"{title}\nSpearman rho(H, each block's term of the strength), pooled over tokens", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return _save(fig, path)


def proxies(path: Path, columns: dict[str, np.ndarray], proxy: dict[str, Any], title: str) -> Path | None:
    """Each other measure against the reference (exact parameter-space) measure."""
    ref = proxy.get("reference")
    others = list(proxy.get("spearman_vs_reference", {}))
    if ref is None or not others:
        return None
    plt, fig, axes = _grid(len(others))
    for ax, m in zip(axes, others):
        ax.scatter(columns[ref], columns[m], s=12, alpha=0.7, c=columns["entropy_bits"], cmap="viridis", linewidths=0)
        _positive_log(ax, columns[ref], "x")
        _positive_log(ax, columns[m], "y")
        ax.set_xlabel(f"{ref} (reference)")
        ax.set_ylabel(m)
        ax.set_title(f"{m} vs {ref}: Spearman {_fmt(proxy['spearman_vs_reference'][m])}", fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title} - how well each measure tracks {ref}; colour = entropy (bits)", fontsize=11)
    return _save(fig, path)


def compare(path: Path, runs: list[dict[str, Any]]) -> Path:
    """rho(H, measure) with its CI for each run and measure: pooled, within responses,
    unique ids side by side (the paper's base-vs-reasoning view)."""
    plt = _plt()
    measures: list[str] = []
    for run in runs:
        for m in run["summary"]["statistics"]["measures"]:
            if m not in measures:
                measures.append(m)
    views = (("pooled", "pooled over tokens"), ("within", "mean within responses"), ("unique", "over unique token ids"))
    fig, axes = plt.subplots(1, 3, figsize=(5.5 * 3, 4.8), sharey=True)
    width = 0.8 / max(len(runs), 1)
    x = np.arange(len(measures))
    for ax, (view, name) in zip(axes, views):
        for i, run in enumerate(runs):
            stats = run["summary"]["statistics"]["measures"]
            rhos, lo, hi = [], [], []
            for m in measures:
                v = stats.get(m, {}).get("spearman", {}).get(view, {})
                r = v.get("rho")
                ci = v.get("ci")
                rhos.append(np.nan if r is None else r)
                lo.append(0 if (r is None or not ci) else r - ci[0])
                hi.append(0 if (r is None or not ci) else ci[1] - r)
            xs = x + (i - (len(runs) - 1) / 2) * width
            ax.bar(xs, rhos, width, yerr=[lo, hi], capsize=3, label=run["label"], alpha=0.85)
            for xi, r in zip(xs, rhos):
                if np.isnan(r):  # undefined (too few tokens per response, ...): say so
                    ax.text(xi, 0.02, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels(measures, rotation=20, ha="right", fontsize=9)
        ax.set_title(name, fontsize=10)
        ax.set_ylim(-1.05, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("Spearman rho(H, strength) [95% CI]")
    # Below the panels, so it never hides a bar.
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(len(runs), 4), fontsize=9)
    fig.suptitle("Entropy-gradient fingerprint by model and measure", fontsize=11)
    fig.tight_layout(rect=(0, 0.06 * ((len(runs) + 3) // 4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["compare", "per_block", "proxies", "scatter"]
