"""CorR-PO in verl 0.9.1: reward managers and an advantage estimator, registered with verl's
own decorators when this module is imported (it imports verl; ``import corrpo`` does not).

**Reward** (what verl 0.9.1's trainers run): ``CorrpoRewardManager``, a reward-loop manager
(``verl.experimental.reward_loop``). verl's reward-loop workers call its ``run_single`` once
per rollout with the rollout's token ids, and put the returned scalar on the last valid
response token (``RewardManagerBase.assemble_rm_scores``). It runs the user's
``compute_score`` as verl's ``naive`` manager does (that is its base class), sends the
prompt and response ids with that score to a corrpo-server started with ``--model`` (which
computes H and the paper's strength S on its copy of the policy), and returns
``r - coef * rho(H, S)``; verl's ``grpo`` estimator then normalizes per group. The workers
import managers by path, so select it with ``source=importlib``::

    reward.reward_manager.source=importlib
    reward.reward_manager.module.path=pkg://corrpo.integrations.verl
    reward.reward_manager.name=CorrpoRewardManager
    +reward.reward_kwargs.corrpo.target=HOST:PORT      # and coef, gate, measure, ... (see below)

``reward.reward_kwargs.corrpo`` holds ``target`` (one address or a list), the
``RewardClient`` options (``timeout``, ``token``, ``tls``, ...) and any ``ScoreConfig``
setting; ``gate`` defaults to ``correct`` (the term applies only where r >= threshold), as
in ``corrpo.integrations.trl``.

``CorrpoBatchRewardManager`` is the same for verl's older batch interface
(``verl.workers.reward_manager``, ``reward_fn(batch, return_dict=True)``; verl 0.9.1's
trainers no longer call it, custom loops still do): one request per batch, groups formed
from the ``uid`` non-tensor in any order, the server's group advantages reported beside.

**Advantage** (for trainers that pass per-token statistics along):
``compute_corrpo_grpo_advantage``, registered as ``algorithm.adv_estimator=corrpo_grpo``.
With ``entropy=`` and ``strength=`` ([batch, response_length], as a patched
``compute_advantage`` passes verl's ``sum_pi_squared`` to its Optimal Token Baseline) it
applies CorR-PO in-process (``corrpo.score``) and returns corrpo's group advantages
broadcast over the response mask: for groups of 2 or more these equal verl's own ``grpo``
(or its Dr.GRPO with ``norm_adv_by_std_in_grpo=False``) applied to ``r - coef * rho``.
verl 0.9.1's own ``compute_advantage`` passes custom estimators only rewards, mask, uid and
config (the actor's entropies are dropped after logging, and no strength exists in verl), so
without them the estimator raises rather than silently computing plain GRPO.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import numpy as np
import torch
from verl import DataProto
from verl.experimental.reward_loop.reward_manager import register as register_reward_loop_manager
from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager
from verl.trainer.ppo.core_algos import register_adv_est
from verl.workers.reward_manager import register as register_batch_reward_manager
from verl.workers.reward_manager.naive import NaiveRewardManager as NaiveBatchRewardManager

from ..errors import ConfigError, ShapeError
from ..scoring import ScoreConfig, Scores, score

_SCORE_SETTINGS = tuple(f.name for f in fields(ScoreConfig))


def _plain(settings: Any) -> dict[str, Any]:
    """A plain dict of a mapping that may be an OmegaConf node (verl's configs are)."""
    if settings is None:
        return {}
    if type(settings).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        settings = OmegaConf.to_container(settings, resolve=True)
    if not isinstance(settings, Mapping):
        raise ConfigError(f"corrpo settings must be a mapping, got {type(settings).__name__}", field="corrpo")
    return dict(settings)


def _score_settings(settings: dict[str, Any], where: str) -> dict[str, Any]:
    """The ScoreConfig settings of ``settings``, checked now (a bad value fails at startup,
    not at the first batch)."""
    unknown = sorted(set(settings) - set(_SCORE_SETTINGS))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {unknown}; settings are {list(_SCORE_SETTINGS)}", field="corrpo")
    ScoreConfig(**settings)
    return settings


def _client(settings: Any, where: str) -> tuple[Any, dict[str, Any]]:
    """A RewardClient and the score settings, from one mapping: ``target``, the client's
    options, and ScoreConfig settings (gate defaulting to ``correct``)."""
    from ..client import DEFAULT_TARGET, RewardClient, _Client

    settings = _plain(settings)
    options = [name for name in inspect.signature(_Client.__init__).parameters if name not in ("self", "targets")]
    client_kwargs = {name: settings.pop(name) for name in options if name in settings}
    target = settings.pop("target", DEFAULT_TARGET)
    unknown = sorted(set(settings) - set(_SCORE_SETTINGS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown setting(s) {unknown}; settings are target, {', '.join(options)} and {list(_SCORE_SETTINGS)}",
            field="corrpo",
        )
    checked = _score_settings({"gate": "correct", **settings}, where)
    return RewardClient(target, **client_kwargs), checked


def _ids(item: Any) -> tuple[np.ndarray, np.ndarray]:
    """A rollout's prompt and response token ids without padding: verl left-pads prompts and
    right-pads responses, and ``attention_mask`` marks the real tokens of both."""
    prompts, responses = item.batch["prompts"], item.batch["responses"]
    mask = item.batch["attention_mask"].bool()
    prompt_len = prompts.shape[-1]
    prompt = prompts[mask[:prompt_len]]
    response = responses[mask[prompt_len:]]
    return prompt.cpu().numpy().astype(np.int64), response.cpu().numpy().astype(np.int64)


def _extra_info(scores: Scores, k: int) -> dict[str, Any]:
    """What corrpo adds to verl's reward_extra_info for rollout ``k`` of ``scores`` (NaN rho:
    undefined, as corrpo reports it; never 0)."""
    return {
        "corrpo_rho": float(scores.rho[k]),
        "corrpo_regularized": bool(scores.regularized[k]),
        "corrpo_n_tokens": int(scores.n_tokens[k]),
        "corrpo_entropy_mean": float(scores.entropy_mean[k]),
        "corrpo_strength_mean": float(scores.grad_norm_mean[k]),
    }


@register_reward_loop_manager("corrpo")
class CorrpoRewardManager(NaiveRewardManager):
    """verl's ``naive`` reward-loop manager (the user's ``compute_score`` on the decoded
    response), with CorR-PO: the returned reward is ``r - coef * rho(H, S)``, H and S of the
    rollout's response tokens computed by a model-backed corrpo-server. Settings come from
    ``config.reward.reward_kwargs.corrpo`` (see the module's docstring).

    Each call scores one rollout (verl's reward loop hands them over one at a time): rho is
    per rollout, so no group is needed here; verl's advantage estimator forms the groups.
    For multi-turn rollouts every response token is scored, tool output included.
    """

    def __init__(
        self,
        config: Any,
        tokenizer: Any,
        compute_score: Any,
        reward_router_address: Any = None,
        reward_model_tokenizer: Any = None,
    ) -> None:
        super().__init__(config, tokenizer, compute_score, reward_router_address, reward_model_tokenizer)
        settings = _plain(config.reward.get("reward_kwargs", None)).get("corrpo")
        self.client, self.settings = _client(settings, "reward.reward_kwargs.corrpo")

    async def run_single(self, data: DataProto) -> dict[str, Any]:
        verdict = await super().run_single(data)
        prompt, response = _ids(data[-1])  # the last sequence, the one the verifier scored
        # The blocking client in a thread: gRPC's asyncio channels are bound to one event
        # loop, and verl's workers may call from another than the one this object saw.
        scores = await asyncio.to_thread(
            self.client.score,
            prompt_ids=[prompt],
            token_ids=[response],
            rewards=[float(verdict["reward_score"])],
            group_sizes=[1],
            **self.settings,
        )
        info = {**verdict["reward_extra_info"], **_extra_info(scores, 0)}
        return {"reward_score": float(scores.rewards[0]), "reward_extra_info": info}


def groups_by_uid(uid: Any, n: int) -> dict[Any, list[int]]:
    """The rollouts of each ``uid`` (verl's GRPO group index), in batch order, groups in order
    of first appearance: the rollouts of a group need not be contiguous."""
    if uid is None:
        raise ShapeError(
            "the batch has no 'uid' non-tensor: corrpo forms GRPO groups from it, as verl's grpo does", field="uid"
        )
    uid = np.asarray(uid, dtype=object)
    if uid.shape != (n,):
        raise ShapeError(f"'uid' has shape {uid.shape} for {n} rollouts", field="uid")
    members: dict[Any, list[int]] = {}
    for i, u in enumerate(uid.tolist()):
        members.setdefault(u, []).append(i)
    return members


def _order(members: dict[Any, list[int]]) -> tuple[np.ndarray, list[int], np.ndarray]:
    """The request order that puts each group together, the group sizes, and where each
    rollout of the batch sits in that order."""
    order = np.array([i for rows in members.values() for i in rows], dtype=np.int64)
    at = np.empty(len(order), dtype=np.int64)
    at[order] = np.arange(len(order))
    return order, [len(rows) for rows in members.values()], at


@register_batch_reward_manager("corrpo")
class CorrpoBatchRewardManager(NaiveBatchRewardManager):
    """verl's batch ``naive`` reward manager with CorR-PO, for loops that call
    ``reward_fn(batch, return_dict=True)``. The verifier's reward tensor (per token; its sum
    is r) gets ``-coef * rho`` added on each rollout's last valid token. One request scores
    the whole batch, grouped by ``uid`` in any order; ``reward_extra_info`` carries rho and
    the server's group advantages (``corrpo_advantage``). ``corrpo``: the settings (target,
    client options, ScoreConfig settings), as ``reward.reward_kwargs.corrpo`` above; they may
    also be given as keyword arguments.
    """

    def __init__(
        self,
        tokenizer: Any,
        num_examine: int,
        compute_score: Any = None,
        reward_fn_key: str = "data_source",
        compute_score_timeout: float | None = None,
        corrpo: Any = None,
        **settings: Any,
    ) -> None:
        super().__init__(tokenizer, num_examine, compute_score, reward_fn_key, compute_score_timeout)
        self.client, self.settings = _client({**_plain(corrpo), **settings}, "CorrpoBatchRewardManager")

    def __call__(self, data: DataProto, return_dict: bool = False) -> torch.Tensor | dict[str, Any]:
        if "rm_scores" in data.batch.keys():
            # verl's naive manager passes rm_scores through as the rewards: scores that a reward
            # loop (CorrpoRewardManager among them) already made, which the term must not hit twice.
            raise ConfigError(
                "CorrpoBatchRewardManager: the batch already has rm_scores (a reward loop scored it); "
                "use CorrpoRewardManager in the reward loop instead, not both",
                field="rm_scores",
            )
        n = len(data)
        order, sizes, at = _order(groups_by_uid(data.non_tensor_batch.get("uid"), n))
        verdict = super().__call__(data, return_dict=True)
        reward_tensor = verdict["reward_tensor"].clone()
        rewards = reward_tensor.sum(dim=-1).double()
        pairs = [_ids(data[int(i)]) for i in order]
        scores = self.client.score(
            prompt_ids=[p for p, _ in pairs],
            token_ids=[r for _, r in pairs],
            rewards=rewards[order].tolist(),
            group_sizes=sizes,
            **self.settings,
        )
        last = data.batch["attention_mask"][:, data.batch["prompts"].shape[-1] :].sum(dim=-1) - 1
        delta = torch.as_tensor(scores.rewards[at], dtype=torch.float64) - rewards
        reward_tensor[torch.arange(n), last] += delta.to(reward_tensor.dtype)
        info = defaultdict(list, {key: list(values) for key, values in verdict["reward_extra_info"].items()})
        for k in at:  # rollout i of the batch is rollout at[i] of the request
            for key, value in {**_extra_info(scores, int(k)), "corrpo_advantage": float(scores.advantages[k])}.items():
                info[key].append(value)
        if return_dict:
            return {"reward_tensor": reward_tensor, "reward_extra_info": info}
        return reward_tensor


def _masked_rows(values: Any, mask: torch.Tensor, name: str) -> list[np.ndarray]:
    if not isinstance(values, torch.Tensor) or values.shape != mask.shape:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ShapeError(
            f"{name} must be a tensor shaped like response_mask {tuple(mask.shape)}, got {shape}", field=name
        )
    rows = values.detach().to("cpu", torch.float64).numpy()
    keep = mask.detach().cpu().bool().numpy()
    return [rows[b][keep[b]] for b in range(len(rows))]


@register_adv_est("corrpo_grpo")
def compute_corrpo_grpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray | None = None,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
    *,
    entropy: torch.Tensor | None = None,
    strength: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CorR-PO group advantages, verl's grpo signature plus the per-token statistics.

    token_level_rewards, response_mask: [B, L]; r of a rollout is its rewards' sum (as in
    verl's grpo). index: the ``uid`` of each rollout; groups may come in any order and need
    2 or more rollouts (verl's grpo gives a lone rollout its raw score, corrpo gives it 0:
    neither is a group baseline). entropy, strength: [B, L] per-token H (nats) and S, read
    where response_mask is 1. config: verl's algorithm config; ``config.corrpo`` may hold
    ScoreConfig settings (coef, gate (default ``correct``), measure naming S, ...), and its
    ``norm_adv_by_std_in_grpo`` (read as verl's grpo_passk does) picks grpo or drgrpo.
    Returns (advantages, returns), equal, each corrpo's advantage on every response token.
    """
    if entropy is None or strength is None:
        raise ConfigError(
            "corrpo_grpo needs per-token entropy= and strength= [batch, response_length] beside response_mask; "
            "verl 0.9.1's compute_advantage passes custom estimators only token_level_rewards, response_mask, index "
            "and config, so pass them from a trainer that has them, or put CorR-PO into the reward "
            "(corrpo.integrations.verl.CorrpoRewardManager) and keep algorithm.adv_estimator=grpo",
            field="entropy" if entropy is None else "strength",
        )
    if epsilon != 1e-6:
        raise ConfigError(
            f"corrpo's grpo advantage divides by std + 1e-6 (SPEC 5); epsilon={epsilon!r} cannot be honoured", field="epsilon"
        )
    given = _plain(config.get("corrpo", None) if config is not None else None)
    if "advantage" in given:
        raise ConfigError(
            "algorithm.corrpo.advantage is set by algorithm.norm_adv_by_std_in_grpo (grpo or drgrpo)", field="advantage"
        )
    settings = _score_settings({"gate": "correct", **given}, "algorithm.corrpo")
    if config is not None:
        norm_adv_by_std_in_grpo = config.get("norm_adv_by_std_in_grpo", norm_adv_by_std_in_grpo)
    n = token_level_rewards.shape[0]
    if response_mask.shape != token_level_rewards.shape:
        raise ShapeError(
            f"response_mask {tuple(response_mask.shape)} and token_level_rewards {tuple(token_level_rewards.shape)} differ",
            field="response_mask",
        )
    members = groups_by_uid(index, n)
    for uid, rows in members.items():
        if len(rows) < 2:
            raise ShapeError(
                f"uid {uid!r} has {len(rows)} rollout: corrpo_grpo needs groups of 2 or more "
                "(actor_rollout_ref.rollout.n >= 2)",
                field="index",
            )
    order, sizes, at = _order(members)
    h = _masked_rows(entropy, response_mask, "entropy")
    s = _masked_rows(strength, response_mask, "strength")
    rewards = token_level_rewards.detach().to("cpu", torch.float64).sum(dim=-1).numpy()
    scores = score(
        np.concatenate([h[i] for i in order]),
        np.concatenate([s[i] for i in order]),
        [len(h[i]) for i in order],
        sizes,
        rewards=rewards[order],
        config=ScoreConfig(**settings, advantage="grpo" if norm_adv_by_std_in_grpo else "drgrpo"),
    )
    out = torch.as_tensor(scores.advantages[at], dtype=token_level_rewards.dtype, device=token_level_rewards.device)
    out = out.unsqueeze(-1) * response_mask.to(token_level_rewards.dtype)
    return out, out
