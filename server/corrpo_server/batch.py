"""Requests turned into one ragged batch of per-token entropy and grad_norm, checked field by
field: every error names the field path of what is wrong."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

import corrpo
from corrpo import wire
from corrpo.scoring import ScoreConfig, TopKBounds
from corrpo.top_k import top_k_stats
from corrpo.v1 import reward_service_pb2 as pb

from .failure import invalid, too_large

#: Reduces [T, V] logits and [T] ids to token statistics at a temperature.
Reducer = Callable[[np.ndarray, np.ndarray, float], corrpo.TokenStats]


@dataclass
class Batch:
    """Per-token statistics of every rollout of a request, concatenated in request order."""

    entropy: np.ndarray
    grad_norm: np.ndarray
    token_ids: np.ndarray | None
    lengths: np.ndarray
    group_sizes: np.ndarray
    rewards: np.ndarray | None
    top_k: TopKBounds | None = None

    def score(self, config: ScoreConfig) -> corrpo.Scores:
        return corrpo.score(
            self.entropy,
            self.grad_norm,
            self.lengths,
            self.group_sizes,
            rewards=self.rewards,
            token_ids=self.token_ids,
            config=config,
            top_k=self.top_k,
        )


@dataclass
class Limits:
    max_tokens: int


def _located(path: str, err: corrpo.CorrpoError) -> str:
    return err.message if err.message.startswith(path) else f"{path}: {err.message}"


def _finite(values: np.ndarray, path: str) -> None:
    bad = np.flatnonzero(~(np.isfinite(values) & (values >= 0)))
    if len(bad):
        raise invalid(f"{path}[{bad[0]}] is {values[bad[0]]}; it must be finite, >= 0")


def _ids(values: np.ndarray, path: str) -> np.ndarray:
    bad = np.flatnonzero(values < 0)
    if len(bad):
        raise invalid(f"{path}[{bad[0]}] is {values[bad[0]]}; token ids are >= 0")
    return values.astype(np.int64, copy=False)


def layout_rewards(rewards: Sequence[float | None], paths: Sequence[str]) -> np.ndarray | None:
    """Per-rollout rewards: all present or all absent (verifier-free), each finite."""
    present = [r is not None for r in rewards]
    if not any(present):
        return None
    if not all(present):
        missing = paths[present.index(False)]
        raise invalid(f"{missing}.reward is missing: set a reward on every rollout or on none (verifier-free)")
    values = np.array(rewards, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise invalid(f"{paths[bad[0]]}.reward is {values[bad[0]]}; it must be finite")
    return values


@dataclass
class _Rollout:
    entropy: np.ndarray
    grad_norm: np.ndarray
    token_ids: np.ndarray | None
    bounds: tuple[float, float, float, float] | None = None


def _stats(payload: pb.TokenStatsPayload, path: str) -> _Rollout:
    h = wire.decode(payload.entropy, f"{path}.entropy", wire.FLOATS, 1)
    g = wire.decode(payload.grad_norm, f"{path}.grad_norm", wire.FLOATS, 1)
    if len(g) != len(h):
        raise invalid(f"{path}.grad_norm has {len(g)} tokens, but {path}.entropy has {len(h)}")
    _finite(h, f"{path}.entropy")
    _finite(g, f"{path}.grad_norm")
    if payload.HasField("logprob"):
        lp = wire.decode(payload.logprob, f"{path}.logprob", wire.FLOATS, 1)
        if len(lp) != len(h):
            raise invalid(f"{path}.logprob has {len(lp)} tokens, but {path}.entropy has {len(h)}")
        bad = np.flatnonzero(~np.isfinite(lp))
        if len(bad):
            raise invalid(f"{path}.logprob[{bad[0]}] is {lp[bad[0]]}; it must be finite")
    ids = None
    if payload.HasField("token_ids"):
        ids = _ids(wire.decode(payload.token_ids, f"{path}.token_ids", wire.INTEGERS, 1), f"{path}.token_ids")
        if len(ids) != len(h):
            raise invalid(f"{path}.token_ids has {len(ids)} tokens, but {path}.entropy has {len(h)}")
    return _Rollout(h, g, ids)


def _logits(payload: pb.LogitsPayload, path: str, config: ScoreConfig, reduce: Reducer) -> _Rollout:
    logits = wire.decode(payload.logits, f"{path}.logits", wire.LOGITS, 2)
    ids = wire.decode(payload.token_ids, f"{path}.token_ids", wire.INTEGERS, 1)
    if len(ids) != logits.shape[0]:
        raise invalid(f"{path}.token_ids has {len(ids)} tokens, but {path}.logits has {logits.shape[0]} rows")
    if logits.shape[0] and logits.shape[1] == 0:
        raise invalid(f"{path}.logits has a vocabulary of size 0")
    try:
        stats = reduce(logits, ids.astype(np.int64, copy=False), config.temperature)
    except corrpo.CorrpoError as err:
        raise invalid(_located(f"{path}.logits", err)) from None
    return _Rollout(stats.entropy, stats.grad_norm, ids.astype(np.int64, copy=False))


def _top_k(payload: pb.TopKPayload, path: str, config: ScoreConfig) -> _Rollout:
    top = wire.decode(payload.top_logprobs, f"{path}.top_logprobs", wire.FLOATS, 2)
    top_ids = wire.decode(payload.top_token_ids, f"{path}.top_token_ids", wire.INTEGERS, 2)
    lp = wire.decode(payload.logprob, f"{path}.logprob", wire.FLOATS, 1)
    ids = wire.decode(payload.token_ids, f"{path}.token_ids", wire.INTEGERS, 1)
    if payload.vocab_size == 0:
        raise invalid(f"{path}.vocab_size must be set (the size of the model's vocabulary)")
    try:
        stats = top_k_stats(top, top_ids, lp, ids, payload.vocab_size)
    except corrpo.CorrpoError as err:
        where = f"{path}.{err.field}" if err.field else path
        raise invalid(_located(where, err)) from None
    h, g = stats.estimate(config.top_k_estimate)
    means = (stats.entropy_lower, stats.entropy_upper, stats.grad_norm_lower, stats.grad_norm_upper)
    bounds = tuple(float(m.mean()) if len(m) else math.nan for m in means)
    return _Rollout(h, g, ids.astype(np.int64, copy=False), bounds)


@dataclass
class _Collected:
    rollouts: list[_Rollout] = field(default_factory=list)
    rewards: list[float | None] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    group_sizes: list[int] = field(default_factory=list)


def _groups(groups: Sequence[pb.Group] | Sequence[pb.GroupLayout], what: str) -> None:
    if not groups:
        raise invalid(f"groups is empty: a request needs at least one group of {what}")
    for gi, group in enumerate(groups):
        if not group.rollouts:
            raise invalid(f"groups[{gi}].rollouts is empty: a group needs at least one rollout")


def from_score_request(
    request: pb.ScoreRequest,
    config: ScoreConfig,
    limits: Limits,
    reduce: Reducer,
    alive: Callable[[], None],
) -> Batch:
    """The batch of a unary request. ``alive`` is called between rollouts and raises when
    the client has gone or its deadline has passed, so abandoned work stops."""
    _groups(request.groups, "rollouts")
    out = _Collected()
    tokens = 0
    for gi, group in enumerate(request.groups):
        out.group_sizes.append(len(group.rollouts))
        for ri, rollout in enumerate(group.rollouts):
            path = f"groups[{gi}].rollouts[{ri}]"
            kind = rollout.WhichOneof("payload")
            alive()
            if kind == "stats":
                item = _stats(rollout.stats, f"{path}.stats")
            elif kind == "logits":
                item = _logits(rollout.logits, f"{path}.logits", config, reduce)
            elif kind == "top_k":
                item = _top_k(rollout.top_k, f"{path}.top_k", config)
            else:
                raise invalid(f"{path} has no payload: set stats, logits or top_k")
            tokens += len(item.entropy)
            if tokens > limits.max_tokens:
                raise too_large(f"the request holds more than {limits.max_tokens} tokens (the server's --max-tokens)")
            out.rollouts.append(item)
            out.rewards.append(rollout.reward if rollout.HasField("reward") else None)
            out.paths.append(path)
    return _batch(out)


def _batch(out: _Collected) -> Batch:
    items = out.rollouts
    lengths = np.array([len(r.entropy) for r in items], dtype=np.int64)
    ids = None
    if all(r.token_ids is not None for r in items):
        ids = np.concatenate([r.token_ids for r in items]) if items else np.empty(0, np.int64)
    top_k = None
    if any(r.bounds is not None for r in items):
        columns = np.array([r.bounds or (math.nan,) * 4 for r in items], dtype=np.float64).T
        top_k = TopKBounds(*columns)
    return Batch(
        entropy=np.concatenate([r.entropy for r in items], dtype=np.float64),
        grad_norm=np.concatenate([r.grad_norm for r in items], dtype=np.float64),
        token_ids=ids,
        lengths=lengths,
        group_sizes=np.array(out.group_sizes, dtype=np.int64),
        rewards=layout_rewards(out.rewards, out.paths),
        top_k=top_k,
    )


class LogitsStream:
    """A ScoreLogitsStream in progress: the header's layout, and per-token statistics filled
    block by block. It holds 8 bytes per token, never the logits."""

    def __init__(self, header: pb.LogitsStreamHeader, config: ScoreConfig, limits: Limits, reduce: Reducer) -> None:
        if header.dtype not in wire.LOGITS:
            allowed = ", ".join(wire.dtype_name(d) for d in wire.LOGITS)
            raise invalid(f"header.dtype must be one of {allowed}, got {wire.dtype_name(header.dtype)}")
        if header.vocab_size == 0:
            raise invalid("header.vocab_size must be >= 1")
        _groups(header.groups, "rollout layouts")
        self.lengths = np.array([r.num_tokens for g in header.groups for r in g.rollouts], dtype=np.int64)
        self.total = int(self.lengths.sum())
        if self.total > limits.max_tokens:
            raise too_large(f"the stream declares {self.total} tokens, more than the server's --max-tokens {limits.max_tokens}")
        self.group_sizes = np.array([len(g.rollouts) for g in header.groups], dtype=np.int64)
        paths = [f"header.groups[{gi}].rollouts[{ri}]" for gi, g in enumerate(header.groups) for ri in range(len(g.rollouts))]
        self.rewards = layout_rewards(
            [r.reward if r.HasField("reward") else None for g in header.groups for r in g.rollouts], paths
        )
        ids = wire.decode(header.token_ids, "header.token_ids", wire.INTEGERS, 1)
        if len(ids) != self.total:
            raise invalid(f"header.token_ids has {len(ids)} ids, but the rollouts declare {self.total} tokens")
        self.token_ids = ids.astype(np.int64, copy=False)
        self.vocab = int(header.vocab_size)
        self.element = wire.element(header.dtype)
        self.row_bytes = self.vocab * self.element.itemsize
        self.config = config
        self.reduce = reduce
        self.entropy = np.empty(self.total, dtype=np.float32)
        self.grad_norm = np.empty(self.total, dtype=np.float32)
        self.filled = 0
        self.blocks = 0

    def add(self, data: bytes | memoryview) -> None:
        path = f"blocks[{self.blocks}]"
        if not data or len(data) % self.row_bytes:
            raise invalid(
                f"{path} holds {len(data)} bytes, not a positive multiple of one row "
                f"({self.vocab} x {self.element.itemsize} = {self.row_bytes} bytes): blocks carry whole rows"
            )
        rows = len(data) // self.row_bytes
        start, end = self.filled, self.filled + rows
        if end > self.total:
            raise invalid(f"{path} brings the stream to {end} rows, but the header declares {self.total} tokens")
        logits = np.frombuffer(data, dtype=self.element).reshape(rows, self.vocab)
        try:
            stats = self.reduce(logits, self.token_ids[start:end], self.config.temperature)
        except corrpo.CorrpoError as err:
            raise invalid(f"{path}: {err.message}{self._where(start, err.row)}") from None
        self.entropy[start:end] = stats.entropy
        self.grad_norm[start:end] = stats.grad_norm
        self.filled = end
        self.blocks += 1

    def _where(self, start: int, row: int | None) -> str:
        if row is None:
            return ""
        token = start + row
        rollout = int(np.searchsorted(np.cumsum(self.lengths), token, side="right"))
        group = int(np.searchsorted(np.cumsum(self.group_sizes), rollout, side="right"))
        first_in_group = int(self.group_sizes[:group].sum())
        first_token = int(self.lengths[:rollout].sum())
        return f" (row {row} of the block is groups[{group}].rollouts[{rollout - first_in_group}], token {token - first_token})"

    def finish(self) -> Batch:
        if self.filled != self.total:
            raise invalid(f"the stream ended after {self.filled} of the {self.total} rows its header declares")
        return Batch(
            entropy=self.entropy,
            grad_norm=self.grad_norm,
            token_ids=self.token_ids,
            lengths=self.lengths,
            group_sizes=self.group_sizes,
            rewards=self.rewards,
        )
