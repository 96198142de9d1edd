"""CorR-PO in slime, through slime's documented interfaces (slime is not on PyPI and is not
installed here: nothing of slime runs). The hooks are loaded as slime loads them,
``load_function("module.attr")`` (replicated below: importlib on the module, then getattr),
called with a ``SimpleNamespace`` for slime's ``args`` and slime's data shapes: a Sample with
``tokens`` (prompt + response ids) and ``response_length``; ``rollout_data`` as lists of
per-sample tensors (``tokens``, ``response_lengths``, ``rewards``, ``log_probs``,
``loss_masks``, ``entropy``). A real corrpo-server started with ``--model`` on a tiny random
Llama scores them; every reward, rho and advantage must equal corrpo's in-process answer
(``token_strengths`` per sample, unpadded, then ``corrpo.score``; advantages in float64
NumPy from ``corrpo.reference``)."""

from __future__ import annotations

import asyncio
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
    metadata: dict = field(default_factory=dict)


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
        out.append(Sample(PROMPTS[g], prompt + response, text, n, TRUTH[g]))
    return out


def verify(sample: Sample) -> float:
    return 1.0 if sample.label in sample.response.split() else 0.0


def reference(tiny_model_dir, samples: list[Sample], rewards, settings: dict) -> corrpo.Scores:
    """corrpo in-process: the exact strength of each sample alone, then corrpo.score."""
    from transformers import AutoModelForCausalLM

    from corrpo.gradients import token_strengths

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    h, s = [], []
    for sample in samples:
        start = len(sample.tokens) - sample.response_length
        positions = np.arange(start, len(sample.tokens))
        out = token_strengths(model, torch.tensor(sample.tokens), positions, measures=("l1_mean",), estimator="exact")
        h.append(out.entropy_bits * math.log(2))
        s.append(out.l1_mean)
    config = corrpo.ScoreConfig(**settings)
    lengths = LENGTHS[: len(samples)]
    return corrpo.score(np.concatenate(h), np.concatenate(s), lengths, [len(samples)], rewards=rewards, config=config)


SETTINGS = {"coef": 0.5, "gate": "none", "min_tokens": 4, "measure": "l1_mean", "estimator": "exact"}


@pytest.fixture
def user_module(tmp_path, monkeypatch, tiny_model_server):
    """The user's own hook file, as slime's --custom-rm-path / --custom-advantage-function-path
    would name it (``my_rewards.rm``)."""
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            f"""
            from corrpo.integrations.slime import corrpo_advantage, corrpo_rm

            async def verify(args, sample):
                return 1.0 if sample.label in sample.response.split() else 0.0

            def verify_group(args, samples):  # a synchronous verifier works too
                return [1.0 if s.label in s.response.split() else 0.0 for s in samples]

            options = {{"timeout": 120}}
            rm = corrpo_rm(verify, target={tiny_model_server.target!r}, client_options=options, **{SETTINGS!r})
            group_rm = corrpo_rm(verify_group, target={tiny_model_server.target!r}, client_options=options, **{SETTINGS!r})
            drgrpo = corrpo_advantage(
                target={tiny_model_server.target!r}, client_options=options, advantage="drgrpo", **{SETTINGS!r}
            )
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_rm_per_sample_equals_corrpo_in_process(tiny_model_dir, samples, user_module):
    rm = load_function(f"{user_module}.rm")
    args = SimpleNamespace(n_samples_per_prompt=N, group_rm=False)

    async def rollout():  # slime scores the samples of a rollout concurrently
        return await asyncio.gather(*(rm(args, s) for s in samples))

    got = asyncio.run(rollout())
    rewards = [verify(s) for s in samples]
    assert 0 < sum(rewards) < len(rewards)
    want = reference(tiny_model_dir, samples, rewards, SETTINGS)
    assert math.isnan(want.rho[2]) and got[2] == rewards[2]  # undefined rho: r unchanged
    np.testing.assert_allclose(got, want.rewards, rtol=1e-5, atol=1e-6)
    assert all(isinstance(x, float) for x in got)


def test_group_rm_equals_corrpo_in_process(tiny_model_dir, samples, user_module):
    group_rm = load_function(f"{user_module}.group_rm")
    args = SimpleNamespace(n_samples_per_prompt=N, group_rm=True)
    want = reference(tiny_model_dir, samples, [verify(s) for s in samples], SETTINGS)
    for g in range(len(samples) // N):
        got = asyncio.run(group_rm(args, samples[g * N : (g + 1) * N]))
        np.testing.assert_allclose(got, want.rewards[g * N : (g + 1) * N], rtol=1e-5, atol=1e-6)


def rollout_data(samples: list[Sample], rewards: list[float]) -> dict[str, list]:
    """What slime's training step hands a custom advantage function, per sample."""
    rng = np.random.default_rng(3)
    return {
        "tokens": [torch.tensor(s.tokens) for s in samples],
        "response_lengths": [s.response_length for s in samples],
        "total_lengths": [len(s.tokens) for s in samples],
        "rewards": rewards,
        "loss_masks": [torch.ones(s.response_length, dtype=torch.int32) for s in samples],
        "log_probs": [torch.tensor(-rng.exponential(1.0, s.response_length), dtype=torch.float32) for s in samples],
        "entropy": [torch.tensor(rng.gamma(2.0, 0.5, s.response_length), dtype=torch.float32) for s in samples],
    }


@pytest.mark.parametrize("hook", ["corrpo.integrations.slime.advantage", "my_rewards.drgrpo"])
def test_advantage_equals_corrpo_in_process(tiny_model_dir, samples, user_module, tiny_model_server, monkeypatch, hook):
    monkeypatch.setenv("CORRPO_TARGET", tiny_model_server.target)  # the module's default hook reads it
    fn = load_function(hook)
    args = SimpleNamespace(n_samples_per_prompt=N, disable_rewards_normalization=True)
    rewards = [verify(s) for s in samples]
    data = rollout_data(samples, rewards)
    fn(args, data)

    if hook.endswith("drgrpo"):
        settings, advantage = SETTINGS, "drgrpo"
    else:  # the defaults: coef 0.1, gate correct, min_tokens 8, the paper's l1_mean (subsample
        # keeps every token of responses up to 16 long, so it equals exact here)
        settings, advantage = {"gate": "correct", "measure": "l1_mean", "estimator": "exact"}, "grpo"
    want = reference(tiny_model_dir, samples, rewards, settings)
    expected = np.concatenate(
        [
            corrpo.reference.regularize(want.rewards[g : g + N], np.full(N, np.nan), [N], advantage=advantage)["advantages"]
            for g in range(0, len(samples), N)
        ]
    )
    assert not np.allclose(want.rewards, rewards)  # the term moved some rewards
    assert len(data["advantages"]) == len(data["returns"]) == len(samples)
    for k, (adv, ret) in enumerate(zip(data["advantages"], data["returns"])):
        assert adv.shape == data["log_probs"][k].shape and adv.dtype == torch.float32
        torch.testing.assert_close(adv, torch.full_like(adv, expected[k]), rtol=1e-5, atol=1e-5)
        assert ret is adv


def test_advantage_bad_input(samples):
    from corrpo.integrations.slime import corrpo_advantage

    fn = corrpo_advantage(target="127.0.0.1:9")  # nothing listens: every case fails before a request
    good = SimpleNamespace(n_samples_per_prompt=N, disable_rewards_normalization=True)
    data = rollout_data(samples, [verify(s) for s in samples])
    cases = [
        (SimpleNamespace(n_samples_per_prompt=N), data, corrpo.ConfigError, "--disable-rewards-normalization"),
        (SimpleNamespace(n_samples_per_prompt=0, disable_rewards_normalization=True), data, corrpo.ConfigError, "n_samples_per_prompt must be"),
        (SimpleNamespace(n_samples_per_prompt=5, disable_rewards_normalization=True), data, corrpo.ShapeError, "not whole groups of n_samples_per_prompt=5"),
        (good, {k: v for k, v in data.items() if k != "tokens"}, corrpo.ShapeError, "rollout_data has no 'tokens' \\(it has \\['entropy'"),
        (good, {**data, "log_probs": data["log_probs"][:-1]}, corrpo.ShapeError, "rollout_data\\['log_probs'\\] holds 11 samples"),
        (good, {**data, "response_lengths": [99] * len(samples)}, corrpo.ShapeError, "sample 0: response_length 99 does not fit"),
        (good, {**data, "rewards": [{"score": 1.0}] * len(samples)}, corrpo.ConfigError, "returned \\{'score': 1.0\\}; corrpo needs one number"),
    ]  # fmt: skip
    for args, rollout, error, message in cases:
        with pytest.raises(error, match=message):
            fn(args, rollout)


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
