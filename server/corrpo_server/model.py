"""The policy of a model-backed server (``serve --model``): scores tokens payloads with
``corrpo.gradients`` and swaps in new weights between requests (``ReloadWeights``).

One request uses the model at a time: ``token_strengths`` hooks the model's layers, and
the per-token backward passes already use every core torch is given. At most
``max_queued`` more wait for it (``--max-queued``); one past them is refused with
RESOURCE_EXHAUSTED at once, not after a wait its client would time out in. A request
checks that its client is still there at every decoder block of every forward and
backward pass, so one whose client has gone (or whose deadline has passed) stops within
one block's work, even inside the exact estimator's long batched backward. A reload loads
the new weights beside the old ones (twice the model's memory for the length of the
load), then swaps them under the same lock, so a request is scored entirely by one
version.
"""

from __future__ import annotations

import importlib.util
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

import corrpo
from corrpo.scoring import ScoreConfig

from .batch import ScoredTokens
from .failure import Failure, checked_name, invalid, too_large
from .observe import event


class ModelLoadError(Exception):
    """The model at a path cannot be loaded; the message says why."""


@dataclass
class _Loaded:
    model: Any
    version: str
    vocab_size: int
    architecture: str
    blocks: tuple[Any, ...]


def _load(path: str, device: str, dtype: str, version: str) -> _Loaded:
    from corrpo.gradients import ArchitectureError
    from corrpo.gradients.architecture import describe
    from corrpo.models import load_model

    try:
        loaded = load_model(path, device=device, dtype=dtype)
        blocks = describe(loaded.model).blocks  # refuse a model corrpo.gradients cannot score now, not per request
    except (corrpo.ConfigError, ArchitectureError) as err:
        raise ModelLoadError(str(err)) from None
    loaded.model.requires_grad_(False)
    vocab = int(loaded.model.get_output_embeddings().weight.shape[0])
    return _Loaded(loaded.model, version, vocab, type(loaded.model).__name__, blocks)


@contextmanager
def _checked_per_block(blocks: tuple[Any, ...], alive: Callable[[], None]) -> Iterator[None]:
    """While the ``with`` block runs, calls ``alive`` as each decoder block runs forward and
    as the backward pass reaches each block's output. ``alive`` raising there ends the pass:
    torch hands the exception on out of the forward or ``autograd.grad``. Between chunks
    alone would not do: one chunk of the exact estimator is one batched backward of up to
    64 tokens, tens of seconds for SmolLM2-135M on a 2-core CPU (64 tokens took 138 s)."""

    def backward(_grad: Any) -> None:
        alive()

    def forward(_module: Any, _args: Any, output: Any) -> None:
        alive()
        hidden = output[0] if isinstance(output, tuple) else output
        if getattr(hidden, "requires_grad", False):  # a pass under no_grad has no backward to check
            hidden.register_hook(backward)

    hooks = [block.register_forward_hook(forward) for block in blocks]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def check_version(version: str, path: str) -> str:
    return checked_name(version, path, "the name that requests give in weights_version")


class PolicyModel:
    """The model a server scores tokens with, and its weights version.

    on_loading(True/False) is called around every reload (health goes NOT_SERVING)."""

    def __init__(
        self, path: str, *, device: str, dtype: str, version: str, max_queued: int, on_loading: Callable[[bool], None]
    ) -> None:
        missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
        if missing:
            raise ModelLoadError(f"model-backed scoring needs {' and '.join(missing)}: pip install '.[gradients]' in the corrpo checkout")
        from corrpo.models import resolve_device

        try:
            self.device = resolve_device(device)
        except corrpo.ConfigError as err:
            raise ModelLoadError(str(err)) from None
        self.dtype = dtype
        self.max_queued = max_queued
        self._on_loading = on_loading
        self._use = threading.Lock()  # one request (or the swap) at a time
        self._queue = threading.Lock()  # guards _waiting
        self._waiting = 0  # requests waiting for _use
        self._reload = threading.Lock()  # one load at a time
        started = time.perf_counter()
        self._current = _load(path, self.device, dtype, version)
        event(
            "model_loaded",
            path=path,
            weights_version=version,
            architecture=self._current.architecture,
            device=self.device,
            dtype=dtype,
            seconds=round(time.perf_counter() - started, 3),
        )

    @property
    def backend(self) -> str:
        return f"model/{self.device}/{self.dtype}"

    @property
    def version(self) -> str:
        return self._current.version

    def reload(self, path: str, version: str) -> float:
        """Loads ``path`` as ``version`` and swaps it in; returns the seconds it took. A
        failed load keeps the old weights and raises INVALID_ARGUMENT."""
        with self._reload:
            started = time.perf_counter()
            self._on_loading(True)
            try:
                try:
                    fresh = _load(path, self.device, self.dtype, version)
                except ModelLoadError as err:
                    raise invalid(f"path: {err}") from None
                old = self._current
                if fresh.vocab_size != old.vocab_size or fresh.architecture != old.architecture:
                    raise invalid(
                        f"path: {path!r} holds a {fresh.architecture} with a vocabulary of {fresh.vocab_size}, but the "
                        f"server's model is a {old.architecture} with {old.vocab_size}: reload weights of the same model"
                    )
                with self._use:
                    self._current = fresh
            finally:
                self._on_loading(False)
            seconds = time.perf_counter() - started
            event("weights_reloaded", path=path, weights_version=version, seconds=round(seconds, 3))
            return seconds

    @contextmanager
    def _turn(self, alive: Callable[[], None]) -> Iterator[None]:
        """Holds the model for one request: at once when it is free, else after waiting in
        line while the client is still there (``alive`` raises once it has gone); a request
        that finds ``max_queued`` others waiting is refused with RESOURCE_EXHAUSTED."""
        if not self._use.acquire(blocking=False):
            with self._queue:
                if self._waiting >= self.max_queued:
                    raise too_large(
                        f"{self._waiting} requests are already waiting for the model, the server's bound "
                        f"(--max-queued {self.max_queued}); the model scores one request at a time: retry "
                        f"with backoff, send fewer requests at once, or score on more server replicas"
                    )
                self._waiting += 1
            try:
                while not self._use.acquire(timeout=0.05):
                    alive()
            finally:
                with self._queue:
                    self._waiting -= 1
        try:
            yield
        finally:
            self._use.release()

    def score(
        self,
        rollouts: list[tuple[np.ndarray, np.ndarray]],
        config: ScoreConfig,
        paths: list[str],
        alive: Callable[[], None],
        expected_version: str | None = None,
    ) -> ScoredTokens:
        """H, S of ``config.measure`` and G of every response token (a subsample for the
        subsample estimator), in rollout order."""
        from corrpo.gradients import measured_strengths

        with self._turn(alive):
            current = self._current
            if expected_version is not None and expected_version != current.version:
                raise Failure(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"the request expects weights_version {expected_version!r}, but the server holds "
                    f"{current.version!r}: reload the weights (ReloadWeights) or send the version it holds",
                )
            for (prompt, response), path in zip(rollouts, paths):
                for name, ids in (("prompt_ids", prompt), ("response_ids", response)):
                    bad = np.flatnonzero(ids >= current.vocab_size)
                    if len(bad):
                        raise invalid(
                            f"{path}.tokens.{name}[{bad[0]}] is {ids[bad[0]]}, outside the model's vocabulary of {current.vocab_size}"
                        )
            with _checked_per_block(current.blocks, alive):
                out = measured_strengths(
                    current.model,
                    [p for p, _ in rollouts],
                    [r for _, r in rollouts],
                    measure=config.measure,
                    estimator=config.estimator,
                    objective=config.objective,
                    k=config.estimator_k,
                    seed=config.estimator_seed,
                )
        return ScoredTokens(
            entropy=out.entropy_bits * math.log(2),
            strength=out.measure(config.measure),
            logit_grad=None if config.measure == "logit_grad" else out.logit_grad,
            token_ids=out.token_ids,
            lengths=out.lengths,
            weights_version=current.version,
        )
