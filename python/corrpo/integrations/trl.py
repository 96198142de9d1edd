"""A CorR-PO reward function for TRL's ``GRPOTrainer`` (TRL 1.16; imports nothing of TRL), and
``FingerprintCallback`` (``corrpo.integrations.monitor``), which follows the fingerprint of any
TRL or transformers trainer while it trains.

    from corrpo.integrations.trl import CorrpoReward

    reward = CorrpoReward(model, tokenizer, RewardClient("127.0.0.1:50051"),
                          verifier=my_verifier, num_generations=8)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(num_generations=8, ...))

Each call (one per generation batch) computes the paper's strength S of every completion
token on the trainer's own model, which is the policy that sampled them (``corrpo.gradients``,
by ``estimator``), sends H, S and G to the reward server with the verifier's rewards, and
returns ``r - coef * rho(H, S)``. TRL then normalizes the rewards per group itself
(``scale_rewards``), so the server's advantages are not used. Prompts are tokenized as
``GRPOTrainer`` does (plain text: the tokenizer with its special tokens; conversations: its
chat template with the generation prompt). Groups are ``num_generations`` consecutive
completions, as TRL's sampler orders them. Under data parallelism (DDP, FSDP2, ZeRO-3: TRL
runs one process per device and spreads each group over processes), every process scores its
own completions on its own copy or shard of the model (``corrpo.gradients.sharding``), the
processes' statistics are gathered in process order (as TRL gathers rewards), the first
process asks the server, and each returns its own completions' rewards: every process must
call it, as TRL does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import ShapeError
from .processes import gathered, world


def _is_conversation(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


class CorrpoReward:
    """A GRPOTrainer reward function: the verifier's rewards with the CorR-PO term.

    model: the model GRPOTrainer trains (the same object, so S is the current policy's; a
        DDP or DeepSpeed wrapper, an FSDP2-sharded or ZeRO-3-partitioned model is scored
        whole, gathered on each process while scoring).
    tokenizer: its processing class. client: a ``corrpo.client.RewardClient``.
    verifier: a TRL-style reward function ``(prompts, completions, completion_ids, **kw)
        -> list[float]``, or None (verifier-free: r = 0).
    num_generations: GRPOConfig's. measure, estimator, objective, estimator_k: of S (see
        ``corrpo.ScoreConfig``; default the paper's ``l1_mean`` by ``local``).
    settings: any other ``ScoreConfig`` setting sent with every request (coef, gate, ...);
        gate defaults to ``correct`` with a verifier (ungated CorR-PO collapsed weak policies in
        our study) and to ``none`` without one (``correct`` needs the verifier's rewards).
    chat_template_kwargs: GRPOConfig's, for conversational prompts.
    """

    __name__ = "corrpo"  # TRL names reward functions by __name__ in its logs

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        client: Any,
        *,
        verifier: Callable[..., Sequence[float]] | None = None,
        num_generations: int,
        measure: str = "l1_mean",
        estimator: str = "local",
        objective: str = "logit",
        estimator_k: int | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        **settings: Any,
    ) -> None:
        from ..gradients import check_settings
        from ..measures import LOGIT_MEASURES

        logit_space = measure in LOGIT_MEASURES  # computed exactly from the logits: no estimator
        check_settings(objective=objective, estimator="logit_grad" if logit_space else estimator, measures=(measure,), k=estimator_k)
        if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 2:
            raise ValueError(f"num_generations must be an integer >= 2, got {num_generations!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.client = client
        self.verifier = verifier
        self.num_generations = num_generations
        self.measure = measure
        self.estimator = "exact" if logit_space else estimator
        self.objective = None if logit_space else objective
        self.estimator_k = estimator_k
        self.chat_template_kwargs = chat_template_kwargs or {}
        self.settings = {"gate": "correct" if verifier is not None else "none", **settings}
        self.calls = 0

    def prompt_ids(self, prompts: Sequence[Any]) -> list[list[int]]:
        """The prompts' token ids as GRPOTrainer makes them."""
        if _is_conversation(prompts[0]):
            out = self.tokenizer.apply_chat_template(
                conversation=list(prompts), add_generation_prompt=True, tokenize=True, return_dict=True, **self.chat_template_kwargs
            )
            return [list(ids) for ids in out["input_ids"]]
        return [list(ids) for ids in self.tokenizer(text=list(prompts))["input_ids"]]

    def strengths(self, prompt_ids: list[list[int]], completion_ids: Sequence[Sequence[int]], seed: int) -> dict[str, Any]:
        """Per completion token H (nats), S and G on the model, in completion order."""
        from ..gradients import measured_strengths

        out = measured_strengths(
            self.model,
            prompt_ids,
            completion_ids,
            measure=self.measure,
            estimator=self.estimator,
            objective=self.objective,
            k=self.estimator_k,
            seed=seed,
        )
        bounds = np.cumsum(out.lengths)[:-1]
        return {
            "entropy": np.split(out.entropy_bits * math.log(2), bounds),
            "grad_norm": np.split(out.logit_grad, bounds),
            # G rides in grad_norm; any other measure is S beside it.
            "strength": None if self.measure == "logit_grad" else np.split(out.measure(self.measure), bounds),
            "token_ids": np.split(out.token_ids, bounds),
        }

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]], **kwargs: Any) -> list[float]:
        counts = gathered(len(prompts))
        if sum(counts) % self.num_generations:
            raise ShapeError(
                f"{sum(counts)} completions (over {len(counts)} process(es)) do not form whole groups of "
                f"num_generations={self.num_generations}"
            )
        start = sum(counts[: world()[0]])
        rewards = None
        if self.verifier is not None:
            rewards = [float(r) for r in self.verifier(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)]
        stats = self.strengths(self.prompt_ids(prompts), completion_ids, seed=self.calls)
        parts = gathered((stats, rewards))
        stats = {key: None if value is None else [x for part in parts for x in part[0][key]] for key, value in stats.items()}
        if rewards is not None:
            rewards = [r for part in parts for r in part[1]]
        strength = stats.pop("strength")
        scores = _first_process(
            lambda: self.client.score(
                **stats,
                **({} if strength is None else {"strength": strength}),
                rewards=rewards,
                group_sizes=self.num_generations,
                measure=self.measure,
                estimator=self.estimator,
                objective=self.objective,
                estimator_k=self.estimator_k,
                **self.settings,
            )
        )
        self.calls += 1
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            log_metric("corrpo/rho_pooled", scores.fingerprint.rho_pooled)
            if scores.logit_grad is not None:
                log_metric("corrpo/rho_pooled_logit_grad", scores.logit_grad.rho_pooled)
        self.last = scores
        return scores.rewards[start : start + len(prompts)].tolist()


def _first_process(call: Callable[[], Any]) -> Any:
    """``call()``'s result on process 0, on every process; its error raised on every one."""
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return call()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = call()
        except Exception as err:  # noqa: BLE001 - re-raised on every process below
            box[0] = err
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def __getattr__(name: str) -> Any:
    if name == "FingerprintCallback":  # it subclasses transformers' TrainerCallback: imported when asked for
        from .monitor import FingerprintCallback

        return FingerprintCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
