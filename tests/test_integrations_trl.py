"""CorR-PO in TRL: a real ``GRPOTrainer`` (TRL 1.16, on the CPU) trains a tiny random Llama
for a few steps with ``corrpo.integrations.trl.CorrpoReward`` as its reward function,
scored by a real corrpo-server process. Every call's rewards must equal corrpo's in-process
answer for the same completions (the strengths recomputed per completion, unpadded, on the
same model state), and TRL must log corrpo's metric."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("datasets")

import corrpo  # noqa: E402
from corrpo.testing import build_tiny_model  # noqa: E402


def reference(model, tokenizer, prompts, completion_ids, rewards, settings: dict) -> np.ndarray:
    """corrpo's in-process rewards: token_strengths per completion alone, then corrpo.score."""
    from corrpo.gradients import token_strengths

    h, s, g, ids, lengths = [], [], [], [], []
    for prompt, completion in zip(prompts, completion_ids):
        p = tokenizer(text=[prompt])["input_ids"][0]
        row = torch.tensor(list(p) + list(completion))
        out = token_strengths(model, row, np.arange(len(p), len(row)), measures=("l1_mean", "logit_grad"), estimator="exact")
        h.append(out.entropy_bits * math.log(2))
        s.append(out.l1_mean)
        g.append(out.logit_grad)
        ids.append(out.token_ids)
        lengths.append(len(completion))
    config = corrpo.ScoreConfig(measure="l1_mean", estimator="exact", **settings)
    scores = corrpo.score(
        np.concatenate(h), np.concatenate(s), lengths, [4] * (len(prompts) // 4), rewards=rewards,
        token_ids=np.concatenate(ids), config=config, logit_grad=np.concatenate(g),
    )  # fmt: skip
    return scores.rewards


def test_grpo_trainer_rewards_are_corrpos(tmp_path, server):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from corrpo.client import RewardClient
    from corrpo.integrations.trl import CorrpoReward

    torch.manual_seed(0)
    build_tiny_model(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    data = Dataset.from_dict({"prompt": ["the cat sat on", "two plus three is", "a dog ran in", "one and one make"]})

    def verifier(prompts, completions, **kwargs):
        return [1.0 if "the" in c.split() else 0.0 for c in completions]

    settings = {"coef": 0.5, "gate": "none", "min_tokens": 4}
    checked: list[float] = []
    with RewardClient(server.target, timeout=120) as client:
        corrpo_reward = CorrpoReward(model, tokenizer, client, verifier=verifier, num_generations=4, estimator="exact", **settings)

        def reward(prompts, completions, completion_ids, **kwargs):
            # The prompt ids CorrpoReward scores with are the ones TRL generated from.
            assert corrpo_reward.prompt_ids(prompts) == [list(ids) for ids in trainer._tokenize_prompts(list(prompts))[0]]
            got = corrpo_reward(prompts, completions, completion_ids, **kwargs)
            rewards = verifier(prompts, completions)
            want = reference(model, tokenizer, prompts, completion_ids, rewards, settings)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            assert corrpo_reward.last.config.measure == "l1_mean" and corrpo_reward.last.logit_grad is not None
            checked.append(float(np.max(np.abs(np.asarray(got) - np.asarray(rewards)))))
            return got

        args = GRPOConfig(
            output_dir=str(tmp_path / "out"), use_cpu=True, per_device_train_batch_size=4, num_generations=4,
            max_completion_length=10, max_steps=3, report_to="none", logging_steps=1, seed=0,
        )  # fmt: skip
        # TRL's default bf16=True: accelerate runs the forward under torch.autocast, as it does
        # for users; the reference scores the same wrapped model.
        assert args.bf16
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.train()
    assert len(checked) == 3, "one reward call per step"
    assert max(checked) > 0, "the CorR-PO term changed some reward"
    logged = [entry for entry in trainer.state.log_history if "corrpo/rho_pooled" in entry]
    assert len(logged) == 3 and all(-1 <= e["corrpo/rho_pooled"] <= 1 for e in logged)


def test_verifier_free_rewards_are_minus_coef_rho(tmp_path, server):
    """Without a verifier, r = 0 and the gate defaults to none (``correct`` needs rewards):
    the rewards are -coef * rho, as corrpo computes them in-process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corrpo.client import RewardClient
    from corrpo.integrations.trl import CorrpoReward

    build_tiny_model(tmp_path / "model", seed=1)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    prompts = ["the cat sat on"] * 4 + ["two plus three is"] * 4
    rng = np.random.default_rng(0)
    completion_ids = [rng.integers(4, len(tokenizer), size=int(n)).tolist() for n in rng.integers(5, 12, size=8)]
    completions = tokenizer.batch_decode(completion_ids)
    with RewardClient(server.target) as client:
        reward = CorrpoReward(model, tokenizer, client, num_generations=4, estimator="exact", coef=0.3, min_tokens=4)
        got = reward(prompts, completions, completion_ids)
    assert reward.last.config.gate == "none"
    want = reference(model, tokenizer, prompts, completion_ids, None, {"coef": 0.3, "gate": "none", "min_tokens": 4})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, -0.3 * np.nan_to_num(reward.last.rho), rtol=1e-6, atol=1e-9)
    assert np.count_nonzero(got) >= 6


def test_head_logit_grad_is_computed_exactly_from_the_logits(tmp_path, server):
    """A logit-space measure other than G (the LM head's gradient) takes no estimator: the
    reward scores it exactly and sends it as S beside G."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corrpo.client import RewardClient
    from corrpo.gradients import token_strengths
    from corrpo.integrations.trl import CorrpoReward

    build_tiny_model(tmp_path / "model", seed=2)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    prompts = ["a dog ran in"] * 4
    rng = np.random.default_rng(1)
    completion_ids = [rng.integers(4, len(tokenizer), size=int(n)).tolist() for n in rng.integers(6, 10, size=4)]
    with RewardClient(server.target) as client:
        reward = CorrpoReward(model, tokenizer, client, num_generations=4, measure="head_logit_grad", coef=0.2, min_tokens=4)
        got = reward(prompts, tokenizer.batch_decode(completion_ids), completion_ids)
    assert reward.last.config.measure == "head_logit_grad" and reward.last.config.estimator == "exact"
    h, s, lengths = [], [], []
    for completion in completion_ids:
        p = tokenizer(text=[prompts[0]])["input_ids"][0]
        row = torch.tensor(list(p) + completion)
        out = token_strengths(model, row, np.arange(len(p), len(row)), measures=("head_logit_grad",), estimator="logit_grad")
        h.append(out.entropy_bits * math.log(2))
        s.append(out.head_logit_grad)
        lengths.append(len(completion))
    want = corrpo.score(np.concatenate(h), np.concatenate(s), lengths, [4], config=corrpo.ScoreConfig(measure="head_logit_grad", coef=0.2, min_tokens=4))
    np.testing.assert_allclose(got, want.rewards, rtol=1e-5, atol=1e-6)
