"""CorR-PO in verl 0.9.1, on the CPU, in well under a minute.

Builds a tiny random Llama and a tokenizer trained here (no downloads), samples 4 responses
to each of 2 prompts, and lays them out as verl's rollout batch (a DataProto: left-padded
prompts, right-padded responses, ``uid`` per group). Then, through verl's own code:

1. the reward: verl's reward-loop worker loads ``corrpo.integrations.verl.CorrpoRewardManager``
   by path (as ``reward.reward_manager.source=importlib`` makes every Ray reward worker do),
   runs a toy ``compute_score`` and asks a corrpo-server started here with ``--model`` for
   rho(H, S) with the paper's strength S; the rewards land on each last response token;
2. the advantage: verl's ``compute_advantage`` with its own ``grpo`` on those rewards;
3. the ``corrpo_grpo`` estimator for trainers that have per-token statistics: here H and S
   computed in-process by ``corrpo.gradients``, passed as ``entropy=`` and ``strength=``.

    .venv/bin/python examples/integrations/verl_grpo.py   (after `make test`: verl 0.9.1 is
                                                      installed with --no-deps, tests/stacks.txt)
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

VERIFIER = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """A toy verifier: 1 when the answer word appears."""
    return 1.0 if ground_truth in solution_str.split() else 0.0
'''
PROMPTS = [("the cat sat on", "the"), ("two plus three is", "five")]


def rollout_batch(model, tokenizer, n: int, max_new_tokens: int):
    """n sampled responses per prompt, padded as verl's agent loop pads them."""
    from verl import DataProto

    prompts, responses, uids, truths = [], [], [], []
    for g, (text, truth) in enumerate(PROMPTS):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        out = model.generate(
            ids.repeat(n, 1), do_sample=True, max_new_tokens=max_new_tokens, min_new_tokens=6,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        for row in out[:, ids.shape[1] :].tolist():
            if tokenizer.eos_token_id in row:  # keep the EOS, drop what generate padded after it
                row = row[: row.index(tokenizer.eos_token_id) + 1]
            prompts.append(ids[0].tolist())
            responses.append(row)
            uids.append(f"prompt-{g}")
            truths.append(truth)
    p_len, r_len = max(map(len, prompts)), max(map(len, responses))
    pad = tokenizer.pad_token_id
    prompt_t = torch.full((len(prompts), p_len), pad)
    response_t = torch.full((len(prompts), r_len), pad)
    mask = torch.zeros(len(prompts), p_len + r_len, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        prompt_t[i, p_len - len(p) :] = torch.tensor(p)
        response_t[i, : len(r)] = torch.tensor(r)
        mask[i, p_len - len(p) : p_len + len(r)] = 1
    return DataProto.from_dict(
        tensors={
            "prompts": prompt_t, "responses": response_t, "input_ids": torch.cat([prompt_t, response_t], 1),
            "attention_mask": mask, "response_mask": mask[:, p_len:],
        },
        non_tensors={
            "uid": np.array(uids, dtype=object),
            "data_source": np.array(["toy"] * len(uids), dtype=object),
            "reward_model": np.array([{"ground_truth": t} for t in truths], dtype=object),
            "extra_info": np.array([{} for _ in uids], dtype=object),
        },
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4, help="responses per prompt (verl's rollout.n)")
    parser.add_argument("--coef", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo.ray_trainer import compute_advantage
    from verl.trainer.ppo.reward import resolve_reward_manager_cls

    from corrpo.gradients import response_strengths
    from corrpo.testing import build_tiny_model
    from corrpo_server import ServerProcess

    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_model(f"{tmp}/model")
        Path(f"{tmp}/verifier.py").write_text(VERIFIER)
        model = AutoModelForCausalLM.from_pretrained(f"{tmp}/model", dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(f"{tmp}/model")
        data = rollout_batch(model, tokenizer, args.n, max_new_tokens=14)
        # gate="none" so the toy run shows the term on every rollout (the default is
        # "correct": only rewards >= threshold get it). min_tokens: the responses are short.
        settings = {"coef": args.coef, "gate": "none", "min_tokens": 4}

        with ServerProcess("--model", f"{tmp}/model", "--device", "cpu", ready_timeout=180) as server:
            # The part of verl's trainer config the reward workers read (Hydra overrides:
            # reward.reward_manager.source=importlib ... +reward.reward_kwargs.corrpo.target=...).
            config = OmegaConf.create({
                "actor_rollout_ref": {"model": {"path": f"{tmp}/model", "tokenizer_path": None}},
                "reward": {
                    "custom_reward_function": {"path": f"{tmp}/verifier.py", "name": "compute_score", "reward_kwargs": {}},
                    "reward_manager": {"source": "importlib", "name": "CorrpoRewardManager",
                                       "module": {"path": "pkg://corrpo.integrations.verl", "name": None}},
                    "reward_model": {"enable": False},
                    "sandbox_fusion": {"url": None},
                    "reward_kwargs": {"corrpo": {"target": server.target, "timeout": 120, **settings}},
                },
            })  # fmt: skip
            worker = RewardLoopWorker(config)  # what each of verl's Ray reward workers builds
            outputs = worker.loop.run_until_complete(worker.compute_score_batch(data))
        rm_scores = resolve_reward_manager_cls(config).assemble_rm_scores(data, [o["reward_score"] for o in outputs])

        data.batch["token_level_rewards"] = rm_scores
        data = compute_advantage(data, adv_estimator="grpo")
        print("1-2. reward manager 'corrpo' (server, paper's S = l1_mean by subsample), then verl's grpo:")
        for i, o in enumerate(outputs):
            info = o["reward_extra_info"]
            rho = f"{info['corrpo_rho']:+.3f}" if not math.isnan(info["corrpo_rho"]) else "  n/a"
            text = tokenizer.decode(data.batch["responses"][i][data.batch["response_mask"][i].bool()], skip_special_tokens=True)
            print(
                f"  {data.non_tensor_batch['uid'][i]}  r={info['acc']:.0f}  rho={rho}  r-coef*rho={o['reward_score']:+.3f}"
                f"  advantage={data.batch['advantages'][i, 0]:+.3f}  {text!r}"
            )

        # 3. The estimator, for a trainer that has H and S per token: computed here in-process
        # (exact l1_mean) and laid out [batch, response_length] like the response mask.
        p_len, mask = data.batch["prompts"].shape[1], data.batch["attention_mask"].bool()
        prompt_ids = [data.batch["prompts"][i][mask[i, :p_len]].tolist() for i in range(len(data))]
        response_ids = [data.batch["responses"][i][mask[i, p_len:]].tolist() for i in range(len(data))]
        stats = response_strengths(model, prompt_ids, response_ids, measures=("l1_mean",), estimator="exact")
        entropy = torch.zeros(data.batch["response_mask"].shape)
        strength = torch.zeros_like(entropy)
        bounds = np.cumsum(stats.lengths)[:-1]
        for i, (h, s) in enumerate(zip(np.split(stats.entropy_bits * math.log(2), bounds), np.split(stats.l1_mean, bounds))):
            entropy[i, : len(h)], strength[i, : len(s)] = torch.from_numpy(h), torch.from_numpy(s)
        verifier_rewards = torch.zeros_like(entropy)
        last = data.batch["response_mask"].sum(-1) - 1
        verifier_rewards[torch.arange(len(data)), last] = torch.tensor([o["reward_extra_info"]["acc"] for o in outputs])
        algorithm = OmegaConf.create({"adv_estimator": "corrpo_grpo", "corrpo": {**settings, "measure": "l1_mean"}})
        advantages, _ = core_algos.get_adv_estimator_fn("corrpo_grpo")(
            verifier_rewards, data.batch["response_mask"], data.non_tensor_batch["uid"], config=algorithm,
            entropy=entropy, strength=strength,
        )  # fmt: skip
        print("3. algorithm.adv_estimator=corrpo_grpo with entropy= and strength= (exact l1_mean, in-process):")
        print("  advantages:", " ".join(f"{a:+.3f}" for a in advantages[:, 0].tolist()))


if __name__ == "__main__":
    main()
