"""CorR-PO in verl 0.9.1, driven through verl's own code on CPU tensors.

- The reward-loop manager (the route verl 0.9.1's trainers use): verl's ``RewardLoopWorker``
  loads it by name (``source=register``) and by path (``source=importlib``), scores a padded
  batch one rollout at a time as the Ray workers do, and ``assemble_rm_scores`` places the
  rewards; a real corrpo-server started with ``--model`` on a tiny random Llama computes H
  and S. Every reward and rho must equal corrpo's in-process answer (``token_strengths`` per
  rollout, unpadded, then ``corrpo.score``).
- The batch reward manager (``verl.workers.reward_manager``): the same numbers for a batch
  whose groups (``uid``) are interleaved, and group advantages equal to verl's own grpo.
- The ``corrpo_grpo`` estimator: through ``ray_trainer.compute_advantage`` (which passes no
  statistics: a precise error), and with the statistics a patched trainer passes, against a
  float64 NumPy reference followed by verl's own ``compute_grpo_outcome_advantage``.
Ray's actors themselves and a full PPO trainer (FSDP, a GPU rollout engine) are not run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
# verl's trainer module imports Ray, FastAPI, ... (about 30 s cold): once for the module.
ray_trainer = pytest.importorskip("verl.trainer.ppo.ray_trainer")

import corrpo  # noqa: E402
from corrpo.integrations import verl as corrpo_verl  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402

VERIFIER = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    return 1.0 if ground_truth in solution_str.split() else 0.0
'''
PROMPTS = {"g0": "the cat sat on", "g1": "what is two plus three", "g2": "a dog ran"}  # padded to 5
TRUTH = {"g0": "mat", "g1": "five", "g2": "park"}
# Groups interleaved, as verl's batches may hold them after balancing or filtering.
UIDS = ["g1", "g0", "g2", "g1", "g0", "g2", "g0", "g1", "g2", "g0"]
LENGTHS = [9, 12, 3, 14, 7, 10, 11, 6, 13, 8]  # 3 < min_tokens: an undefined rho
PAD = 1


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from verl.utils import hf_tokenizer

    return hf_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def verifier_file(tiny_model_dir):
    path = tiny_model_dir.parent / "verifier.py"
    path.write_text(VERIFIER)
    return path


@pytest.fixture(scope="module")
def batch(tokenizer):
    """A rollout batch as verl's agent loop makes it: prompts left-padded, responses
    right-padded (beyond the longest), attention_mask over both, groups by ``uid``."""
    rng = np.random.default_rng(13)
    words = [i for i in range(len(tokenizer)) if i > 3]  # not <unk> <pad> <s> </s>
    prompts = [tokenizer(PROMPTS[u])["input_ids"] for u in UIDS]
    responses = []
    for k, (uid, n) in enumerate(zip(UIDS, LENGTHS)):
        ids = rng.choice(words, n).tolist()
        if k % 2:  # about half the rollouts are correct
            ids[rng.integers(n)] = tokenizer.convert_tokens_to_ids(TRUTH[uid])
        responses.append(ids)
    p_len, r_len = max(map(len, prompts)), max(LENGTHS) + 2
    b = len(UIDS)
    prompt_t = torch.full((b, p_len), PAD)
    response_t = torch.full((b, r_len), PAD)
    mask = torch.zeros(b, p_len + r_len, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        prompt_t[i, p_len - len(p) :] = torch.tensor(p)
        response_t[i, : len(r)] = torch.tensor(r)
        mask[i, p_len - len(p) : p_len + len(r)] = 1
    data = DataProto.from_dict(
        tensors={
            "prompts": prompt_t,
            "responses": response_t,
            "input_ids": torch.cat([prompt_t, response_t], dim=1),
            "attention_mask": mask,
            "response_mask": mask[:, p_len:],
        },
        non_tensors={
            "uid": np.array(UIDS, dtype=object),
            "data_source": np.array(["toy"] * b, dtype=object),
            "reward_model": np.array([{"ground_truth": TRUTH[u]} for u in UIDS], dtype=object),
            "extra_info": np.array([{"index": i} for i in range(b)], dtype=object),
        },
    )
    return data, prompts, responses


def verdicts(tokenizer, responses) -> list[float]:
    namespace: dict = {}
    exec(VERIFIER, namespace)
    return [
        namespace["compute_score"]("toy", tokenizer.decode(r, skip_special_tokens=True), TRUTH[u])
        for r, u in zip(responses, UIDS)
    ]


def reference(tiny_model_dir, prompts, responses, rewards, settings: dict) -> corrpo.Scores:
    """corrpo in-process: the exact strength of each rollout alone (unpadded), then
    corrpo.score over the batch in batch order."""
    from corrpo.gradients import token_strengths
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    h, s = [], []
    for p, r in zip(prompts, responses):
        row = torch.tensor(list(p) + list(r))
        out = token_strengths(model, row, np.arange(len(p), len(row)), measures=("l1_mean",), estimator="exact")
        h.append(out.entropy_bits * math.log(2))
        s.append(out.l1_mean)
    config = corrpo.ScoreConfig(**settings)
    lengths = [len(r) for r in responses]
    return corrpo.score(np.concatenate(h), np.concatenate(s), lengths, [len(responses)], rewards=rewards, config=config)


def last_token_rows(data: DataProto, values) -> torch.Tensor:
    """What verl expects: each rollout's scalar on its last valid response token, 0 elsewhere."""
    want = torch.zeros(data.batch["responses"].shape)
    last = data.batch["response_mask"].sum(dim=-1) - 1
    want[torch.arange(len(data)), last] = torch.tensor(np.asarray(values), dtype=torch.float32)
    return want


def reward_loop_config(tiny_model_dir, verifier_file, source: str, corrpo_settings: dict):
    by_path = {"path": "pkg://corrpo.integrations.verl", "name": None}
    manager = (
        {"source": "register", "name": "corrpo", "module": {"path": None, "name": None}}
        if source == "register"
        else {"source": "importlib", "name": "CorrpoRewardManager", "module": by_path}
    )
    return OmegaConf.create(
        {
            "actor_rollout_ref": {"model": {"path": str(tiny_model_dir), "tokenizer_path": None}},
            "reward": {
                "custom_reward_function": {"path": str(verifier_file), "name": "compute_score", "reward_kwargs": {}},
                "reward_manager": manager,
                "reward_model": {"enable": False},
                "sandbox_fusion": {"url": None},
                "reward_kwargs": {"corrpo": corrpo_settings},
            },
        }
    )


@pytest.mark.parametrize("source", ["register", "importlib"])
def test_reward_loop_worker_scores_with_corrpo(tiny_model_dir, tiny_model_server, verifier_file, tokenizer, batch, source):
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.trainer.ppo.reward import resolve_reward_manager_cls

    data, prompts, responses = batch
    settings = {"coef": 0.5, "min_tokens": 4, "measure": "l1_mean", "estimator": "exact"}
    config = reward_loop_config(tiny_model_dir, verifier_file, source, {"target": tiny_model_server.target, "timeout": 120, **settings})
    worker = RewardLoopWorker(config)  # what each Ray reward worker builds
    assert type(worker.reward_manager) is corrpo_verl.CorrpoRewardManager
    outputs = worker.loop.run_until_complete(worker.compute_score_batch(data))
    # What RewardLoopManager.compute_rm_score does with the workers' answers.
    rm_scores = resolve_reward_manager_cls(config).assemble_rm_scores(data, [o["reward_score"] for o in outputs])

    rewards = verdicts(tokenizer, responses)
    assert 0 < sum(rewards) < len(rewards)
    want = reference(tiny_model_dir, prompts, responses, rewards, {**settings, "gate": "correct"})  # gate's default
    got = [o["reward_score"] for o in outputs]
    np.testing.assert_allclose(got, want.rewards, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rm_scores, last_token_rows(data, want.rewards), rtol=1e-5, atol=1e-6)
    info = {key: [o["reward_extra_info"][key] for o in outputs] for key in outputs[0]["reward_extra_info"]}
    np.testing.assert_allclose(info["corrpo_rho"], want.rho, rtol=1e-5, atol=1e-6)  # NaN where undefined
    assert math.isnan(info["corrpo_rho"][2]) and info["corrpo_n_tokens"] == LENGTHS
    assert info["acc"] == rewards  # verl's naive manager's own entry, kept
    assert info["corrpo_regularized"] == want.regularized.tolist()
    assert not all(info["corrpo_regularized"]) and any(info["corrpo_regularized"])  # the gate held some back
    np.testing.assert_allclose(info["corrpo_strength_mean"], want.grad_norm_mean, rtol=1e-5)


def test_batch_reward_manager_groups_by_uid_in_any_order(tiny_model_dir, tiny_model_server, verifier_file, tokenizer, batch):
    from verl.utils.import_utils import load_extern_object
    from verl.workers.reward_manager import get_reward_manager_cls

    data, prompts, responses = batch
    settings = {"coef": 0.5, "min_tokens": 4, "measure": "l1_mean", "estimator": "exact", "gate": "none"}
    manager = get_reward_manager_cls("corrpo")(
        tokenizer, num_examine=0, compute_score=load_extern_object(str(verifier_file), "compute_score"),
        corrpo={"target": tiny_model_server.target, "timeout": 120, **settings},
    )  # fmt: skip
    out = manager(data, return_dict=True)

    want = reference(tiny_model_dir, prompts, responses, verdicts(tokenizer, responses), settings)
    torch.testing.assert_close(out["reward_tensor"], last_token_rows(data, want.rewards), rtol=1e-5, atol=1e-6)
    info = out["reward_extra_info"]
    np.testing.assert_allclose(info["corrpo_rho"], want.rho, rtol=1e-5, atol=1e-6)
    # The server's group advantages, mapped back to batch order, are those of each uid's
    # group in float64 NumPy, and verl's own grpo on the returned rewards.
    uid = np.array(UIDS)
    expected = np.empty(len(UIDS))
    for u in PROMPTS:
        rows = np.flatnonzero(uid == u)
        expected[rows] = corrpo.reference.regularize(want.rewards[rows], np.full(len(rows), np.nan), [len(rows)])["advantages"]
    np.testing.assert_allclose(info["corrpo_advantage"], expected, rtol=1e-5, atol=1e-5)
    verl_adv, _ = core_algos.compute_grpo_outcome_advantage(
        out["reward_tensor"], data.batch["response_mask"], data.non_tensor_batch["uid"]
    )
    np.testing.assert_allclose(verl_adv[:, 0].numpy(), expected, rtol=1e-4, atol=1e-5)


def test_batch_reward_manager_needs_uid(tokenizer, batch):
    from verl.workers.reward_manager import get_reward_manager_cls

    data = batch[0]
    no_uid = DataProto.from_dict(
        tensors=dict(data.batch.items()), non_tensors={k: v for k, v in data.non_tensor_batch.items() if k != "uid"}
    )
    manager = get_reward_manager_cls("corrpo")(tokenizer, num_examine=0, corrpo={"target": "127.0.0.1:9"})
    with pytest.raises(corrpo.ShapeError, match="the batch has no 'uid' non-tensor"):
        manager(no_uid, return_dict=True)


def test_batch_reward_manager_refuses_scores_a_reward_loop_made(tokenizer, batch):
    """verl's naive manager would pass rm_scores through, and the term would hit them twice."""
    from verl.workers.reward_manager import get_reward_manager_cls

    data = batch[0]
    scored = DataProto.from_dict(
        tensors={**dict(data.batch.items()), "rm_scores": torch.zeros(data.batch["responses"].shape)},
        non_tensors=dict(data.non_tensor_batch.items()),
    )
    manager = get_reward_manager_cls("corrpo")(tokenizer, num_examine=0, corrpo={"target": "127.0.0.1:9"})
    with pytest.raises(corrpo.ConfigError, match="the batch already has rm_scores"):
        manager(scored, return_dict=True)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"coeff": 0.1}, r"unknown setting\(s\) \['coeff'\]; settings are target, "),
        ({"gate": "sometimes"}, "gate must be one of"),
        ({"min_tokens": 1}, "min_tokens"),
    ],
)
def test_bad_settings_fail_when_the_manager_is_built(tiny_model_dir, verifier_file, tokenizer, settings, message):
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.workers.reward_manager import get_reward_manager_cls

    with pytest.raises(corrpo.ConfigError, match=message):
        get_reward_manager_cls("corrpo")(tokenizer, num_examine=0, corrpo=settings)
    with pytest.raises(corrpo.ConfigError, match=message):
        RewardLoopWorker(reward_loop_config(tiny_model_dir, verifier_file, "register", settings))


def advantage_batch(seed: int):
    """Rewards on the last token, response masks with a hole (a tool's output in a
    multi-turn rollout), per-token H and S with NaN where the mask is 0 (never read)."""
    rng = np.random.default_rng(seed)
    b, length = len(UIDS), 16
    mask = torch.zeros(b, length)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    mask[3, 4:7] = 0
    last = torch.tensor(LENGTHS) - 1
    rewards = torch.zeros(b, length)
    rewards[torch.arange(b), last] = torch.tensor(rng.integers(0, 2, b), dtype=torch.float32)
    entropy = torch.tensor(rng.gamma(2.0, 0.5, (b, length)), dtype=torch.float32)
    strength = (2.0 - entropy + torch.tensor(rng.normal(0, 0.4, (b, length)), dtype=torch.float32)).abs()
    entropy[mask == 0] = float("nan")
    strength[mask == 0] = float("nan")
    return rewards, mask, entropy, strength


def float64_reference(rewards, mask, entropy, strength, coef, min_tokens, gate):
    """r - coef * rho per rollout from the masked tokens, in float64 NumPy (corrpo.reference)."""
    keep = mask.bool().numpy()
    h = [entropy[i].double().numpy()[keep[i]] for i in range(len(mask))]
    s = [strength[i].double().numpy()[keep[i]] for i in range(len(mask))]
    rc = corrpo.reference.rollout_correlations(np.concatenate(h), np.concatenate(s), [len(x) for x in h], min_tokens=min_tokens)
    r = rewards.double().sum(dim=-1).numpy()
    applied = ~np.isnan(rc["rho"]) & ((r >= 1.0) if gate == "correct" else True)
    return np.where(applied, r - coef * np.nan_to_num(rc["rho"]), r), rc["rho"]


CONFIGS = [
    ("DictConfig, grpo", True, {"coef": 0.5, "min_tokens": 4, "gate": "none", "measure": "l1_mean"}),
    ("DictConfig, drgrpo", False, {"coef": 0.5, "min_tokens": 4, "gate": "none", "measure": "l1_mean"}),
    ("AlgoConfig, defaults", True, None),  # coef 0.1, min_tokens 8, gate correct
]


@pytest.mark.parametrize(("norm", "corrpo_settings"), [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_estimator_equals_verls_grpo_on_corrpo_rewards(norm, corrpo_settings):
    rewards, mask, entropy, strength = advantage_batch(5)
    if corrpo_settings is None:
        config = AlgoConfig(adv_estimator="corrpo_grpo", norm_adv_by_std_in_grpo=norm)
        coef, min_tokens, gate = 0.1, 8, "correct"
    else:
        config = OmegaConf.create({"adv_estimator": "corrpo_grpo", "norm_adv_by_std_in_grpo": norm, "corrpo": corrpo_settings})
        coef, min_tokens, gate = corrpo_settings["coef"], corrpo_settings["min_tokens"], corrpo_settings["gate"]
    data = DataProto.from_dict(
        tensors={"token_level_rewards": rewards, "response_mask": mask}, non_tensors={"uid": np.array(UIDS, dtype=object)}
    )
    # The keyword arguments of ray_trainer.compute_advantage's dispatch, plus the statistics
    # that a trainer passing them along adds (as verl adds sum_pi_squared for its OTB).
    kwargs = {"token_level_rewards": rewards, "response_mask": mask, "config": config, "index": data.non_tensor_batch["uid"]}
    advantages, returns = core_algos.get_adv_estimator_fn("corrpo_grpo")(**kwargs, entropy=entropy, strength=strength)

    regularized, rho = float64_reference(rewards, mask, entropy, strength, coef, min_tokens, gate)
    assert np.isnan(rho[2]) and np.isfinite(rho).sum() >= 7
    assert not np.allclose(regularized, rewards.sum(dim=-1).numpy())  # the term moved rewards
    last_token = torch.zeros_like(rewards)
    last_token[torch.arange(len(UIDS)), torch.tensor(LENGTHS) - 1] = torch.tensor(regularized, dtype=torch.float32)
    index = np.array(UIDS, dtype=object)
    want, _ = core_algos.compute_grpo_outcome_advantage(last_token, mask, index, norm_adv_by_std_in_grpo=norm)
    torch.testing.assert_close(advantages, want, rtol=1e-5, atol=1e-5)
    assert returns is advantages and (advantages[mask == 0] == 0).all()


def test_compute_advantage_without_statistics_is_a_precise_error():
    rewards, mask, _, _ = advantage_batch(6)
    data = DataProto.from_dict(
        tensors={"token_level_rewards": rewards, "response_mask": mask}, non_tensors={"uid": np.array(UIDS, dtype=object)}
    )
    with pytest.raises(corrpo.ConfigError, match="corrpo_grpo needs per-token entropy= and strength=") as info:
        ray_trainer.compute_advantage(data, adv_estimator="corrpo_grpo", config=AlgoConfig(adv_estimator="corrpo_grpo"))
    assert "CorrpoRewardManager" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"index": np.array(UIDS[:-1] + ["alone"], dtype=object)}, corrpo.ShapeError, "uid 'alone' has 1 rollout: corrpo_grpo needs groups of 2"),
        ({"index": None}, corrpo.ShapeError, "the batch has no 'uid' non-tensor"),
        ({"index": np.array(UIDS[:4], dtype=object)}, corrpo.ShapeError, r"'uid' has shape \(4,\) for 10 rollouts"),
        ({"entropy": torch.zeros(10, 15)}, corrpo.ShapeError, r"entropy must be a tensor shaped like response_mask \(10, 16\)"),
        ({"epsilon": 1e-8}, corrpo.ConfigError, "epsilon=1e-08 cannot be honoured"),
        ({"config": {"corrpo": {"advantage": "none"}}}, corrpo.ConfigError, "set by algorithm.norm_adv_by_std_in_grpo"),
        ({"config": {"corrpo": {"coef": 0.1, "target": "x:1"}}}, corrpo.ConfigError, r"algorithm.corrpo: unknown setting\(s\) \['target'\]"),
    ],  # fmt: skip
)
def test_estimator_bad_input(kwargs, error, message):
    rewards, mask, entropy, strength = advantage_batch(7)
    good = {"index": np.array(UIDS, dtype=object), "epsilon": 1e-6, "config": None, "entropy": entropy, "strength": strength}
    with pytest.raises(error, match=message):
        core_algos.get_adv_estimator_fn("corrpo_grpo")(rewards, mask, **{**good, **kwargs})
