"""The policy of a model-backed server (``serve --model``): scores tokens payloads with
``corrpo.gradients`` and swaps in new weights between requests (``ReloadWeights``).

One request uses the model at a time: ``token_strengths`` hooks the model's layers, and
the per-token backward passes already use every core torch is given. A reload loads the
new weights beside the old ones (twice the model's memory for the length of the load),
then swaps them under the same lock, so a request is scored entirely by one version.
"""

from __future__ import annotations

import importlib.util
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

import corrpo
from corrpo.scoring import ScoreConfig

from .batch import ScoredTokens
from .failure import Failure, checked_name, invalid
from .observe import event


class ModelLoadError(Exception):
    """The model at a path cannot be loaded; the message says why."""


@dataclass
class _Loaded:
    model: Any
    version: str
    vocab_size: int
    architecture: str


def _load(path: str, device: str, dtype: str, version: str) -> _Loaded:
    from corrpo.gradients import ArchitectureError
    from corrpo.gradients.architecture import describe
    from corrpo.models import load_model

    try:
        loaded = load_model(path, device=device, dtype=dtype)
        describe(loaded.model)  # refuse a model corrpo.gradients cannot score now, not per request
    except (corrpo.ConfigError, ArchitectureError) as err:
        raise ModelLoadError(str(err)) from None
    loaded.model.requires_grad_(False)
    vocab = int(loaded.model.get_output_embeddings().weight.shape[0])
    return _Loaded(loaded.model, version, vocab, type(loaded.model).__name__)


def check_version(version: str, path: str) -> str:
    return checked_name(version, path, "the name that requests give in weights_version")


class PolicyModel:
    """The model a server scores tokens with, and its weights version.

    on_loading(True/False) is called around every reload (health goes NOT_SERVING)."""

    def __init__(self, path: str, *, device: str, dtype: str, version: str, on_loading: Callable[[bool], None]) -> None:
        missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
        if missing:
            raise ModelLoadError(f"model-backed scoring needs {' and '.join(missing)}: pip install 'corrpo[gradients]'")
        from corrpo.models import resolve_device

        try:
            self.device = resolve_device(device)
        except corrpo.ConfigError as err:
            raise ModelLoadError(str(err)) from None
        self.dtype = dtype
        self._on_loading = on_loading
        self._use = threading.Lock()  # one request (or the swap) at a time
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

        with self._use:
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
            out = measured_strengths(
                current.model,
                [p for p, _ in rollouts],
                [r for _, r in rollouts],
                measure=config.measure,
                estimator=config.estimator,
                objective=config.objective,
                k=config.estimator_k,
                seed=config.estimator_seed,
                progress=lambda _n: alive(),
            )
        return ScoredTokens(
            entropy=out.entropy_bits * math.log(2),
            strength=out.measure(config.measure),
            logit_grad=None if config.measure == "logit_grad" else out.logit_grad,
            token_ids=out.token_ids,
            lengths=out.lengths,
            weights_version=current.version,
        )
