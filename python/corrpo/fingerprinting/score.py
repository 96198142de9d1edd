"""Scoring responses: ``corrpo.gradients.token_strengths`` over each prompt + response,
at the response's tokens, gathered into one per-token table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError
from .generate import Response


@dataclass
class Scored:
    """Per-token columns over all responses (in order), and what produced them.

    columns: ``response``, ``prompt_index``, ``sample``, ``position`` (index in the
    prompt + response ids), ``response_position`` (index in the response), ``token_id``,
    ``entropy_bits`` and one float64 array per measure. per_block: measure -> [N, blocks].
    lengths: scored tokens per response.
    """

    columns: dict[str, np.ndarray]
    measures: tuple[str, ...]
    lengths: np.ndarray
    per_block: dict[str, np.ndarray] = field(default_factory=dict)
    block_names: tuple[str, ...] = ()
    objective: str = "logit"
    estimator: str = "exact"
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.columns["entropy_bits"])


def scored_positions(response: Response, stride: int) -> list[int]:
    """Indices (in prompt + response ids) of the response tokens scored: every
    ``stride``-th, starting with the first."""
    start = len(response.prompt_ids)
    return [start + j for j in range(0, len(response.response_ids), stride)]


def count_scored(responses: list[Response], stride: int, k: int | None = None) -> int:
    """Tokens that will be scored (at most ``k`` per response when subsampling)."""
    counts = (len(range(0, len(r.response_ids), stride)) for r in responses)
    return sum(counts if k is None else (min(k, c) for c in counts))


def score_responses(
    model: Any,
    responses: list[Response],
    *,
    objective: str = "logit",
    measures: tuple[str, ...] | list[str] | None = None,
    estimator: str = "exact",
    k: int | None = None,
    stride: int = 1,
    seed: int = 0,
    chunk_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Scored:
    """``token_strengths`` of every response (one call per response, full causal
    context), at every ``stride``-th response token."""
    import time

    import torch

    from ..gradients import token_strengths

    if stride < 1:
        raise ConfigError(f"positions stride must be >= 1, got {stride}")
    if not responses:
        raise ConfigError("there are no responses to score")
    device = next(model.parameters()).device
    parts: list[tuple[Response, Any]] = []
    start = time.perf_counter()
    for r in responses:
        ids = torch.tensor(r.prompt_ids + r.response_ids, dtype=torch.long, device=device)
        out = token_strengths(
            model,
            ids,
            scored_positions(r, stride),
            objective=objective,
            measures=None if measures is None else list(measures),
            estimator=estimator,
            k=k,
            seed=seed,
            chunk_size=chunk_size,
            progress=progress,
        )
        parts.append((r, out))
    seconds = time.perf_counter() - start
    first = parts[0][1]
    names = tuple(first.measures)
    cols: dict[str, list[np.ndarray]] = {
        c: [] for c in ("response", "prompt_index", "sample", "position", "response_position", "token_id", "entropy_bits")
    }
    values: dict[str, list[np.ndarray]] = {m: [] for m in names}
    blocks: dict[str, list[np.ndarray]] = {m: [] for m in first.per_block}
    lengths = []
    for r, out in parts:
        n = len(out)
        lengths.append(n)
        cols["response"].append(np.full(n, r.index, dtype=np.int64))
        cols["prompt_index"].append(np.full(n, r.prompt_index, dtype=np.int64))
        cols["sample"].append(np.full(n, r.sample, dtype=np.int64))
        pos = np.asarray(out.positions, dtype=np.int64)
        cols["position"].append(pos)
        cols["response_position"].append(pos - len(r.prompt_ids))
        cols["token_id"].append(np.asarray(out.token_ids, dtype=np.int64))
        cols["entropy_bits"].append(np.asarray(out.entropy_bits, dtype=np.float64))
        for m in names:
            values[m].append(np.asarray(out.measure(m), dtype=np.float64))
        for m in blocks:
            blocks[m].append(np.asarray(out.per_block[m], dtype=np.float64))
    columns = {c: np.concatenate(v) for c, v in cols.items()}
    columns.update({m: np.concatenate(v) for m, v in values.items()})
    return Scored(
        columns=columns,
        measures=names,
        lengths=np.asarray(lengths, dtype=np.int64),
        per_block={m: np.concatenate(v, axis=0) for m, v in blocks.items()},
        block_names=tuple(first.block_names),
        objective=first.objective,
        estimator=first.estimator,
        seconds=seconds,
    )


__all__ = ["Scored", "count_scored", "score_responses", "scored_positions"]
