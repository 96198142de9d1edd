"""An SGLang server plugin that returns the exact per-token entropy H and logit gradient
norm G (SPEC 2) of every generated token in ``meta_info``, computed from the live logits
with corrpo's kernels: rollouts then arrive with exact statistics instead of top-k bounds.

    pip install corrpo sglang                      # corrpo registers the entry point
    CORRPO_SGLANG_STATS=1 python -m sglang.launch_server --model-path ...

Each ``/generate`` output then carries, aligned with ``output_ids``:

    meta_info["corrpo_entropy"]    H of softmax(z), nats
    meta_info["corrpo_grad_norm"]  G = ||softmax(z) - onehot(y)||, y the sampled token
    meta_info["corrpo_logprob"]    log softmax(z)[y]

and ``corrpo.integrations.sglang.parse_generate(...).stats_payload()`` sends them to a
corrpo-server. z are the logits SGLang's ``SamplingObserver.before_grammar`` sees: after
repetition/frequency/presence penalties, before the grammar mask, ``logit_bias``,
temperature and top-k/top-p/min-p. So H and G describe the policy's own distribution
(temperature 1), the one a trainer computes log-probs of, whatever temperature sampled y.

How (SGLang 0.5.23's supported route, ``sglang.srt.managers.auxiliary_output``): an entry
point in the group ``sglang.srt.plugins`` hooks ``ModelRunner.__init__`` to install a
sampling observer and ``Scheduler.get_output_streamer_class`` to add the values to each
response's customized info. The observer keeps a copy of the [rows, vocab] logits (SGLang
changes them in place before sampling), and after sampling reduces them with corrpo's
Triton kernels on a GPU (on the device, no host sync; faulty rows give NaN) or its native
core on the CPU. The scheduler copies the results to the host with its other outputs and
hands them to each request as its tokens are committed.

The plugin is inert unless the server's environment has ``CORRPO_SGLANG_STATS=1``: an
installed entry point loads in every SGLang server. Not supported: speculative decoding and
dLLM (SGLang's observers do not run there) and pipeline parallelism (its auxiliary outputs
have no pipeline transport), which the server refuses to start with; and the Rust egress
(``SGLANG_RUST_SERVER``).
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from dataclasses import dataclass, field
from typing import Any

from .sglang import STATS_KEYS as KEYS

logger = logging.getLogger(__name__)

ENV = "CORRPO_SGLANG_STATS"

_MODEL_RUNNER_INIT = "sglang.srt.model_executor.model_runner.ModelRunner.__init__"
_STREAMER_CLASS = "sglang.srt.managers.scheduler.Scheduler.get_output_streamer_class"


def enabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def register() -> None:
    """The ``sglang.srt.plugins`` entry point: SGLang calls it in each of its processes."""
    if not enabled():
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(_MODEL_RUNNER_INIT, _install_observer, HookType.AFTER)
    HookRegistry.register(_STREAMER_CLASS, _streamer_class, HookType.AFTER)
    logger.info("corrpo: per-token entropy and grad_norm go into meta_info (%s=1)", ENV)


def _install_observer(result: None, runner: Any, *args: Any, **kwargs: Any) -> None:
    if not runner.supports_sampling_observer():
        raise RuntimeError(
            f"{ENV}=1, but SGLang's sampling observers do not run with speculative decoding or dLLM: "
            f"unset {ENV} or turn those off"
        )
    if getattr(getattr(runner, "pp_group", None), "world_size", 1) > 1:
        raise RuntimeError(
            f"{ENV}=1, but SGLang's auxiliary outputs have no pipeline-parallel transport: unset {ENV} or use pp_size 1"
        )
    if str(runner.device).startswith("cuda"):
        try:
            import corrpo_kernels  # noqa: F401
        except ImportError as err:
            raise RuntimeError(
                f"{ENV}=1 on a GPU needs corrpo's Triton kernels in SGLang's environment (pip install corrpo-kernels): {err}"
            ) from None
    runner.sampling_observer = StatsObserver()


def _streamer_class(result: type, scheduler: Any) -> type:
    # A subclass of whatever class SGLang (or another plugin) chose, so both keep working.
    return type("CorrpoStatsOutputStreamer", (_StatsStreamer, result), {})


class StatsObserver:
    """SGLang ``SamplingObserver``: the statistics of each sampled row's logits."""

    def is_active(self, sampling_info: Any) -> bool:
        return True

    def before_grammar(self, logits: Any, sampling_info: Any) -> Any:
        # After this the grammar mask, logit_bias and temperature change `logits` in place.
        return logits.clone()

    def after_sample(self, logits: Any, token_ids: Any) -> DeviceStats:
        rows = token_ids.shape[0]
        # A copy of the ids: SGLang's outputs must not alias buffers a CUDA graph reuses.
        return DeviceStats(token_stats(logits[:rows], token_ids), token_ids.clone())


def token_stats(logits: Any, token_ids: Any) -> Any:
    """[3, rows] float32 (rows in the order of KEYS: entropy, grad_norm, logprob) on the
    logits' device; NaN where a row cannot be reduced (NaN or +inf logits): never an
    exception inside SGLang's scheduler."""
    if logits.device.type == "cuda":
        return kernel_stats(logits, token_ids)
    return native_stats(logits, token_ids)


def kernel_stats(logits: Any, token_ids: Any) -> Any:
    """corrpo's Triton kernel, on the logits' device without a host sync."""
    from corrpo_kernels import token_stats as kernel

    return kernel(logits, token_ids).stats[[0, 3, 1]]


def native_stats(logits: Any, token_ids: Any) -> Any:
    """corrpo's native core, on host logits."""
    import numpy as np
    import torch

    import corrpo

    def reduce(rows: slice) -> Any:
        s = corrpo.token_stats(logits[rows], token_ids[rows], backend="cpu")
        return torch.from_numpy(np.stack([s.entropy, s.grad_norm, s.logprob]))

    try:
        return reduce(slice(None))
    except corrpo.CorrpoError as err:
        # The core stops at the first faulty row; the others still get their values.
        logger.warning("corrpo: a batch of %d tokens has rows without statistics (NaN): %s", len(token_ids), err)
    out = torch.full((3, len(token_ids)), math.nan)
    for row in range(len(token_ids)):
        try:
            out[:, row : row + 1] = reduce(slice(row, row + 1))
        except corrpo.CorrpoError:
            pass
    return out


@dataclass(frozen=True)
class DeviceStats:
    """SGLang ``DeviceAuxiliaryOutput``: the batch's statistics and sampled ids, until the
    scheduler copies them to the host."""

    stats: Any
    token_ids: Any

    def copy_to_host(self, copy_tensor: Any) -> HostStats:
        return HostStats(copy_tensor(self.stats), copy_tensor(self.token_ids))


@dataclass
class _Pending:
    """One request's values not yet sent, and how many output tokens have one."""

    count: int = 0
    values: tuple[list[float], ...] = field(default_factory=lambda: tuple([] for _ in KEYS))

    def add(self, row: tuple[float, ...]) -> None:
        for column, value in zip(self.values, row):
            column.append(value)
        self.count += 1

    def take(self) -> tuple[list[float], ...]:
        values, self.values = self.values, tuple([] for _ in KEYS)
        return values


# Per request (the scheduler's Req objects; an aborted request's entry goes with it).
_PENDING: weakref.WeakKeyDictionary[Any, _Pending] = weakref.WeakKeyDictionary()
_UNSEEN = (math.nan,) * len(KEYS)


@dataclass(frozen=True)
class HostStats:
    """SGLang ``HostAuxiliaryOutput``: hands each row's values to its request as SGLang
    commits the token (rows follow ``batch.reqs``)."""

    stats: Any
    token_ids: Any

    def consume(self, batch: Any, commits: Any) -> None:
        rows = list(zip(*self.stats.tolist()))
        sampled = self.token_ids.tolist()
        for i, (req, commit) in enumerate(zip(batch.reqs, commits)):
            if commit is None:  # a middle prefill chunk, or a request that already ended
                continue
            pending = _PENDING.setdefault(req, _Pending())
            # Output tokens committed without passing this observer (none in the supported
            # modes) get NaN, so the values stay aligned with output_ids.
            while pending.count < commit.output_index:
                pending.add(_UNSEEN)
            if i < len(rows) and commit.token_ids == (sampled[i],):
                pending.add(rows[i])
            else:
                for _ in commit.token_ids:
                    pending.add(_UNSEEN)


class _StatsStreamer:
    """Mixed into SGLang's ``SchedulerOutputStreamer``: each emitted request's new values."""

    has_additional_customized_info = True

    def build_additional_customized_info(self, reqs: list[Any]) -> dict[str, list]:
        info = super().build_additional_customized_info(reqs)
        columns: tuple[list[list[float]], ...] = tuple([] for _ in KEYS)
        for req in reqs:
            pending = _PENDING.get(req)
            values = pending.take() if pending is not None else tuple([] for _ in KEYS)
            for column, value in zip(columns, values):
                column.append(value)
        return {**info, **dict(zip(KEYS, columns))}
