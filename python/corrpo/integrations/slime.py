"""CorR-PO in slime (THUDM/slime): a ``--custom-rm-path`` reward and a
``--custom-advantage-function-path`` advantage. Imports nothing of slime: slime is not on
PyPI, so these follow its interfaces as read from its source (``load_function("module.attr")``;
``await rm(args, sample)``, or ``await rm(args, samples)`` with ``--group-rm``: one
function serves both; ``fn(args, rollout_data)`` setting ``rollout_data["advantages"]`` and
``["returns"]``), and their tests use slime's data shapes without slime itself.

Where S comes from. slime gives a hook per-token entropy (``--use-rollout-entropy``) and
log-probs, but no gradient strength: neither the paper's parameter-space S (one backward per
token) nor even the logit-space G = ||p - e_y||, which needs sum(p^2) as well as p_y. So
both hooks send token ids to a corrpo-server started with ``--model`` (a copy of the
policy), which computes H and S itself; slime's own entropies are not needed.

    # my_rewards.py, then: --custom-rm-path my_rewards.rm [--group-rm]
    from corrpo.integrations.slime import corrpo_rm
    rm = corrpo_rm(my_verifier, target="10.0.0.5:50051", coef=0.1)

The reward (recommended): ``r - coef * rho(H, S)`` per sample, with ``r`` from the user's
own slime reward function (the same ``(args, sample)`` or ``(args, samples)`` form); slime
then normalizes per group as usual. Each call scores what it is given: one sample, or with
``--group-rm`` one group in one request.

The advantage: ``advantage`` (target from ``CORRPO_TARGET``, default 127.0.0.1:50051) or
``corrpo_advantage(target=..., ...)`` scores the rank's samples in one request and writes
corrpo's group advantages (grpo by default) on every response token. It needs raw rewards
(``--disable-rewards-normalization``: corrpo normalizes ``r - coef * rho`` itself, SPEC 5)
and the rank's samples in whole groups of ``args.n_samples_per_prompt``, consecutive; it
reads ``rollout_data["tokens"]`` (prompt + response ids) and ``["response_lengths"]``.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import numpy as np

from ..errors import ConfigError, ShapeError
from ..scoring import ScoreConfig

_SCORE_SETTINGS = tuple(f.name for f in fields(ScoreConfig))


class _Scorer:
    """A RewardClient made on first use (so that loading the hook connects nowhere), and the
    score settings, checked now; gate defaults to ``correct``, as in the other integrations."""

    def __init__(self, target: str | Sequence[str] | None, client_options: dict[str, Any], settings: dict[str, Any]) -> None:
        unknown = sorted(set(settings) - set(_SCORE_SETTINGS))
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown}; settings are {list(_SCORE_SETTINGS)}", field="settings")
        self.settings = {"gate": "correct", **settings}
        ScoreConfig(**self.settings)
        self.target = target
        self.client_options = client_options
        self._client: Any = None

    def score(self, **request: Any) -> Any:
        if self._client is None:
            from ..client import DEFAULT_TARGET, RewardClient

            self._client = RewardClient(self.target or os.environ.get("CORRPO_TARGET", DEFAULT_TARGET), **self.client_options)
        return self._client.score(**request, **self.settings)


def _split(tokens: Any, response_length: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(prompt ids, response ids) of one sample: slime keeps prompt + response in ``tokens``
    and the response's length beside it."""
    ids = np.asarray(tokens.tolist() if hasattr(tokens, "tolist") else list(tokens), dtype=np.int64)
    n = int(response_length)
    if ids.ndim != 1 or not 0 <= n <= len(ids):
        raise ShapeError(f"{where}: response_length {n} does not fit tokens of shape {ids.shape}", field="response_length")
    return ids[: len(ids) - n], ids[len(ids) - n :]


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ConfigError(f"{where} returned {value!r}; corrpo needs one number per sample", field="verifier")
    return float(value)


def corrpo_rm(
    verifier: Callable[..., Any],
    *,
    target: str | Sequence[str] | None = None,
    client_options: dict[str, Any] | None = None,
    **settings: Any,
) -> Callable[..., Any]:
    """A slime custom reward function: ``async rm(args, sample) -> float``, or with
    ``--group-rm`` ``async rm(args, samples) -> list[float]`` (one request for the group).

    verifier: the user's own slime reward function, of the same form (sync or async), giving
        r. target: the model-backed corrpo-server(s), default ``CORRPO_TARGET`` or
        127.0.0.1:50051. client_options: ``RewardClient`` options (timeout, token, tls, ...).
    settings: ScoreConfig settings (coef, gate (default ``correct``), threshold, measure,
        estimator, ...). The sample's ``tokens`` and ``response_length`` give the ids.
    """
    scorer = _Scorer(target, dict(client_options or {}), settings)

    async def rm(args: Any, sample: Any) -> float | list[float]:
        group = isinstance(sample, (list, tuple))
        samples = list(sample) if group else [sample]
        verdict = verifier(args, sample)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        rewards = list(verdict) if group else [verdict]
        if len(rewards) != len(samples):
            raise ShapeError(f"the verifier gave {len(rewards)} rewards for {len(samples)} samples", field="verifier")
        pairs = [_split(s.tokens, s.response_length, f"sample {k}") for k, s in enumerate(samples)]
        # The blocking client in a thread: gRPC's asyncio channels are bound to the event
        # loop that made them, and slime's rollout may run this on another.
        scores = await asyncio.to_thread(
            scorer.score,
            prompt_ids=[p for p, _ in pairs],
            token_ids=[r for _, r in pairs],
            rewards=[_number(r, "the verifier") for r in rewards],
            group_sizes=[len(samples)],
        )
        out = [float(x) for x in scores.rewards]
        return out if group else out[0]

    return rm


def _per_sample(rollout_data: dict[str, Any], key: str, n: int) -> list[Any]:
    if key not in rollout_data:
        raise ShapeError(f"rollout_data has no {key!r} (it has {sorted(rollout_data)})", field=key)
    values = list(rollout_data[key])
    if len(values) != n:
        raise ShapeError(f"rollout_data[{key!r}] holds {len(values)} samples, rollout_data['rewards'] {n}", field=key)
    return values


def corrpo_advantage(
    *,
    target: str | Sequence[str] | None = None,
    client_options: dict[str, Any] | None = None,
    **settings: Any,
) -> Callable[[Any, dict[str, Any]], None]:
    """A slime custom advantage function ``advantage(args, rollout_data)``: CorR-PO group
    advantages (``settings["advantage"]``, default grpo) of the rank's samples, scored in one
    request, written as ``rollout_data["advantages"]`` and ``["returns"]`` (one tensor per
    sample, shaped like its ``log_probs``, each token holding the sample's advantage, as
    slime's own GRPO lays them out). Arguments as ``corrpo_rm``'s.
    """
    scorer = _Scorer(target, dict(client_options or {}), settings)

    def advantage(args: Any, rollout_data: dict[str, Any]) -> None:
        import torch

        if getattr(args, "disable_rewards_normalization", None) is not True:
            raise ConfigError(
                "corrpo's advantage normalizes r - coef * rho per group itself (SPEC 5): run slime with "
                "--disable-rewards-normalization so that rollout_data['rewards'] are the raw rewards",
                field="disable_rewards_normalization",
            )
        group = getattr(args, "n_samples_per_prompt", None)
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise ConfigError(
                f"args.n_samples_per_prompt must be a positive integer, got {group!r}", field="n_samples_per_prompt"
            )
        rewards = [
            _number(r.item() if hasattr(r, "item") else r, "rollout_data['rewards']") for r in rollout_data.get("rewards", [])
        ]
        n = len(rewards)
        if n == 0 or n % group:
            raise ShapeError(
                f"this rank holds {n} samples, not whole groups of n_samples_per_prompt={group}: corrpo's advantage "
                "needs each group's samples together on one rank",
                field="rewards",
            )
        tokens = _per_sample(rollout_data, "tokens", n)
        lengths = _per_sample(rollout_data, "response_lengths", n)
        like = _per_sample(rollout_data, "log_probs", n)
        pairs = [_split(t, r, f"sample {k}") for k, (t, r) in enumerate(zip(tokens, lengths))]
        scores = scorer.score(
            prompt_ids=[p for p, _ in pairs], token_ids=[r for _, r in pairs], rewards=rewards, group_sizes=group
        )
        advantages = [torch.full_like(x, float(a), dtype=torch.float32) for x, a in zip(like, scores.advantages)]
        rollout_data["advantages"] = advantages
        rollout_data["returns"] = list(advantages)  # GRPO's returns are its advantages, as in slime

    return advantage


#: ``--custom-advantage-function-path corrpo.integrations.slime.advantage``: the defaults,
#: against the server at ``CORRPO_TARGET`` (default 127.0.0.1:50051).
advantage = corrpo_advantage()
