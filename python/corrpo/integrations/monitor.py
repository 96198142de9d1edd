"""``FingerprintCallback``: the inversion fingerprint of a model while it trains, as a
``transformers.TrainerCallback`` for TRL's ``SFTTrainer`` and ``GRPOTrainer`` and the plain
``Trainer``.

    cb = FingerprintCallback(trainer, prompts=held_out_conversations, every=50)
    trainer.add_callback(cb)
    trainer.train()

At the start of training, every ``every`` steps and at the last step it scores a fixed probe
set on the current weights (``corrpo.gradients.token_strengths``): ``texts`` teacher-forced
(every token after the first), ``prompts`` answered by the model itself (chat template; all of
a process's prompts in one batch, its sampling seeded with ``seed`` at every evaluation, so the
answers change only with the weights).
It logs, through the trainer's own log (so the console, W&B and TensorBoard get it):

    fingerprint/{pooled,within,unique}/<measure>    Spearman rho(H, S) over tokens, mean over
                                                    responses, over unique token ids (the paper's)
    .../ci_low, .../ci_high                         95% bootstrap CI over responses
    fingerprint/n_tokens, n_responses, n_ids, seconds

and writes each evaluation's per-token H and strengths to ``<dir>/step-XXXXXX.npz`` and its
statistics to ``<dir>/history.jsonl`` (``dir``: ``output_dir``, default the trainer's
``output_dir``/fingerprint).

It takes the trainer, as TRL's own logging callbacks do (``LogCompletionsCallback``,
``WinRateCallback``): a callback's ``on_log`` runs after the reporting callbacks, so the only
way into W&B and TensorBoard is the trainer's ``log``.

It leaves the run as it found it: train mode, gradients, and the RNG state (the sampling draws
from a forked generator), so a run with the callback trains the same weights as one without.
Under DDP every process answers and scores its share of the probe set (a sampled answer depends
on the batch it is drawn in, so on the number of processes; greedy ones do not) and every
process logs the same gathered statistics (the trainer's reporters write on the main process
only).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import TrainerCallback

from ..errors import ConfigError
from ..fingerprinting.analysis import VIEWS, correlations
from ..fingerprinting.generate import Prompt, Response, encode_prompt, generate_batch
from ..fingerprinting.score import score_responses
from .processes import gathered, world


class FingerprintCallback(TrainerCallback):
    """Scores a fixed probe set at the start, every ``every`` steps and at the end of training.

    trainer: the ``Trainer`` (or TRL trainer) it watches; its ``processing_class`` tokenizes
        unless ``tokenizer`` is given.
    texts: strings scored teacher-forced, tokenized as ``tokenizer(text)`` does, every token
        after the first scored.
    prompts: strings or conversations (lists of ``{"role", "content"}``) the model answers
        (its chat template when it has one; ``temperature`` 0 is greedy, else seeded sampling),
        at most ``max_new_tokens`` tokens each; the answers are scored.
    measures, estimator, k, objective: of the strength (``token_strengths``); the defaults are
        the paper's ``nuclear_qkvo`` and ``l1_mean`` by the exact measure.
    max_tokens: the budget of scored tokens per evaluation: the texts' tokens plus
        ``max_new_tokens`` per prompt must fit, or it is an error.
    n_boot, min_tokens, seed: of the bootstrap CIs, of the within-response view, of the
        sampling and the estimator.
    """

    def __init__(
        self,
        trainer: Any,
        *,
        texts: Sequence[str] | None = None,
        prompts: Sequence[str | list[dict[str, Any]]] | None = None,
        every: int = 50,
        measures: Sequence[str] = ("nuclear_qkvo", "l1_mean"),
        estimator: str = "exact",
        k: int | None = None,
        objective: str = "logit",
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        max_tokens: int = 4096,
        n_boot: int = 1000,
        min_tokens: int = 8,
        seed: int = 0,
        output_dir: str | Path | None = None,
        tokenizer: Any = None,
    ) -> None:
        from ..gradients import check_settings

        if not texts and not prompts:
            raise ConfigError("FingerprintCallback needs a probe set: texts= (teacher-forced) or prompts= (answered by the model)")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"every must be an integer >= 1 (steps between evaluations), got {every!r}")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
        self.measures, k_used = check_settings(objective=objective, estimator=estimator, measures=tuple(measures), k=k)
        self.k = k_used or None  # 0: the estimator takes no k
        tokenizer = tokenizer if tokenizer is not None else trainer.processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a multimodal processor's text tokenizer
        if tokenizer is None:
            raise ConfigError("FingerprintCallback needs a tokenizer: the trainer has no processing_class; pass tokenizer=")
        self.trainer = trainer
        self.tokenizer = tokenizer
        self.texts = [self._text_ids(t, i) for i, t in enumerate(texts or ())]
        self.prompts = [_prompt(p, i) for i, p in enumerate(prompts or ())]
        for p in self.prompts:  # fails here, not at the first evaluation
            encode_prompt(tokenizer, p, where=f"prompts[{p.index}]")
        scored = sum(len(ids) - 1 for ids in self.texts) + len(self.prompts) * max_new_tokens
        if scored > max_tokens:
            raise ConfigError(
                f"the probe set scores up to {scored} tokens per evaluation ({sum(len(i) - 1 for i in self.texts)} of texts + "
                f"{len(self.prompts)} prompts x max_new_tokens={max_new_tokens}), over max_tokens={max_tokens}: "
                "give fewer texts or prompts, a lower max_new_tokens, or raise max_tokens"
            )
        self.every = every
        self.estimator = estimator
        self.objective = objective
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.n_boot = n_boot
        self.min_tokens = min_tokens
        self.seed = seed
        self.output_dir = Path(output_dir) if output_dir is not None else Path(trainer.args.output_dir) / "fingerprint"
        self.history: list[dict[str, Any]] = []
        self._last_step: int | None = None

    def _text_ids(self, text: str, i: int) -> list[int]:
        if not isinstance(text, str):
            raise ConfigError(f"texts[{i}] must be a string, got {type(text).__name__}")
        ids = [int(t) for t in self.tokenizer(text)["input_ids"]]
        if len(ids) < 2:
            raise ConfigError(f"texts[{i}] is {len(ids)} token(s): a teacher-forced text needs at least 2 (its first is context only)")
        return ids

    # --- the trainer's events -------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._evaluate(state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.every == 0 or state.global_step >= state.max_steps:
            self._evaluate(state)

    # --- one evaluation ---------------------------------------------------------------------

    def _evaluate(self, state: Any) -> None:
        import torch

        if self._last_step == state.global_step:  # the last step is also a multiple of every
            return
        self._last_step = state.global_step
        start = time.perf_counter()
        rank, size = world()
        model = self.trainer.model
        was_training = model.training
        model.eval()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        try:
            with torch.random.fork_rng(devices=devices):
                responses = self._responses(model, rank, size)
                columns = self._columns(model, responses)
        finally:
            model.train(was_training)
        columns = _concatenated(gathered(columns))
        entry = self._statistics(state, columns, time.perf_counter() - start)
        self.history.append(entry)
        if state.is_world_process_zero:
            self._write(state.global_step, columns, entry)
        # Trainer.log itself, not a subclass's: GRPOTrainer's log would flush its own metrics
        # (averaged since its last log) into this entry. Its on_log event clears should_log,
        # which the trainer reads after on_step_end to log this step's loss: kept as it was.
        from transformers import Trainer

        control = self.trainer.control
        should_log = control.should_log
        Trainer.log(self.trainer, dict(entry["metrics"]))
        control.should_log = should_log

    def _responses(self, model: Any, rank: int, size: int) -> list[Response]:
        """This process's share of the probe set: texts as responses after their first
        token, prompts answered now."""
        out = []
        for i, ids in enumerate(self.texts):
            if i % size == rank:
                out.append(Response(i, i, 0, f"text-{i}", "", "", prompt_ids=ids[:1], response_ids=ids[1:]))
        mine = [p for p in self.prompts if p.index % size == rank]
        if mine:
            answers = generate_batch(
                model, self.tokenizer, mine, max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=self.seed
            )
            for r in answers:
                r.index = len(self.texts) + r.prompt_index  # unique over processes
                out.append(r)
        return [r for r in out if r.response_ids]

    def _columns(self, model: Any, responses: list[Response]) -> dict[str, np.ndarray]:
        if not responses:
            return {}
        scored = score_responses(
            model, responses, objective=self.objective, measures=self.measures, estimator=self.estimator, k=self.k, seed=self.seed
        )
        keep = ("response", "token_id", "position", "response_position", "entropy_bits", *scored.measures)
        return {c: scored.columns[c] for c in keep}

    def _statistics(self, state: Any, columns: dict[str, np.ndarray], seconds: float) -> dict[str, Any]:
        metrics: dict[str, float] = {}
        stats: dict[str, Any] = {}
        n_tokens = len(columns.get("entropy_bits", ()))
        for m in self.measures:
            if not n_tokens:
                break
            c = correlations(
                columns["entropy_bits"], columns[m], columns["token_id"], columns["response"],
                n_boot=self.n_boot, seed=self.seed, min_tokens=self.min_tokens,
            )  # fmt: skip
            stats[m] = c["spearman"]
            for view in VIEWS:
                figure = c["spearman"][view]
                if figure["rho"] is None:  # undefined (the reason is in history.jsonl), not NaN
                    continue
                key = f"fingerprint/{view}/{m}"
                metrics[key] = figure["rho"]
                if figure.get("ci"):
                    metrics[f"{key}/ci_low"], metrics[f"{key}/ci_high"] = figure["ci"]
            metrics["fingerprint/n_ids"] = c["spearman"]["unique"]["n_ids"]
            metrics["fingerprint/n_responses"] = c["n_responses"]
        metrics["fingerprint/n_tokens"] = n_tokens
        metrics["fingerprint/seconds"] = seconds
        return {
            "step": state.global_step,
            "num_input_tokens_seen": getattr(state, "num_input_tokens_seen", None),
            "metrics": metrics,
            "statistics": stats,
            "settings": {"estimator": self.estimator, "k": self.k, "objective": self.objective, "n_boot": self.n_boot, "min_tokens": self.min_tokens},
        }

    def _write(self, step: int, columns: dict[str, np.ndarray], entry: dict[str, Any]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(self.output_dir / f"step-{step:06d}.npz", **columns)
        with open(self.output_dir / "history.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, allow_nan=False) + "\n")


def _prompt(p: Any, i: int) -> Prompt:
    if isinstance(p, str):
        return Prompt(i, i, prompt=p)
    if isinstance(p, list) and p and all(isinstance(m, dict) and "role" in m and "content" in m for m in p):
        return Prompt(i, i, messages=p)
    raise ConfigError(f"prompts[{i}] must be a string or a conversation (a list of {{'role', 'content'}} dicts), got {p!r:.80}")


def _concatenated(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Every process's columns, in response order."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    columns = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    order = np.argsort(columns["response"], kind="stable")
    return {c: v[order] for c, v in columns.items()}


__all__ = ["FingerprintCallback"]
