"""``run``: load a model, get responses (generate or read), score every response token,
write tokens.csv, summary.json and the plots; ``compare``: several runs side by side."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..models import Loaded, describe, load_model
from ..progress import Progress, is_terminal
from . import analysis, plots
from .generate import Response, generate_responses, read_prompts, read_responses, write_responses
from .score import Scored, count_scored, score_responses

BASE_COLUMNS = ("response", "prompt_index", "sample", "position", "response_position", "token_id", "token_text", "entropy_bits")


@dataclass
class RunResult:
    """What ``run`` wrote: the summary (as in summary.json), the scored table, the
    responses, and the paths of its files."""

    summary: dict[str, Any]
    scored: Scored
    responses: list[Response]
    files: dict[str, str]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("corrpo", "torch", "transformers", "numpy"):
        module = sys.modules.get(name)
        version = getattr(module, "__version__", None)
        if version:
            out[name] = str(version)
    return out


def _progress_bar(total: int, desc: str, unit: str, enabled: bool) -> Progress:
    # A bar on a terminal; in a log, a line a minute.
    return Progress(total, desc=desc, unit=unit, enabled=enabled, smoothing=0.1)


def write_tokens_csv(path: Path, scored: Scored, tokenizer: Any, *, per_block_columns: bool = False) -> Path:
    cols = scored.columns
    header = list(BASE_COLUMNS) + list(scored.measures)
    blocks: list[tuple[str, int]] = []
    if per_block_columns:
        for m, values in scored.per_block.items():
            blocks += [(m, b) for b in range(values.shape[1])]
        header += [f"{m}.block{b}" for m, b in blocks]
    texts = {int(t): tokenizer.decode([int(t)]) for t in np.unique(cols["token_id"])}
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i in range(len(scored)):
            row: list[Any] = [int(cols[c][i]) for c in BASE_COLUMNS[:6]]
            row.append(texts[int(cols["token_id"][i])])
            row.append(repr(float(cols["entropy_bits"][i])))
            row += [repr(float(cols[m][i])) for m in scored.measures]
            row += [repr(float(scored.per_block[m][i, b])) for m, b in blocks]
            w.writerow(row)
    return path


def read_tokens_csv(path: str | Path) -> dict[str, np.ndarray]:
    """tokens.csv as columns (ints for the index columns, float64 for the rest, text as str)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    out: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        values = [r[j] for r in body]
        if name == "token_text":
            out[name] = np.array(values, dtype=object)
        elif name in BASE_COLUMNS[:6]:
            out[name] = np.array([int(v) for v in values], dtype=np.int64)
        else:
            out[name] = np.array([float(v) for v in values], dtype=np.float64)
    return out


def check_settings(
    *,
    objective: str,
    measures: list[str] | tuple[str, ...] | None,
    estimator: str,
    dtype: str,
    device: str,
    positions_stride: int,
    k: int | None,
    chunk_size: int | None = None,
) -> None:
    """Settings checked before anything slow happens: the measure's through
    ``corrpo.gradients.check_settings``, then the tool's own."""
    from ..gradients import check_settings as check_measure
    from ..models import DTYPES, resolve_device

    check_measure(objective=objective, estimator=estimator, measures=measures, k=k, chunk_size=chunk_size)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    resolve_device(device)
    if positions_stride < 1:
        raise ConfigError(f"positions stride must be >= 1, got {positions_stride}")


def run(
    model: str | Path | Loaded,
    out: str | Path,
    *,
    prompts: str | Path | None = None,
    responses: str | Path | None = None,
    generate: int = 1,
    objective: str = "logit",
    measures: list[str] | tuple[str, ...] | None = None,
    estimator: str = "exact",
    k: int | None = None,
    positions_stride: int = 1,
    device: str = "auto",
    dtype: str = "float32",
    threads: int = 0,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
    random_init: bool = False,
    chat_template: bool = True,
    bootstrap: int = 1000,
    min_tokens: int = 8,
    per_block_columns: bool = False,
    chunk_size: int | None = None,
    label: str | None = None,
    progress: bool = True,
    print_table: bool = True,
) -> RunResult:
    """Fingerprint one model: responses from ``prompts`` (``generate`` per prompt) or
    ``responses`` (a responses.jsonl), every ``positions_stride``-th response token
    scored by ``corrpo.gradients.token_strengths``; writes into ``out``: responses.jsonl,
    tokens.csv, summary.json, scatter.png, per_block.png, proxies.png (when there is a
    measure to compare with the exact one)."""
    import torch

    wall = time.perf_counter()
    if (prompts is None) == (responses is None):
        raise ConfigError("give exactly one of prompts (to generate responses) or responses (to score them)")
    if threads < 0:
        raise ConfigError(f"threads must be >= 0 (0 leaves torch's default), got {threads}")
    if bootstrap < 0:
        raise ConfigError(f"bootstrap resamples must be >= 0, got {bootstrap}")
    check_settings(
        objective=objective, measures=measures, estimator=estimator, dtype=dtype, device=device,
        positions_stride=positions_stride, k=k, chunk_size=chunk_size,
    )
    if threads:
        torch.set_num_threads(threads)
    outdir = Path(out)
    # Read the inputs before the (slow) model load, so that a bad file fails at once.
    prompt_list = read_prompts(prompts) if prompts is not None else None
    if responses is not None and not Path(responses).is_file():
        raise ConfigError(f"responses file {str(responses)!r} does not exist")
    # transformers' loading bars are tqdm's: in a log, carriage-return records.
    loading_bars = progress and is_terminal(sys.stderr)
    loaded = model if isinstance(model, Loaded) else load_model(model, device=device, dtype=dtype, random_init=random_init, seed=seed, progress=loading_bars)
    # Prompts are encoded, responses and tokens.csv decoded: text both ways.
    tokenizer = loaded.require_tokenizer("corrpo fingerprint (it encodes prompts and decodes responses and tokens.csv)")
    outdir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}

    gen_s = 0.0
    if prompt_list is not None:
        t0 = time.perf_counter()
        bar = _progress_bar(len(prompt_list) * generate, "generating", "resp", progress)
        try:
            got = generate_responses(
                loaded.model,
                tokenizer,
                prompt_list,
                n=generate,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=seed,
                chat_template=chat_template,
                source=str(prompts),
                progress=bar.update,
            )
        finally:
            bar.close()
        gen_s = time.perf_counter() - t0
    else:
        got = read_responses(responses, tokenizer, chat_template=chat_template)
    write_responses(outdir / "responses.jsonl", got)
    files["responses"] = str(outdir / "responses.jsonl")

    total = count_scored(got, max(positions_stride, 1), k if estimator == "subsample" else None)
    bar = _progress_bar(total, "scoring", "tok", progress)
    try:
        scored = score_responses(
            loaded.model,
            got,
            objective=objective,
            measures=measures,
            estimator=estimator,
            k=k,
            stride=positions_stride,
            seed=seed,
            chunk_size=chunk_size,
            progress=bar.update,
        )
    finally:
        bar.close()

    t0 = time.perf_counter()
    stats = analysis.analyze(scored, n_boot=bootstrap, seed=seed, min_tokens=min_tokens)
    analysis_s = time.perf_counter() - t0
    files["tokens"] = str(write_tokens_csv(outdir / "tokens.csv", scored, tokenizer, per_block_columns=per_block_columns))
    name = label or (loaded.name + (" (random init)" if loaded.random_init else ""))
    title = f"{name}, {objective} objective, {len(scored)} tokens / {len(got)} responses"
    files["scatter"] = str(plots.scatter(outdir / "scatter.png", scored.columns, scored.measures, stats["measures"], title))
    for key, made in (
        ("per_block", plots.per_block(outdir / "per_block.png", stats["per_block"], title)),
        ("proxies", plots.proxies(outdir / "proxies.png", scored.columns, stats["proxies"], title)),
    ):
        if made is not None:
            files[key] = str(made)
    wall_s = time.perf_counter() - wall
    summary = {
        "label": name,
        "model": describe(loaded),
        "settings": {
            "source": "generate" if prompts is not None else "responses",
            "prompts": None if prompts is None else str(prompts),
            "responses": None if responses is None else str(responses),
            "generate": generate if prompts is not None else None,
            "max_new_tokens": max_new_tokens if prompts is not None else None,
            "temperature": temperature if prompts is not None else None,
            "chat_template": chat_template,
            "objective": scored.objective,
            "estimator": scored.estimator,
            "measures": list(scored.measures),
            "k": k,
            "positions_stride": positions_stride,
            "device": str(next(loaded.model.parameters()).device),
            "dtype": dtype,
            "threads": torch.get_num_threads(),
            "seed": seed,
            "random_init": loaded.random_init,
        },
        "n_responses": len(got),
        "n_tokens": len(scored),
        "n_response_tokens": int(sum(len(r.response_ids) for r in got)),
        "mean_entropy_bits": float(np.mean(scored.columns["entropy_bits"])) if len(scored) else None,
        "statistics": stats,
        "timing": {
            "generate_s": gen_s,
            "score_s": scored.seconds,
            "score_s_per_token": scored.seconds / len(scored) if len(scored) else None,
            "analysis_s": analysis_s,
            "wall_s": wall_s,
        },
        "versions": _versions(),
        "files": {k: os.path.basename(v) for k, v in files.items()},
    }
    (outdir / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable) + "\n")
    files["summary"] = str(outdir / "summary.json")
    if print_table:
        print_summary(summary, outdir)
    return RunResult(summary, scored, got, files)


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return None if math.isnan(x) else float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _cell(view: dict[str, Any] | None, extra: str | None = None, *, two_lines: bool = False) -> str:
    """``rho [lo,hi] (n)`` (Markdown), or ``rho (n)`` above ``[lo,hi]`` (``two_lines``: a
    console table, whose columns then fit 80 characters without breaking a CI)."""
    if not view or view.get("rho") is None:
        return "n/a"
    rho = f"{view['rho']:+.3f}"
    n = f" ({view[extra]})" if extra and view.get(extra) is not None else ""
    ci = f"[{view['ci'][0]:+.2f},{view['ci'][1]:+.2f}]" if view.get("ci") else ""
    if two_lines:
        return rho + n + (f"\n{ci}" if ci else "")
    return rho + (f" {ci}" if ci else "") + n


def _ci_column(table: Any, header: str) -> None:
    # no_wrap: a CI is read whole or not at all.
    table.add_column(header, no_wrap=True)


def summary_table(summary: dict[str, Any]) -> Any:
    """The rich table of the end of a run: per measure, Spearman pooled, within responses
    and over unique token ids, each with its CI, and Pearson pooled."""
    from rich.table import Table

    stats = summary["statistics"]
    s = summary["settings"]
    table = Table(
        title=f"{summary['label']}: rho(H, strength), {s['objective']} objective, {s['estimator']} estimator, "
        f"{summary['n_tokens']} tokens / {summary['n_responses']} responses",
        title_style="bold",
        caption="Spearman [95% CI over responses]; n: responses with a rho, unique token ids",
    )
    table.add_column("measure", no_wrap=True)
    _ci_column(table, "pooled")
    table.add_column("Pearson", no_wrap=True)
    _ci_column(table, "within (n)")
    _ci_column(table, "unique ids (n)")
    for m, st in stats["measures"].items():
        sp = st["spearman"]
        table.add_row(
            m,
            _cell(sp["pooled"], two_lines=True),
            _cell({"rho": st["pearson"]["pooled"]["rho"]}),
            _cell(sp["within"], "n_defined", two_lines=True),
            _cell(sp["unique"], "n_ids", two_lines=True),
        )
    return table


def print_summary(summary: dict[str, Any], outdir: Path | None = None, console: Any = None) -> None:
    """``summary_table``, how each measure ranks tokens against the reference, and the time."""
    from rich.console import Console

    console = console or Console()
    stats = summary["statistics"]
    console.print(summary_table(summary))
    ref = stats["proxies"]["reference"]
    versus = [f"{m} {v:+.3f}" for m, v in stats["proxies"]["spearman_vs_reference"].items() if m != ref and v is not None]
    if ref and versus:
        console.print(f"per token, Spearman with {ref}: {', '.join(versus)}")
    if stats["bootstrap"].get("note"):
        console.print(f"note: {stats['bootstrap']['note']}")
    t = summary["timing"]
    per = t["score_s_per_token"]
    console.print(
        f"scoring {t['score_s']:.1f} s"
        + (f" ({per:.3f} s/token)" if per else "")
        + f", wall {t['wall_s']:.1f} s"
        + (f"; files in {outdir}" if outdir else "")
    )


# ---- compare ----------------------------------------------------------------------------------


def load_run(directory: str | Path) -> dict[str, Any]:
    d = Path(directory)
    path = d / "summary.json"
    if not path.is_file():
        raise ConfigError(f"{str(d)!r} holds no summary.json (not a corrpo fingerprint output directory)")
    try:
        summary = json.loads(path.read_text())
        summary["statistics"]["measures"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a fingerprint summary ({err})") from None
    return {"dir": str(d), "label": summary.get("label") or d.name, "summary": summary}


def compare(dirs: list[str | Path], out: str | Path, *, print_table: bool = True) -> dict[str, str]:
    """compare.png and compare.md from several ``run`` output directories."""
    if not dirs:
        raise ConfigError("compare needs at least one run directory")
    runs = [load_run(d) for d in dirs]
    labels = [r["label"] for r in runs]
    for i, r in enumerate(runs):  # labels must tell runs apart
        if labels.count(r["label"]) > 1:
            r["label"] = f"{r['label']} ({Path(r['dir']).name or i})"
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    png = plots.compare(outdir / "compare.png", runs)
    md = outdir / "compare.md"
    md.write_text(compare_markdown(runs))
    if print_table:
        from rich.console import Console

        console = Console()
        console.print(compare_table(runs))
        console.print(f"wrote {png} and {md}")
    return {"png": str(png), "md": str(md)}


def compare_table(runs: list[dict[str, Any]]) -> Any:
    """What ``compare`` prints: per run (one table each, titled by its label, so that a long
    label takes no width from the CIs) and measure, Spearman pooled, within responses and over
    unique token ids, each with its CI."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    tables = []
    for r in runs:
        table = Table(title=r["label"], title_justify="left", title_style="bold")
        table.add_column("measure", no_wrap=True, min_width=len("head_logit_grad"))  # the same width in every table
        for name in ("pooled", "within (n)", "unique ids (n)"):
            _ci_column(table, name)
        for m, v in r["summary"]["statistics"]["measures"].items():
            sp = v["spearman"]
            table.add_row(
                m,
                _cell(sp["pooled"], two_lines=True),
                _cell(sp["within"], "n_defined", two_lines=True),
                _cell(sp["unique"], "n_ids", two_lines=True),
            )
        tables.append(table)
    return Group(Text("Spearman rho(H, strength) [95% CI over responses]", style="bold"), *tables)


def compare_markdown(runs: list[dict[str, Any]]) -> str:
    lines = [
        "# Entropy-gradient fingerprints",
        "",
        "Spearman rho(H, strength) [95% bootstrap CI over responses]; n = defined responses / unique ids.",
        "",
        "| run | model | objective | estimator | measure | tokens | pooled | Pearson pooled | within (n) | unique ids (n) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        s = r["summary"]
        st = s["statistics"]["measures"]
        for m, v in st.items():
            sp = v["spearman"]
            lines.append(
                f"| {r['label']} | {s['model'].get('name', '')}{' (random init)' if s['model'].get('random_init') else ''} "
                f"| {s['settings']['objective']} | {s['settings']['estimator']} | {m} | {v['n_tokens']} "
                f"| {_cell(sp['pooled'])} | {_cell({'rho': v['pearson']['pooled']['rho']})} "
                f"| {_cell(sp['within'], 'n_defined')} | {_cell(sp['unique'], 'n_ids')} |"
            )
    lines += ["", "Runs:", ""]
    lines += [f"- {r['label']}: `{r['dir']}`" for r in runs]
    return "\n".join(lines) + "\n"


__all__ = [
    "RunResult", "compare", "compare_markdown", "compare_table", "load_run", "print_summary", "read_tokens_csv", "run",
    "summary_table", "write_tokens_csv",
]  # fmt: skip
