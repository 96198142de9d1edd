"""CorR-PO through slime's two hooks, on the CPU, in well under a minute (slime itself is not
on PyPI and is not needed: the hooks are called as slime calls them, with its data shapes).

Builds a tiny random Llama and a tokenizer trained here (no downloads), starts a
corrpo-server with ``--model`` on it, samples 4 responses to each of 2 prompts, and then:

1. ``--custom-rm-path``: ``corrpo_rm(verifier)`` scores each sample (slime's ``rm(args,
   sample)``) and each group (``--group-rm``: ``rm(args, samples)``): r - coef * rho(H, S),
   S the paper's strength computed by the server;
2. ``--custom-reward-post-process-path``: ``corrpo_reward_post_process()`` takes the whole
   rollout (slime's flat list of samples, groups consecutive) and returns (raw rewards,
   corrpo's group advantages of r - coef * rho), which slime's GRPO puts on every token.

    .venv/bin/python examples/integrations/slime_grpo.py
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from types import SimpleNamespace

import torch

PROMPTS = [("the cat sat on", "mat"), ("two plus three is", "five")]


async def verifier(args, sample) -> float:
    """A toy slime reward function: 1 when the answer word appears."""
    return 1.0 if sample.label in sample.response.split() else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt (slime's --n-samples-per-prompt)")
    parser.add_argument("--coef", type=float, default=0.5)
    args_ = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corrpo.integrations.slime import corrpo_reward_post_process, corrpo_rm
    from corrpo.testing import build_tiny_model
    from corrpo_server import ServerProcess

    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_model(f"{tmp}/model")
        model = AutoModelForCausalLM.from_pretrained(f"{tmp}/model", dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(f"{tmp}/model")
        samples = []  # the fields of slime's Sample that the hooks read
        for text, label in PROMPTS:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            out = model.generate(
                ids.repeat(args_.n, 1), do_sample=True, max_new_tokens=14, min_new_tokens=14,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
            for response in out[:, ids.shape[1] :].tolist():
                samples.append(SimpleNamespace(
                    prompt=text, tokens=ids[0].tolist() + response, response_length=len(response),
                    response=tokenizer.decode(response, skip_special_tokens=True), label=label, metadata={},
                ))  # fmt: skip
        rewards = [asyncio.run(verifier(None, s)) for s in samples]
        for sample, reward in zip(samples, rewards):
            sample.reward = reward  # what slime's rollout stores before post-processing
        # gate="none" so the toy run shows the term on every sample (the default, "correct",
        # applies it only to rewards >= threshold); min_tokens: the responses are short.
        settings = {"coef": args_.coef, "gate": "none", "min_tokens": 4}
        # slime's args as its post-process reads them, slime's defaults (grpo_std_normalization is
        # False under --disable-grpo-std-normalization: corrpo then gives drgrpo advantages)
        args = SimpleNamespace(
            n_samples_per_prompt=args_.n, rewards_normalization=True, grpo_std_normalization=True, reward_key=None
        )

        with ServerProcess("--model", f"{tmp}/model", "--device", "cpu", ready_timeout=180) as server:
            rm = corrpo_rm(verifier, target=server.target, **settings)

            async def per_sample():  # slime scores a rollout's samples concurrently
                return await asyncio.gather(*(rm(args, s) for s in samples))

            regularized = asyncio.run(per_sample())

            async def group_verifier(args, group):
                return [await verifier(args, s) for s in group]

            group_rm = corrpo_rm(group_verifier, target=server.target, **settings)
            grouped = []
            for g in range(0, len(samples), args_.n):
                grouped += asyncio.run(group_rm(args, samples[g : g + args_.n]))

            post_process = corrpo_reward_post_process(target=server.target, **settings)
            raw, advantages = post_process(args, samples)  # all groups of the rollout at once

    print("1. --custom-rm-path (per sample | --group-rm), 2. --custom-reward-post-process-path:")
    for k, s in enumerate(samples):
        print(
            f"  group {k // args_.n}  r={rewards[k]:.0f}  r-coef*rho={regularized[k]:+.3f} | {grouped[k]:+.3f}"
            f"  advantage={advantages[k]:+.3f}  {s.response!r}"
        )


if __name__ == "__main__":
    main()
