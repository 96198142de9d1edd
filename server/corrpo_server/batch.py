"""Requests turned into one ragged batch of per-token entropy and strength, checked field by
field: every error names the field path of what is wrong."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

import corrpo
from corrpo import wire
from corrpo.scoring import ScoreConfig, TopKBounds
from corrpo.top_k import top_k_stats
from corrpo.v1 import reward_service_pb2 as pb

from .failure import Failure, invalid, too_large

#: Reduces [T, V] logits and [T] ids to token statistics at a temperature.
Reducer = Callable[[np.ndarray, np.ndarray, float], corrpo.TokenStats]


@dataclass
class ScoredTokens:
    """What a model-backed server's model gives for the tokens payloads of a request: per
    scored token H (nats), S of the measure and G (None when S is G), concatenated over
    rollouts; scored tokens per rollout; and the weights version that scored them."""

    entropy: np.ndarray
    strength: np.ndarray
    logit_grad: np.ndarray | None
    token_ids: np.ndarray
    lengths: np.ndarray
    weights_version: str


#: Scores every rollout's (prompt ids, response ids) with a model: the rollouts, the resolved
#: config, each rollout's field path (for errors), and the liveness check of the request.
TokenScorer = Callable[[list[tuple[np.ndarray, np.ndarray]], ScoreConfig, list[str], Callable[[], None]], ScoredTokens]


@dataclass
class Batch:
    """Per-token statistics of every rollout of a request, concatenated in request order,
    with the request's settings resolved for its payloads.

    strength: S of ``config.measure``; logit_grad: G where it differs from S and is known
    for every token, else None."""

    entropy: np.ndarray
    strength: np.ndarray
    token_ids: np.ndarray | None
    lengths: np.ndarray
    group_sizes: np.ndarray
    rewards: np.ndarray | None
    config: ScoreConfig
    top_k: TopKBounds | None = None
    logit_grad: np.ndarray | None = None
    weights_version: str | None = None
    #: Where the groups sit in the request: "" for Score, "header." for a stream.
    where: str = ""

    def score(self) -> corrpo.Scores:
        try:
            scores = corrpo.score(
                self.entropy,
                self.strength,
                self.lengths,
                self.group_sizes,
                rewards=self.rewards,
                token_ids=self.token_ids,
                config=self.config,
                top_k=self.top_k,
                logit_grad=self.logit_grad,
            )
        except corrpo.InvalidValueError as err:
            # Rewards whose regularized value or group spread overflow float64: say which
            # rollout of the request, as the other checks do.
            if err.field != "rewards" or err.index is None:
                raise
            group = int(np.searchsorted(np.cumsum(self.group_sizes), err.index, side="right"))
            rollout = err.index - int(self.group_sizes[:group].sum())
            reason = err.message.split(": ", 1)[-1]
            raise invalid(f"{self.where}groups[{group}].rollouts[{rollout}].reward: {reason}") from None
        return dataclasses.replace(scores, weights_version=self.weights_version)


@dataclass
class Limits:
    """The server's limits on a request (its flags), checked before anything is allocated."""

    max_tokens: int
    #: The largest message: a stream whose single row of logits is larger can never send it.
    max_message_bytes: int
    #: Tokens per rollout (subsample) or directions (jvp) of a model-backed server: the
    #: work and memory of a tokens payload grow with it.
    max_estimator_k: int = 4096


_VOCAB_BOUND = "a vocabulary size: INT32 token ids address at most 2**31 tokens"


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
    strength: np.ndarray
    token_ids: np.ndarray | None
    bounds: tuple[float, float, float, float] | None = None
    logit_grad: np.ndarray | None = None


def _per_token(payload: pb.TokenStatsPayload, name: str, path: str, n: int) -> np.ndarray:
    values = wire.decode(getattr(payload, name), f"{path}.{name}", wire.FLOATS, 1)
    if len(values) != n:
        raise invalid(f"{path}.{name} has {len(values)} tokens, but {path}.entropy has {n}")
    _finite(values, f"{path}.{name}")
    return values


def _stats(payload: pb.TokenStatsPayload, path: str, measure: str) -> _Rollout:
    h = wire.decode(payload.entropy, f"{path}.entropy", wire.FLOATS, 1)
    _finite(h, f"{path}.entropy")
    g = _per_token(payload, "grad_norm", path, len(h)) if payload.HasField("grad_norm") else None
    if measure == "logit_grad":
        if payload.HasField("strength"):
            raise invalid(f"{path}.strength is for measures other than logit_grad, whose values travel in grad_norm")
        if g is None:
            raise invalid(f"{path}.grad_norm must be set: it carries the logit_grad values (config.measure)")
        s = g
    else:
        if not payload.HasField("strength"):
            raise invalid(f"{path}.strength must be set: the {measure} value of every token (config.measure)")
        s = _per_token(payload, "strength", path, len(h))
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
    return _Rollout(h, s, ids, logit_grad=g)


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
    vocab = wire.size(payload.vocab_size, f"{path}.vocab_size", 1, what=_VOCAB_BOUND)
    try:
        stats = top_k_stats(top, top_ids, lp, ids, vocab)
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


def _resolved(config: ScoreConfig, kinds: set[str], path: str = "config") -> ScoreConfig:
    try:
        return config.resolve(kinds)
    except corrpo.ConfigError as err:
        # A setting at fault is under the config; a mix of payload kinds is the groups' fault.
        where = err.field if err.field == "groups" else f"{path}.{err.field}"
        raise invalid(f"{where}: {err.message}") from None


def from_score_request(
    request: pb.ScoreRequest,
    config: ScoreConfig,
    limits: Limits,
    reduce: Reducer,
    alive: Callable[[], None],
    score_tokens: TokenScorer | None = None,
) -> Batch:
    """The batch of a unary request. ``alive`` is called between rollouts and raises when
    the client has gone or its deadline has passed, so abandoned work stops.
    ``score_tokens`` is the model of a model-backed server (None: tokens payloads are
    refused)."""
    _groups(request.groups, "rollouts")
    kinds: set[str] = set()
    for gi, group in enumerate(request.groups):
        for ri, rollout in enumerate(group.rollouts):
            kind = rollout.WhichOneof("payload")
            if kind is None:
                raise invalid(f"groups[{gi}].rollouts[{ri}] has no payload: set stats, logits, top_k or tokens")
            kinds.add(kind)
    config = _resolved(config, kinds)
    if "tokens" in kinds:
        return _tokens_batch(request, config, limits, alive, score_tokens)
    out = _Collected()
    tokens = 0
    for gi, group in enumerate(request.groups):
        out.group_sizes.append(len(group.rollouts))
        for ri, rollout in enumerate(group.rollouts):
            path = f"groups[{gi}].rollouts[{ri}]"
            kind = rollout.WhichOneof("payload")
            alive()
            if kind == "stats":
                item = _stats(rollout.stats, f"{path}.stats", config.measure)
            elif kind == "logits":
                item = _logits(rollout.logits, f"{path}.logits", config, reduce)
            else:
                item = _top_k(rollout.top_k, f"{path}.top_k", config)
            tokens += len(item.entropy)
            if tokens > limits.max_tokens:
                raise too_large(f"the request holds more than {limits.max_tokens} tokens (the server's --max-tokens)")
            out.rollouts.append(item)
            out.rewards.append(rollout.reward if rollout.HasField("reward") else None)
            out.paths.append(path)
    return _batch(out, config)


def _tokens_batch(
    request: pb.ScoreRequest,
    config: ScoreConfig,
    limits: Limits,
    alive: Callable[[], None],
    score_tokens: TokenScorer | None,
) -> Batch:
    if score_tokens is None:
        raise Failure(
            grpc.StatusCode.FAILED_PRECONDITION,
            "tokens payloads need a model-backed server: this one was started without --model",
        )
    if config.temperature != 1.0:
        raise invalid(f"config.temperature is {config.temperature}: tokens payloads are scored at temperature 1")
    if config.estimator_k is not None and config.estimator_k > limits.max_estimator_k:
        raise too_large(
            f"config.estimator_k is {config.estimator_k}; this server allows at most {limits.max_estimator_k} "
            f"(the {config.estimator} estimator's work and memory grow with it)"
        )
    rollouts: list[tuple[np.ndarray, np.ndarray]] = []
    rewards: list[float | None] = []
    paths: list[str] = []
    tokens = 0
    for gi, group in enumerate(request.groups):
        for ri, rollout in enumerate(group.rollouts):
            path = f"groups[{gi}].rollouts[{ri}]"
            payload = rollout.tokens
            prompt = _ids(wire.decode(payload.prompt_ids, f"{path}.tokens.prompt_ids", wire.INTEGERS, 1), f"{path}.tokens.prompt_ids")
            response = _ids(
                wire.decode(payload.response_ids, f"{path}.tokens.response_ids", wire.INTEGERS, 1), f"{path}.tokens.response_ids"
            )
            if len(prompt) == 0:
                raise invalid(f"{path}.tokens.prompt_ids is empty: the first response token needs a context (at least a BOS)")
            tokens += len(prompt) + len(response)
            if tokens > limits.max_tokens:
                raise too_large(f"the request holds more than {limits.max_tokens} tokens (the server's --max-tokens)")
            rollouts.append((prompt, response))
            rewards.append(rollout.reward if rollout.HasField("reward") else None)
            paths.append(path)
    scored = score_tokens(rollouts, config, paths, alive)
    return Batch(
        entropy=scored.entropy,
        strength=scored.strength,
        token_ids=scored.token_ids,
        lengths=scored.lengths,
        group_sizes=np.array([len(g.rollouts) for g in request.groups], dtype=np.int64),
        rewards=layout_rewards(rewards, paths),
        config=config,
        logit_grad=scored.logit_grad,
        weights_version=scored.weights_version,
    )


def _batch(out: _Collected, config: ScoreConfig) -> Batch:
    items = out.rollouts
    lengths = np.array([len(r.entropy) for r in items], dtype=np.int64)
    ids = None
    if all(r.token_ids is not None for r in items):
        ids = np.concatenate([r.token_ids for r in items]) if items else np.empty(0, np.int64)
    top_k = None
    if any(r.bounds is not None for r in items):
        columns = np.array([r.bounds or (math.nan,) * 4 for r in items], dtype=np.float64).T
        top_k = TopKBounds(*columns)
    logit_grad = None
    if config.measure != "logit_grad" and all(r.logit_grad is not None for r in items):
        logit_grad = np.concatenate([r.logit_grad for r in items], dtype=np.float64)
    return Batch(
        entropy=np.concatenate([r.entropy for r in items], dtype=np.float64),
        strength=np.concatenate([r.strength for r in items], dtype=np.float64),
        token_ids=ids,
        lengths=lengths,
        group_sizes=np.array(out.group_sizes, dtype=np.int64),
        rewards=layout_rewards(out.rewards, out.paths),
        config=config,
        top_k=top_k,
        logit_grad=logit_grad,
    )


class LogitsStream:
    """A ScoreLogitsStream in progress: the header's layout, and per-token statistics filled
    block by block. It holds 8 bytes per token, never the logits."""

    def __init__(self, header: pb.LogitsStreamHeader, config: ScoreConfig, limits: Limits, reduce: Reducer) -> None:
        if header.dtype not in wire.LOGITS:
            allowed = ", ".join(wire.dtype_name(d) for d in wire.LOGITS)
            raise invalid(f"header.dtype must be one of {allowed}, got {wire.dtype_name(header.dtype)}")
        vocab = wire.size(header.vocab_size, "header.vocab_size", 1, what=_VOCAB_BOUND)
        _groups(header.groups, "rollout layouts")
        # Summed as Python ints, so that counts of 2**64 - 1 are refused rather than overflow.
        counts = [r.num_tokens for g in header.groups for r in g.rollouts]
        self.total = sum(counts)
        if self.total > limits.max_tokens:
            raise too_large(f"the stream declares {self.total} tokens, more than the server's --max-tokens {limits.max_tokens}")
        self.lengths = np.array(counts, dtype=np.int64)
        self.group_sizes = np.array([len(g.rollouts) for g in header.groups], dtype=np.int64)
        paths = [f"header.groups[{gi}].rollouts[{ri}]" for gi, g in enumerate(header.groups) for ri in range(len(g.rollouts))]
        self.rewards = layout_rewards(
            [r.reward if r.HasField("reward") else None for g in header.groups for r in g.rollouts], paths
        )
        ids = wire.decode(header.token_ids, "header.token_ids", wire.INTEGERS, 1)
        if len(ids) != self.total:
            raise invalid(f"header.token_ids has {len(ids)} ids, but the rollouts declare {self.total} tokens")
        self.token_ids = ids.astype(np.int64, copy=False)
        self.vocab = vocab
        self.element = wire.element(header.dtype)
        self.row_bytes = self.vocab * self.element.itemsize
        if self.total and self.row_bytes > limits.max_message_bytes:
            raise too_large(
                f"one row of logits is {self.vocab} x {self.element.itemsize} = {self.row_bytes} bytes, more than "
                f"the server's largest message ({limits.max_message_bytes} bytes, --max-message-mib): no block can carry it"
            )
        self.config = _resolved(config, {"logits"}, "header.config")
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
            strength=self.grad_norm,
            token_ids=self.token_ids,
            lengths=self.lengths,
            group_sizes=self.group_sizes,
            rewards=self.rewards,
            config=self.config,
            where="header.",
        )
