"""CorR-PO in slime, through slime's interfaces as read in its source (slime is not on PyPI
and is not installed here: nothing of slime runs). The hooks are loaded as slime loads them,
``load_function("module.attr")`` (replicated below: importlib on the module, then getattr),
called with a ``SimpleNamespace`` for slime's ``args`` and Sample-shaped objects: ``tokens``
(prompt + response ids), ``response_length``, ``reward`` and slime's ``get_reward_value``.
``--custom-rm-path`` gets one sample or one group; ``--custom-reward-post-process-path`` the
rollout's flat list of samples, whole groups consecutive. A real corrpo-server started with
``--model`` on a tiny random Llama scores them; every reward and advantage must equal
corrpo's in-process answer (``token_strengths`` per sample, unpadded, then ``corrpo.score``),
and with coef 0 the post-process must give slime's own group normalization (copied below)."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import math
import sys
import textwrap
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import corrpo  # noqa: E402

N = 4  # args.n_samples_per_prompt
PROMPTS = ["the cat sat on", "what is two plus three", "a dog ran"]
TRUTH = ["mat", "five", "park"]
LENGTHS = [9, 12, 3, 14, 7, 10, 11, 6, 13, 8, 5, 12]  # 3 < min_tokens: an undefined rho


def load_function(path: str) -> Any:
    """slime's ``load_function``: import the module of ``"module.attr"`` and take the attr."""
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


@dataclass
class Sample:
    """The fields of slime's ``Sample`` that a reward function reads."""

    prompt: str
    tokens: list[int]
    response: str
    response_length: int
    label: str
    reward: float | dict | None = None
    metadata: dict = field(default_factory=dict)

    def get_reward_value(self, args: Any) -> Any:  # slime's, verbatim
        return self.reward if not args.reward_key else self.reward[args.reward_key]


@pytest.fixture(scope="module")
def samples(tiny_model_dir) -> list[Sample]:
    """Groups of N samples, in slime's order (a group's samples together)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rng = np.random.default_rng(17)
    words = list(range(4, len(tokenizer)))  # not <unk> <pad> <s> </s>
    out = []
    for k, n in enumerate(LENGTHS):
        g = k // N
        prompt = tokenizer(PROMPTS[g])["input_ids"]
        response = rng.choice(words, n).tolist()
        if k % 2:
            response[rng.integers(n)] = tokenizer.convert_tokens_to_ids(TRUTH[g])
        text = tokenizer.decode(response, skip_special_tokens=True)
        sample = Sample(PROMPTS[g], prompt + response, text, n, TRUTH[g])
        sample.reward = verify(sample)
        out.append(sample)
    return out


def verify(sample: Sample) -> float:
    return 1.0 if sample.label in sample.response.split() else 0.0


@pytest.fixture(scope="module")
def measured(tiny_model_dir, samples) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """corrpo in-process, per estimator (exact, and local: the server's default): H (nats)
    and the strength of each sample alone, concatenated."""
    from transformers import AutoModelForCausalLM

    from corrpo.gradients import token_strengths

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    found = {}
    for estimator in ("exact", "local"):
        h, s = [], []
        for sample in samples:
            start = len(sample.tokens) - sample.response_length
            positions = np.arange(start, len(sample.tokens))
            out = token_strengths(model, torch.tensor(sample.tokens), positions, measures=("l1_mean",), estimator=estimator)
            h.append(out.entropy_bits * math.log(2))
            s.append(out.l1_mean)
        found[estimator] = (np.concatenate(h), np.concatenate(s))
    return found


def reference(measured, rewards, settings: dict, group_sizes=(len(LENGTHS),)) -> corrpo.Scores:
    """corrpo.score on the in-process H and S of the settings' estimator."""
    h, s = measured[settings["estimator"]]
    return corrpo.score(h, s, LENGTHS, list(group_sizes), rewards=rewards, config=corrpo.ScoreConfig(**settings))


SETTINGS = {"coef": 0.5, "gate": "none", "min_tokens": 4, "measure": "l1_mean", "estimator": "exact"}


@pytest.fixture
def user_module(tmp_path, monkeypatch, tiny_model_server):
    """The user's own hook file, as slime's --custom-rm-path / --custom-reward-post-process-path
    would name it (``my_rewards.rm``)."""
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            f"""
            from corrpo.integrations.slime import corrpo_reward_post_process, corrpo_rm

            async def verify(args, sample):
                return 1.0 if sample.label in sample.response.split() else 0.0

            def verify_group(args, samples):  # a synchronous verifier works too
                return [1.0 if s.label in s.response.split() else 0.0 for s in samples]

            options = {{"timeout": 120}}
            rm = corrpo_rm(verify, target={tiny_model_server.target!r}, client_options=options, **{SETTINGS!r})
            group_rm = corrpo_rm(verify_group, target={tiny_model_server.target!r}, client_options=options, **{SETTINGS!r})
            post_process = corrpo_reward_post_process(target={tiny_model_server.target!r}, client_options=options, **{SETTINGS!r})
            plain = corrpo_reward_post_process(
                target={tiny_model_server.target!r}, client_options=options, **{{**{SETTINGS!r}, "coef": 0.0}}
            )
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_rm_per_sample_equals_corrpo_in_process(measured, samples, user_module):
    rm = load_function(f"{user_module}.rm")
    args = SimpleNamespace(n_samples_per_prompt=N, group_rm=False)

    async def rollout():  # slime scores the samples of a rollout concurrently
        return await asyncio.gather(*(rm(args, s) for s in samples))

    got = asyncio.run(rollout())
    rewards = [verify(s) for s in samples]
    assert 0 < sum(rewards) < len(rewards)
    want = reference(measured, rewards, SETTINGS)
    assert math.isnan(want.rho[2]) and got[2] == rewards[2]  # undefined rho: r unchanged
    np.testing.assert_allclose(got, want.rewards, rtol=1e-5, atol=1e-6)
    assert all(isinstance(x, float) for x in got)


def test_group_rm_equals_corrpo_in_process(measured, samples, user_module):
    group_rm = load_function(f"{user_module}.group_rm")
    args = SimpleNamespace(n_samples_per_prompt=N, group_rm=True)
    want = reference(measured, [verify(s) for s in samples], SETTINGS)
    for g in range(len(samples) // N):
        got = asyncio.run(group_rm(args, samples[g * N : (g + 1) * N]))
        np.testing.assert_allclose(got, want.rewards[g * N : (g + 1) * N], rtol=1e-5, atol=1e-6)


def slime_args(**kwargs: Any) -> SimpleNamespace:
    """The args slime's _post_process_rewards reads."""
    return SimpleNamespace(
        **{"n_samples_per_prompt": N, "grpo_std_normalization": True, "rewards_normalization": True, "reward_key": None, **kwargs}
    )


CASES = {  # hook, slime's args, corrpo's advantage, settings of the hook
    "grpo": ("my_rewards.post_process", {}, "grpo", SETTINGS),
    "drgrpo, --reward-key": ("my_rewards.post_process", {"grpo_std_normalization": False, "reward_key": "score"}, "drgrpo", SETTINGS),
    "--disable-rewards-normalization": ("my_rewards.post_process", {"rewards_normalization": False}, "none", SETTINGS),
    # the defaults: coef 0.1, gate correct, min_tokens 8, the paper's l1_mean by local; objects
    # without get_reward_value are read by their reward
    "module default": ("corrpo.integrations.slime.reward_post_process", {}, "grpo", {"gate": "correct", "measure": "l1_mean", "estimator": "local"}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_reward_post_process_equals_corrpo_in_process(measured, samples, user_module, tiny_model_server, monkeypatch, case):
    hook, overrides, advantage, settings = CASES[case]
    monkeypatch.setenv("CORRPO_TARGET", tiny_model_server.target)  # the module's default hook reads it
    post_process = load_function(hook)
    args = slime_args(**overrides)
    rewards = [s.reward for s in samples]
    if args.reward_key:
        given = [dataclasses.replace(s, reward={"score": s.reward, "format": 1.0}) for s in samples]
    elif hook.startswith("corrpo"):
        given = [SimpleNamespace(tokens=s.tokens, response_length=s.response_length, reward=s.reward) for s in samples]
    else:
        given = samples
    raw, got = post_process(args, given)

    want = reference(measured, rewards, {**settings, "advantage": advantage}, [N] * (len(samples) // N))
    assert raw == rewards and all(isinstance(x, float) for x in raw + got)
    assert not np.allclose(want.rewards, rewards)  # the term moved some rewards
    np.testing.assert_allclose(got, want.advantages, rtol=1e-5, atol=1e-5)
    if advantage == "none":
        np.testing.assert_allclose(got, want.rewards, rtol=1e-5, atol=1e-6)


def slime_normalization(args, samples) -> list[float]:
    """slime's own RolloutManager._post_process_rewards, without a custom function (grpo)."""
    raw_rewards = [sample.get_reward_value(args) for sample in samples]
    rewards = torch.tensor(raw_rewards, dtype=torch.float).reshape(-1, args.n_samples_per_prompt)
    rewards = rewards - rewards.mean(dim=-1, keepdim=True)
    if args.grpo_std_normalization:
        rewards = rewards / (rewards.std(dim=-1, keepdim=True) + 1e-6)
    return rewards.flatten().tolist()


@pytest.mark.parametrize("std", [True, False])
def test_coef_zero_is_slimes_own_normalization(samples, user_module, std):
    args = slime_args(grpo_std_normalization=std)
    raw, got = load_function(f"{user_module}.plain")(args, samples)
    want = slime_normalization(args, samples)
    assert raw == [s.reward for s in samples] and any(abs(x) > 0.1 for x in want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_reward_post_process_bad_input(samples):
    from corrpo.integrations.slime import corrpo_reward_post_process

    with pytest.raises(corrpo.ConfigError, match="the advantage follows slime's flags"):
        corrpo_reward_post_process(advantage="drgrpo")
    with pytest.raises(corrpo.ConfigError, match=r"unknown setting\(s\) \['coeff'\]"):
        corrpo_reward_post_process(coeff=0.1)
    fn = corrpo_reward_post_process(target="127.0.0.1:9")  # nothing listens: every case fails before a request
    good = slime_args()
    cases = [
        (slime_args(n_samples_per_prompt=0), samples, corrpo.ConfigError, "n_samples_per_prompt must be a positive integer, got 0"),
        (good, samples[:-1], corrpo.ShapeError, "11 samples are not whole groups of n_samples_per_prompt=4"),
        (good, [], corrpo.ShapeError, "0 samples are not whole groups"),
        (good, [samples[:N], samples[N : 2 * N]], corrpo.ShapeError, "sample 0 is a list: the hook takes slime's flat list"),
        (good, [dataclasses.replace(s, reward={"score": 1.0}) for s in samples], corrpo.ConfigError,
         "sample 0's reward is \\{'score': 1.0\\}; corrpo needs one number per sample \\(a dict reward needs --reward-key\\)"),
        (good, [*samples[:5], dataclasses.replace(samples[5], reward=None), *samples[6:]], corrpo.ConfigError,
         "sample 5's reward is None; corrpo needs one number"),
        (good, [dataclasses.replace(s, response_length=99) for s in samples], corrpo.ShapeError,
         "sample 0: response_length 99 does not fit"),
    ]  # fmt: skip
    for args, given, error, message in cases:
        with pytest.raises(error, match=message):
            fn(args, given)


def test_rm_bad_input(samples):
    from corrpo.integrations.slime import corrpo_rm

    with pytest.raises(corrpo.ConfigError, match=r"unknown setting\(s\) \['coeff'\]"):
        corrpo_rm(lambda args, sample: 1.0, coeff=0.1)
    with pytest.raises(corrpo.ConfigError, match="gate must be one of"):
        corrpo_rm(lambda args, sample: 1.0, gate="sometimes")
    args = SimpleNamespace(n_samples_per_prompt=N)
    rm = corrpo_rm(lambda args, sample: {"score": 1.0}, target="127.0.0.1:9")
    with pytest.raises(corrpo.ConfigError, match="the verifier returned \\{'score': 1.0\\}"):
        asyncio.run(rm(args, samples[0]))
    rm = corrpo_rm(lambda args, samples: [1.0], target="127.0.0.1:9")
    with pytest.raises(corrpo.ShapeError, match="the verifier gave 1 rewards for 4 samples"):
        asyncio.run(rm(args, samples[:N]))
