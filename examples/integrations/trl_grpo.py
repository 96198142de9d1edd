"""CorR-PO in TRL's GRPOTrainer, on the CPU, in under a minute.

Builds a tiny random Llama and a tokenizer trained here (no downloads), starts a local
corrpo-server, and trains a few GRPO steps with ``corrpo.integrations.trl.CorrpoReward`` as
the reward function: a toy verifier's 0/1 rewards minus coef * rho(H, S), where S is the
paper's strength of every completion token on the model being trained. Prints each step's
rewards before and after the CorR-PO term and TRL's log of corrpo's fingerprint.

    .venv/bin/python examples/integrations/trl_grpo.py   (after `make test`, or in the
                                                          corrpo checkout: pip install '.[integrations]' ./server)
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from corrpo.client import RewardClient
from corrpo.integrations.trl import CorrpoReward
from corrpo.testing import build_tiny_model
from corrpo_server import ServerProcess


def verifier(prompts, completions, **kwargs):
    """A toy verifier: 1 when the completion says "the"."""
    return [1.0 if "the" in completion.split() else 0.0 for completion in completions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--coef", type=float, default=0.5)
    parser.add_argument("--estimator", default="local", help="of the paper's strength (exact, subsample, jvp, ...)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp, ServerProcess() as server, RewardClient(server.target) as client:
        build_tiny_model(f"{tmp}/model")
        model = AutoModelForCausalLM.from_pretrained(f"{tmp}/model", dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(f"{tmp}/model")
        data = Dataset.from_dict({"prompt": ["the cat sat on", "two plus three is", "a dog ran in", "one and one make"]})

        # gate="none" so that the toy run shows the term on every group; CorrpoReward's default
        # is gate="correct" (ungated CorR-PO collapsed weak policies in our study).
        corrpo_reward = CorrpoReward(
            model, tokenizer, client, verifier=verifier, num_generations=4,
            estimator=args.estimator, coef=args.coef, gate="none", min_tokens=4,
        )  # fmt: skip

        def reward(prompts, completions, completion_ids, **kwargs):
            out = corrpo_reward(prompts, completions, completion_ids, **kwargs)
            scores = corrpo_reward.last
            print(f"\nstep {corrpo_reward.calls}: pooled rho(H, S) {scores.fingerprint.rho_pooled:+.3f}")
            for i, (text, r) in enumerate(zip(completions, verifier(prompts, completions))):
                rho = f"{scores.rho[i]:+.3f}" if scores.reasons[i] is None else f"none ({scores.reasons[i]})"
                print(f"  r={r:.0f}  r-coef*rho={out[i]:+.3f}  rho={rho}  {text!r}")
            return out

        config = GRPOConfig(
            output_dir=f"{tmp}/out", use_cpu=True, per_device_train_batch_size=4, num_generations=4,
            max_completion_length=10, max_steps=args.steps, report_to="none", logging_steps=1,
            seed=0, disable_tqdm=True,
        )  # fmt: skip
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data, processing_class=tokenizer)
        trainer.train()

    logged = [e for e in trainer.state.log_history if "corrpo/rho_pooled" in e]
    print("\nTRL's log, step by step:")
    for e in logged:
        print(f"  step {e['step']}: reward {e['reward']:+.3f}  corrpo/rho_pooled {e['corrpo/rho_pooled']:+.3f}")
    print(f"mean pooled rho over the run: {np.mean([e['corrpo/rho_pooled'] for e in logged]):+.3f}")


if __name__ == "__main__":
    main()
