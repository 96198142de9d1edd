"""CorR-PO in slime (THUDM/slime): a ``--custom-rm-path`` reward and a
``--custom-reward-post-process-path`` group advantage. Imports nothing of slime: slime is not
on PyPI, so these follow its interfaces as read from its source (``load_function("module.attr")``;
``await rm(args, sample)``, or ``await rm(args, samples)`` with ``--group-rm``: one function
serves both; ``post_process(args, samples) -> (raw_rewards, rewards)``), and their tests use
slime's data shapes without slime itself.

Where S comes from. slime gives its hooks per-token entropy (``--use-rollout-entropy``) and
log-probs, but no gradient strength: neither the paper's parameter-space S (one backward per
token) nor even the logit-space G = ||p - e_y||, which needs sum(p^2) as well as p_y. So
both hooks send token ids to a corrpo-server started with ``--model`` (a copy of the
policy), which computes H and S itself; slime's own entropies are not needed.

    # my_rewards.py, then: --custom-rm-path my_rewards.rm [--group-rm]
    from corrpo.integrations.slime import corrpo_rm
    rm = corrpo_rm(my_verifier, target="10.0.0.5:50051", coef=0.1)

The reward: ``r - coef * rho(H, S)`` per sample, with ``r`` from the user's own slime reward
function (the same ``(args, sample)`` or ``(args, samples)`` form); slime then normalizes per
group as usual. Each call scores what it is given: one sample, or with ``--group-rm`` one
group in one request.

The group advantage: ``reward_post_process`` (target from ``CORRPO_TARGET``, default
127.0.0.1:50051) or ``corrpo_reward_post_process(target=..., ...)``. slime's RolloutManager
calls it (``_post_process_rewards``) with every sample of the rollout, before the
data-parallel split, in groups of ``args.n_samples_per_prompt`` consecutive samples, and
uses the second list it returns in place of its own group normalization: GRPO's return and
advantage of every token of the sample. It scores all groups in one request and returns
(the raw rewards, corrpo's group advantages of ``r - coef * rho``): grpo, or drgrpo under
slime's ``--disable-grpo-std-normalization`` (the regularized rewards themselves under
``--disable-rewards-normalization``). A custom advantage function is not offered: slime runs
it per data-parallel rank after its DP schedule has packed samples by length, so a rank
holds neither whole groups nor group order.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
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
        # slime calls the rm hook from many threads (asyncio.to_thread): one client, made once
        self._lock = threading.Lock()

    def score(self, **request: Any) -> Any:
        with self._lock:
            if self._client is None:
                from ..client import DEFAULT_TARGET, RewardClient

                target = self.target or os.environ.get("CORRPO_TARGET", DEFAULT_TARGET)
                self._client = RewardClient(target, **self.client_options)
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


def _raw_reward(args: Any, sample: Any, k: int) -> float:
    """The reward as slime reads it (``Sample.get_reward_value``: ``reward``, or
    ``reward[args.reward_key]`` with ``--reward-key``), as one number."""
    value = sample.get_reward_value(args) if hasattr(sample, "get_reward_value") else sample.reward
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        hint = " (a dict reward needs --reward-key)" if isinstance(value, dict) else ""
        raise ConfigError(f"sample {k}'s reward is {value!r}; corrpo needs one number per sample{hint}", field="reward")
    return float(value)


def corrpo_reward_post_process(
    *,
    target: str | Sequence[str] | None = None,
    client_options: dict[str, Any] | None = None,
    **settings: Any,
) -> Callable[[Any, Sequence[Any]], tuple[list[float], list[float]]]:
    """A slime reward post-process function ``post_process(args, samples) -> (raw_rewards,
    rewards)``: ``rewards`` are corrpo's group advantages of ``r - coef * rho`` (grpo, or
    drgrpo under ``--disable-grpo-std-normalization``; the regularized rewards themselves under
    ``--disable-rewards-normalization``), for all groups of the rollout in one request.
    Arguments as ``corrpo_rm``'s, less ``advantage``, which follows slime's flags.
    """
    if "advantage" in settings:
        raise ConfigError(
            "the advantage follows slime's flags (grpo; drgrpo under --disable-grpo-std-normalization; "
            "none under --disable-rewards-normalization); do not set it",
            field="advantage",
        )
    scorer = _Scorer(target, dict(client_options or {}), settings)

    def post_process(args: Any, samples: Sequence[Any]) -> tuple[list[float], list[float]]:
        group = getattr(args, "n_samples_per_prompt", None)
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise ConfigError(
                f"args.n_samples_per_prompt must be a positive integer, got {group!r}", field="n_samples_per_prompt"
            )
        samples = list(samples)
        for k, sample in enumerate(samples):
            if isinstance(sample, (list, tuple)):
                raise ShapeError(
                    f"sample {k} is a {type(sample).__name__}: the hook takes slime's flat list of samples", field="samples"
                )
        if not samples or len(samples) % group:
            raise ShapeError(
                f"{len(samples)} samples are not whole groups of n_samples_per_prompt={group}", field="samples"
            )
        raw = [_raw_reward(args, s, k) for k, s in enumerate(samples)]
        pairs = [_split(s.tokens, s.response_length, f"sample {k}") for k, s in enumerate(samples)]
        if not getattr(args, "rewards_normalization", True):
            advantage = "none"
        else:
            advantage = "grpo" if getattr(args, "grpo_std_normalization", True) else "drgrpo"
        scores = scorer.score(
            prompt_ids=[p for p, _ in pairs],
            token_ids=[r for _, r in pairs],
            rewards=raw,
            group_sizes=group,
            advantage=advantage,
        )
        return raw, [float(a) for a in scores.advantages]

    return post_process


#: ``--custom-reward-post-process-path corrpo.integrations.slime.reward_post_process``: the
#: defaults, against the server at ``CORRPO_TARGET`` (default 127.0.0.1:50051).
reward_post_process = corrpo_reward_post_process()
