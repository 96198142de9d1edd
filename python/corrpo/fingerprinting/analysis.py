"""The statistics of a fingerprint: rho(entropy, strength) pooled over tokens, within
responses (mean of per-response rho) and over unique token ids, Spearman and Pearson, each
with a 95% bootstrap CI over responses; agreement between measures; rho per block.

All correlations come from corrpo's native functions (``corrpo.correlation``,
``corrpo.fingerprint``), the same ones the reward server uses.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..correlation import correlation
from ..correlation import fingerprint as batch_fingerprint

METHODS = ("spearman", "pearson")
VIEWS = ("pooled", "within", "unique")
#: The parameter-space measure the cheaper ones are compared with, in order of preference.
REFERENCE_ORDER = ("l1_mean", "nuclear_qkvo", "frobenius")


def _num(x: Any) -> float | None:
    """JSON-friendly float: None for NaN / missing."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _figures(h: np.ndarray, s: np.ndarray, ids: np.ndarray, lengths: np.ndarray, method: str, min_tokens: int) -> dict[str, Any]:
    fp = batch_fingerprint(h, s, ids, lengths, method=method, min_tokens=min_tokens)
    return {
        "pooled": fp.rho_pooled,
        "pooled_reason": fp.rho_pooled_reason,
        "within": fp.rho_rollout_mean if fp.rho_rollout_mean is not None else math.nan,
        "n_defined": fp.n_rollouts_defined,
        "unique": fp.rho_unique if fp.rho_unique is not None else math.nan,
        "unique_reason": fp.rho_unique_reason,
        "n_ids": fp.n_unique_tokens,
    }


def _segments(response: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Index arrays of each response's tokens (responses in order of first appearance)."""
    order, starts = np.unique(response, return_index=True)
    segs = [np.flatnonzero(response == r) for r in order[np.argsort(starts)]]
    return segs, np.array([len(s) for s in segs], dtype=np.int64)


def bootstrap_indices(n_responses: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_responses] response draws with replacement (seeded)."""
    rng = np.random.default_rng([seed, 0xB007])
    return rng.integers(0, n_responses, size=(n_boot, n_responses))


def _ci(samples: np.ndarray, level: float) -> tuple[list[float] | None, int]:
    ok = samples[~np.isnan(samples)]
    if len(ok) < 2:
        return None, int(len(ok))
    a = (1 - level) / 2
    lo, hi = np.quantile(ok, [a, 1 - a])
    return [float(lo), float(hi)], int(len(ok))


def correlations(
    entropy_bits: np.ndarray,
    strength: np.ndarray,
    token_ids: np.ndarray,
    response: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    min_tokens: int = 8,
    level: float = 0.95,
) -> dict[str, Any]:
    """rho(H, strength) pooled, within responses and over unique ids, for Spearman and
    Pearson, each with a percentile bootstrap CI over responses (resampled with
    replacement; a response drawn twice counts twice). Tokens whose strength is not
    finite are left out. CIs are None with fewer than 2 responses."""
    keep = np.isfinite(strength) & np.isfinite(entropy_bits)
    h, s, ids, resp = entropy_bits[keep], strength[keep], token_ids[keep], response[keep]
    segs, lengths = _segments(resp)
    n_resp = len(segs)
    out: dict[str, Any] = {
        "n_tokens": int(len(h)),
        "n_responses": n_resp,
        "mean_strength": _num(np.mean(s)) if len(s) else None,
        "mean_entropy_bits": _num(np.mean(h)) if len(h) else None,
    }
    if len(h) == 0:
        for method in METHODS:
            out[method] = {v: {"rho": None, "ci": None} for v in VIEWS}
        return out
    order = np.concatenate(segs)
    h, s, ids = h[order], s[order], ids[order]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    draws = bootstrap_indices(n_resp, n_boot, seed) if n_resp >= 2 and n_boot > 0 else None
    spans = [np.arange(a, a + n) for a, n in zip(starts, lengths)]
    resamples = [] if draws is None else [(np.concatenate([spans[r] for r in pick]), lengths[pick]) for pick in draws]
    for method in METHODS:
        point = _figures(h, s, ids, lengths, method, min_tokens)
        section: dict[str, Any] = {
            "pooled": {"rho": _num(point["pooled"]), "reason": point["pooled_reason"]},
            "within": {"rho": _num(point["within"]), "n_defined": point["n_defined"], "n_responses": n_resp},
            "unique": {"rho": _num(point["unique"]), "n_ids": point["n_ids"], "reason": point["unique_reason"]},
        }
        if draws is not None:
            boot = np.full((len(draws), 3), np.nan)
            for b, (idx, spans_b) in enumerate(resamples):
                f = _figures(h[idx], s[idx], ids[idx], spans_b, method, min_tokens)
                boot[b] = (f["pooled"], f["within"], f["unique"])
            for j, view in enumerate(VIEWS):
                ci, n_ok = _ci(boot[:, j], level)
                section[view]["ci"] = ci
                section[view]["n_boot_defined"] = n_ok
        else:
            for view in VIEWS:
                section[view]["ci"] = None
        out[method] = section
    return out


def proxy_agreement(columns: dict[str, np.ndarray], measures: tuple[str, ...]) -> dict[str, Any]:
    """Spearman between every pair of measures over tokens (pooled), and of each measure
    with the reference (the first parameter-space measure computed)."""
    reference = next((m for m in REFERENCE_ORDER if m in measures), None)
    matrix: dict[str, dict[str, float | None]] = {}
    for a in measures:
        matrix[a] = {}
        for b in measures:
            x, y = columns[a], columns[b]
            keep = np.isfinite(x) & np.isfinite(y)
            matrix[a][b] = _num(correlation(x[keep], y[keep], method="spearman")) if keep.sum() >= 2 else None
    vs = {m: matrix[reference][m] for m in measures if m != reference} if reference else {}
    return {"reference": reference, "spearman_vs_reference": vs, "spearman_matrix": matrix}


def per_block(entropy_bits: np.ndarray, per_block_values: dict[str, np.ndarray], block_names: tuple[str, ...]) -> dict[str, Any]:
    """Pooled Spearman of H with each block's term, per measure."""
    out: dict[str, Any] = {"block_names": list(block_names)}
    for m, values in per_block_values.items():
        rhos = []
        for b in range(values.shape[1]):
            col = values[:, b]
            keep = np.isfinite(col) & np.isfinite(entropy_bits)
            rhos.append(_num(correlation(entropy_bits[keep], col[keep])) if keep.sum() >= 2 else None)
        out[m] = rhos
    return out


def analyze(scored: Any, *, n_boot: int = 1000, seed: int = 0, min_tokens: int = 8) -> dict[str, Any]:
    """The statistics section of summary.json for a ``Scored`` table."""
    cols = scored.columns
    measures = {
        m: correlations(
            cols["entropy_bits"], cols[m], cols["token_id"], cols["response"], n_boot=n_boot, seed=seed, min_tokens=min_tokens
        )
        for m in scored.measures
    }
    n_resp = len(scored.lengths)
    note = None
    if n_resp < 2:
        note = "one response: no bootstrap over responses (CIs are null)"
    elif n_resp < 10:
        note = f"only {n_resp} responses: a bootstrap over so few responses gives crude CIs"
    return {
        "bootstrap": {"resamples": n_boot, "level": 0.95, "over": "responses", "seed": seed, "min_tokens": min_tokens, "note": note},
        "measures": measures,
        "proxies": proxy_agreement(cols, scored.measures),
        "per_block": per_block(cols["entropy_bits"], scored.per_block, scored.block_names),
    }


__all__ = ["METHODS", "VIEWS", "analyze", "bootstrap_indices", "correlations", "per_block", "proxy_agreement"]
