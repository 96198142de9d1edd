"""rho(H, S) of the paper's measure through SFT, from a corrpo-train study's saved strengths:
pooled Spearman rho per evaluation step and seed, with a 95% bootstrap CI over rollouts;
a Markdown table on stdout and a plot.

    python examples/study/sft_fingerprint.py runs/study-paper [--out docs/img/study-sft-rho.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import stats


def pooled_rho(h: np.ndarray, s: np.ndarray) -> float:
    return float(stats.spearmanr(h, s)[0])


def bootstrap(h: np.ndarray, s: np.ndarray, lengths: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile CI of the pooled rho, resampling whole rollouts."""
    ends = np.cumsum(lengths)
    spans = [np.arange(e - n, e) for e, n in zip(ends, lengths)]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        idx = np.concatenate([spans[i] for i in rng.integers(0, len(spans), len(spans))])
        draws.append(pooled_rho(h[idx], s[idx]))
    lo, hi = np.nanpercentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path)
    parser.add_argument("--out", type=Path, help="plot path (default: <study>/sft-rho.png)")
    args = parser.parse_args()
    rows = []
    for folder in sorted(args.study.glob("seed*/sft/strengths")):
        seed = int(folder.parent.parent.name.removeprefix("seed"))
        for path in sorted(folder.glob("sft-*.npz")):
            d = np.load(path)
            step = int(path.stem.split("-")[1])
            rho_s = pooled_rho(d["entropy"], d["strength"])
            rho_g = pooled_rho(d["entropy"], d["grad_norm"])
            lo, hi = bootstrap(d["entropy"], d["strength"], d["lengths"])
            rows.append((seed, step, len(d["entropy"]), len(d["lengths"]), rho_s, lo, hi, rho_g))
    print("| seed | SFT step | tokens | rollouts | rho(H, l1_mean) [95% CI] | rho(H, G) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for seed, step, n, r, rho_s, lo, hi, rho_g in rows:
        print(f"| {seed} | {step} | {n} | {r} | {rho_s:+.2f} [{lo:+.2f}, {hi:+.2f}] | {rho_g:+.2f} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for seed in sorted({r[0] for r in rows}):
        mine = [r for r in rows if r[0] == seed]
        x = [r[1] for r in mine]
        line = ax.plot(x, [r[4] for r in mine], "o-", label=f"rho(H, l1_mean), seed {seed}")[0]
        ax.fill_between(x, [r[5] for r in mine], [r[6] for r in mine], color=line.get_color(), alpha=0.15, lw=0)
        ax.plot(x, [r[7] for r in mine], "--", color=line.get_color(), lw=1, label=f"rho(H, G), seed {seed}")
    ax.axhline(0, color="0.6", lw=0.6)
    ax.set_xlabel("SFT step")
    ax.set_ylabel("pooled Spearman rho on the model's own solutions")
    ax.set_title("The paper's measure (exact) and G through SFT, 95% bootstrap CI over rollouts", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    out = args.out or args.study / "sft-rho.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"\nplot: {out}")


if __name__ == "__main__":
    main()
