"""``token_strengths``: checks its input, lays out rows and positions, and dispatches each
row to the exact measure or an estimator."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, ShapeError
from .architecture import describe
from .capture import Capture
from .estimators import jvp_cv_row, jvp_row, last_block_row, logits_row
from .exact import exact_row
from .local import local_row
from .handlers import Needs
from ..measures import DEFAULT_K, LOGIT_MEASURES, MEASURES, OBJECTIVES, PARAMETER_MEASURES
from ..measures import PRODUCES as _MODEL_PRODUCES
from .result import ESTIMATORS, TokenStrengths
from .sharding import unwrap, whole_parameters

#: What each estimator can produce, and what it gives when ``measures`` is None.
PRODUCES = {**_MODEL_PRODUCES, "logit_grad": ()}
DEFAULTS = {
    "exact": ("l1_mean", "nuclear_qkvo"),
    "subsample": ("l1_mean", "nuclear_qkvo"),
    "jvp": ("frobenius",),
    "last_block": PARAMETER_MEASURES,
    "local": PARAMETER_MEASURES,
    "jvp_cv": ("frobenius",),
    "logit_grad": LOGIT_MEASURES,
}
#: Estimators whose values are of whole sums over the blocks (no per-block terms).
WHOLE = ("jvp", "jvp_cv")


def token_strengths(
    model: nn.Module,
    input_ids: Any,
    positions: Any = None,
    *,
    objective: str = "logit",
    measures: Sequence[str] | None = None,
    estimator: str = "exact",
    attention_mask: Any = None,
    k: int | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> TokenStrengths:
    """Per-token entropy and gradient strength of a causal LM on its own token sequence
    (SPEC 3).

    model: a Hugging Face causal LM (``model(input_ids).logits``; Llama / Mistral / Qwen2 /
        Gemma-style ``q_proj`` ..., GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``, Phi-3
        ``qkv_proj``), on any device and dtype. It is run in eval mode (restored after).
        Wrapped in DistributedDataParallel, its ``.module`` is scored; sharded with FSDP2
        (``fully_shard``), its parameters are gathered whole on each rank while scoring
        (``corrpo.gradients.sharding``): every rank must call this together, each with its
        own sequences.
    input_ids: [L] or [B, L] token ids (torch or array-like).
    positions: indices t of the scored tokens, each predicted from t-1. None: every t >= 1
        (with ``attention_mask``, every t whose own and previous mask entry are 1). For [L]
        a sequence of ints; for [B, L] a list of B sequences.
    objective: "logit" seeds each backward with the target logit (the paper's), "logprob"
        with its log-probability.
    measures: any of ``MEASURES``; None takes the estimator's defaults.
    estimator: "exact" (one backward per token, batched), "subsample" (exact on ``k``
        tokens per row drawn with ``seed``; only those are returned), "jvp" (``k`` random
        forward-mode directions for every token at once: Gaussian ones give an unbiased
        estimate of frobenius^2, Cauchy ones a median estimate of l1_mean),
        "last_block" (the rank-1 terms of the top block from one truncated backward),
        "local" (every block's rank-1 terms with the other positions' keys and values
        detached, from one forward and one backward: ``corrpo.gradients.local``),
        "jvp_cv" (frobenius^2 as local's plus ``k`` orthogonal Gaussian directions'
        estimate of the difference, with local's jvp as control variate), or
        "logit_grad" (logits only).
    attention_mask: [B, L] 0/1 with each row's ones contiguous (left or right padding); a
        padded row gives what the row alone gives.
    chunk_size: seeds per batched backward (memory grows with it); None sizes chunks to
        about 1 GiB of backprops.
    progress: called with the number of tokens each time some are finished.
    """
    wanted, k = check_settings(objective=objective, estimator=estimator, measures=measures, k=k, chunk_size=chunk_size)
    model = unwrap(model)
    arch = describe(model)
    device = next(model.parameters()).device
    ids, single = _ids(input_ids, device)
    spans = _spans(attention_mask, ids.shape, single)
    chosen = _positions(positions, spans, ids.shape, single)
    if estimator == "subsample":
        rng = np.random.default_rng(seed)
        chosen = [np.sort(rng.choice(p, size=k, replace=False)) if len(p) > k else p for p in chosen]

    blocks = {"last_block": [len(arch.blocks) - 1], "logit_grad": [], "jvp": []}.get(estimator, list(range(len(arch.blocks))))
    needs = Needs(l1="l1_mean" in wanted, sq="frobenius" in wanted, nuclear="nuclear_qkvo" in wanted)
    generator = torch.Generator().manual_seed(seed)
    pieces: list[dict[str, torch.Tensor]] = []
    training = model.training
    model.eval()
    try:
        with whole_parameters(model), Capture(model, arch, blocks) as capture:
            for b, pos in enumerate(chosen):
                if len(pos) == 0:
                    continue
                start = spans[b][0]
                row = ids[b, start : spans[b][1]]
                local = torch.as_tensor(pos - start, dtype=torch.long, device=device)
                if estimator in ("exact", "subsample"):
                    out = exact_row(capture, row, local, objective, needs, len(arch.blocks), chunk_size, progress)
                else:
                    if estimator == "jvp":
                        out = jvp_row(capture, row, local, objective, needs, k, generator)
                    elif estimator == "jvp_cv":
                        out = jvp_cv_row(capture, row, local, objective, k, generator)
                    elif estimator == "local":
                        out = local_row(capture, row, local, objective, needs)
                    elif estimator == "last_block":
                        out = last_block_row(capture, row, local, objective)
                    else:
                        out = logits_row(capture, row, local, objective)
                    if progress is not None:
                        progress(len(pos))
                pieces.append(out)
    finally:
        model.train(training)
    return _assemble(pieces, chosen, ids, objective, estimator, wanted, arch.block_names, blocks)


def response_strengths(model: nn.Module, prompt_ids: Sequence[Any], response_ids: Sequence[Any], **settings: Any) -> TokenStrengths:
    """``token_strengths`` of every response token of (prompt, response) pairs of ragged
    lengths: the pairs are right-padded into one batch with its attention mask, and token t
    of a response is predicted from its prompt and the response before it. ``settings``:
    those of ``token_strengths`` (objective, measures, estimator, k, seed, ...)."""
    rows = [np.concatenate([np.asarray(p, dtype=np.int64), np.asarray(r, dtype=np.int64)]) for p, r in zip(prompt_ids, response_ids)]
    if len(rows) != len(prompt_ids) or len(rows) != len(response_ids):
        raise ShapeError(f"{len(prompt_ids)} prompts for {len(response_ids)} responses", field="prompt_ids")
    width = max((len(r) for r in rows), default=0)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    positions = []
    for b, (row, prompt) in enumerate(zip(rows, prompt_ids)):
        ids[b, : len(row)] = row
        mask[b, : len(row)] = 1
        positions.append(np.arange(len(prompt), len(row)))
    return token_strengths(model, torch.from_numpy(ids), positions, attention_mask=torch.from_numpy(mask), **settings)


def measured_strengths(
    model: nn.Module,
    prompt_ids: Sequence[Any],
    response_ids: Sequence[Any],
    *,
    measure: str,
    estimator: str | None,
    objective: str | None,
    k: int | None = None,
    seed: int = 0,
    **settings: Any,
) -> TokenStrengths:
    """``response_strengths`` for a measure, estimator and objective as a request names them
    (``corrpo.ScoreConfig``'s): a logit-space measure needs no estimator, and G comes beside
    every measure, for the comparison fingerprint. What the model-backed server and the
    adapters of ``corrpo.integrations`` score with."""
    return response_strengths(
        model,
        prompt_ids,
        response_ids,
        objective=objective or "logit",
        measures=tuple(dict.fromkeys((measure, "logit_grad"))),
        estimator="logit_grad" if measure in LOGIT_MEASURES else estimator,
        k=k,
        seed=seed,
        **settings,
    )


def check_settings(
    *,
    objective: str = "logit",
    estimator: str = "exact",
    measures: Sequence[str] | None = None,
    k: int | None = None,
    chunk_size: int | None = None,
) -> tuple[tuple[str, ...], int]:
    """Checks ``token_strengths``' settings without a model (so a tool can fail before a
    slow load); returns the measures and the k that will be used."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}", field="objective")
    if estimator not in ESTIMATORS:
        raise ConfigError(f"estimator must be one of {list(ESTIMATORS)}, got {estimator!r}", field="estimator")
    wanted = _measures(measures, estimator)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(f"chunk_size must be a positive integer or None, got {chunk_size!r}", field="chunk_size")
    if k is None:
        return wanted, DEFAULT_K.get(estimator, 0)
    if estimator not in DEFAULT_K:
        raise ConfigError(f"k applies to the subsample, jvp and jvp_cv estimators, not {estimator!r}", field="k")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}", field="k")
    return wanted, k


def _measures(measures: Sequence[str] | None, estimator: str) -> tuple[str, ...]:
    if measures is None:
        return DEFAULTS[estimator]
    if isinstance(measures, str):
        measures = (measures,)
    wanted = tuple(dict.fromkeys(measures))
    for name in wanted:
        if name not in MEASURES:
            raise ConfigError(f"unknown measure {name!r}; measures are {list(MEASURES)}", field="measures")
        if name not in LOGIT_MEASURES and name not in PRODUCES[estimator]:
            can = list(PRODUCES[estimator] + LOGIT_MEASURES)
            raise ConfigError(f"estimator {estimator!r} cannot give {name!r}; it gives {can}", field="measures")
    if not wanted:
        raise ConfigError("measures is empty", field="measures")
    return wanted


def _ids(input_ids: Any, device: torch.device) -> tuple[torch.Tensor, bool]:
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.as_tensor(np.asarray(input_ids))
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
        raise ShapeError(f"input_ids must hold integers, got {ids.dtype}", field="input_ids")
    if ids.dim() not in (1, 2):
        raise ShapeError(f"input_ids must be [L] or [B, L], got shape {tuple(ids.shape)}", field="input_ids")
    single = ids.dim() == 1
    return (ids[None] if single else ids).to(device=device, dtype=torch.long), single


def _spans(mask: Any, shape: torch.Size, single: bool) -> list[tuple[int, int]]:
    """[start, end) of every row's unpadded tokens."""
    rows, length = shape
    if mask is None:
        return [(0, length)] * rows
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if single and m.ndim == 1:
        m = m[None]
    if m.shape != tuple(shape):
        raise ShapeError(f"attention_mask has shape {m.shape}, input_ids {tuple(shape)}", field="attention_mask")
    if not np.isin(m, (0, 1)).all():
        raise ConfigError("attention_mask must hold only 0 and 1", field="attention_mask")
    spans = []
    for b in range(rows):
        ones = np.flatnonzero(m[b])
        if len(ones) and ones[-1] - ones[0] + 1 != len(ones):
            raise ConfigError(
                f"attention_mask row {b}: its ones are not contiguous (only left or right padding is supported)",
                field="attention_mask",
                row=b,
            )
        spans.append((int(ones[0]), int(ones[-1]) + 1) if len(ones) else (0, 0))
    return spans


def _positions(positions: Any, spans: list[tuple[int, int]], shape: torch.Size, single: bool) -> list[np.ndarray]:
    if positions is None:
        return [np.arange(start + 1, end, dtype=np.int64) for start, end in spans]
    per_row = [positions] if single else list(positions)
    if len(per_row) != shape[0]:
        raise ShapeError(f"positions has {len(per_row)} rows, input_ids {shape[0]}", field="positions")
    out = []
    for b, (pos, (start, end)) in enumerate(zip(per_row, spans)):
        arr = np.asarray(pos.detach().cpu() if isinstance(pos, torch.Tensor) else pos)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ShapeError(f"positions of row {b} must be a 1-D sequence of integers", field="positions", row=b)
        arr = arr.astype(np.int64)
        bad = arr[(arr < start + 1) | (arr >= end)]
        if bad.size:
            raise ConfigError(
                f"positions of row {b}: {int(bad[0])} is outside [{start + 1}, {end}) (a scored token needs a token before it)",
                field="positions",
                row=b,
            )
        arr = np.sort(arr)
        if arr.size > 1 and (np.diff(arr) == 0).any():
            raise ConfigError(f"positions of row {b} repeat a position", field="positions", row=b)
        out.append(arr)
    return out


def _assemble(
    pieces: list[dict[str, torch.Tensor]],
    chosen: list[np.ndarray],
    ids: torch.Tensor,
    objective: str,
    estimator: str,
    wanted: tuple[str, ...],
    block_names: tuple[str, ...],
    blocks: list[int],
) -> TokenStrengths:
    lengths = np.array([len(p) for p in chosen], dtype=np.int64)
    rows = np.repeat(np.arange(len(chosen), dtype=np.int64), lengths)
    positions = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    token_ids = ids.cpu().numpy()[rows, positions].astype(np.int64)

    def cat(key: str, width: int | None = None) -> np.ndarray:
        if not pieces:
            return np.zeros((0,) if width is None else (0, width), dtype=np.float64)
        return torch.cat([p[key] for p in pieces]).double().cpu().numpy()

    values: dict[str, np.ndarray] = {}
    per_block: dict[str, np.ndarray] = {}
    # Per-block terms: [N, blocks covered]; the WHOLE estimates are of whole sums (one column).
    width = 1 if estimator in WHOLE else len(blocks)
    for measure, key in (("l1_mean", "l1"), ("nuclear_qkvo", "nuclear"), ("frobenius", "sq")):
        if measure not in wanted:
            continue
        terms = cat(key, width)
        values[measure] = np.sqrt(terms.sum(axis=1)) if measure == "frobenius" else terms.mean(axis=1)
        if estimator not in WHOLE:
            per_block[measure] = terms
    if "logit_grad" in wanted or "head_logit_grad" in wanted:
        grad = cat("logit_grad")
        if "logit_grad" in wanted:
            values["logit_grad"] = grad
        if "head_logit_grad" in wanted:
            values["head_logit_grad"] = grad * cat("hidden_norm")
    names = tuple(block_names[b] for b in blocks) if estimator not in (*WHOLE, "logit_grad") else ()
    return TokenStrengths(
        objective=objective,
        estimator=estimator,
        measures=wanted,
        rows=rows,
        positions=positions,
        token_ids=token_ids,
        lengths=lengths,
        entropy_bits=cat("entropy_bits"),
        per_block=per_block,
        block_names=names,
        **values,
    )
