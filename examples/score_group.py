"""Score a synthetic batch of rollouts through corrpo's reward server.

Starts `corrpo-server serve` on a free loopback port (or uses --target), then scores two
prompts x four rollouts twice with the gRPC client: once with the statistics reduced here
(the default: ~12 bytes per token on the wire), once with the logits streamed to the
server in blocks. Prints rho per rollout, the CorR-PO rewards and GRPO advantages and the
batch fingerprint, checks both paths agree, and stops the server. Run it with `make demo`.
"""

from __future__ import annotations

import argparse

import numpy as np

import corrpo
from corrpo.client import RewardClient


def synthetic_rollout(rng: np.random.Generator, length: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose sharpness varies token by token, and tokens sampled from them."""
    sharpness = rng.gamma(2.0, 1.5, size=(length, 1))
    logits = (sharpness * rng.standard_normal((length, vocab))).astype(np.float32)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    tokens = np.array([rng.choice(vocab, p=p) for p in probs])
    return logits, tokens


def print_scores(scores: corrpo.Scores, rewards: np.ndarray) -> None:
    print(f"{'rollout':>7} {'group':>5} {'tokens':>6} {'H mean':>7} {'G mean':>7} {'rho':>7} {'reward':>6} {'r~':>7} {'adv':>7}")
    for g, span in enumerate(scores.groups()):
        for i in range(span.start, span.stop):
            rho = f"{scores.rho[i]:+.3f}" if scores.reasons[i] is None else scores.reasons[i]
            print(
                f"{i:>7} {g:>5} {scores.n_tokens[i]:>6} {scores.entropy_mean[i]:>7.3f} {scores.grad_norm_mean[i]:>7.3f} "
                f"{rho:>7} {rewards[i]:>6.0f} {scores.rewards[i]:>+7.3f} {scores.advantages[i]:>+7.3f}"
            )
    fp = scores.fingerprint
    print(
        f"fingerprint ({fp.method}): pooled rho {fp.rho_pooled:+.3f}, over {fp.n_unique_tokens} distinct tokens "
        f"{fp.rho_unique:+.3f}, mean per rollout {fp.rho_rollout_mean:+.3f}; mean entropy {fp.entropy_mean_bits:.2f} bits"
    )
    c = scores.config
    print(f"settings: coef={c.coef} gate={c.gate} threshold={c.threshold} advantage={c.advantage} method={c.method}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="host:port of a running corrpo-server (default: start one)")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--coef", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    n = args.prompts * args.group_size
    rollouts = [synthetic_rollout(rng, int(t), args.vocab) for t in rng.integers(24, 120, size=n)]
    logits, tokens = [r[0] for r in rollouts], [r[1] for r in rollouts]
    rewards = rng.integers(0, 2, size=n).astype(float)  # a verifier's 0/1 verdicts

    server = None
    if args.target is None:
        from corrpo_server import ServerProcess

        server = ServerProcess()
        print(f"started corrpo-server (pid {server.process.pid}) on {server.target}")
    target = args.target or server.target
    try:
        with RewardClient(target) as client:
            print(f"server health: {client.health()}")
            kwargs = dict(logits=logits, token_ids=tokens, rewards=rewards, group_sizes=args.group_size, coef=args.coef)
            scores = client.score(**kwargs)
            print(f"\nscored {sum(len(t) for t in tokens)} tokens (vocabulary {args.vocab}) on {scores.backend}, "
                  f"request {scores.request_id}:")
            print_scores(scores, rewards)
            streamed = client.score(send="logits", **kwargs)
            agree = np.allclose(streamed.advantages, scores.advantages, rtol=0, atol=1e-12)
            print(f"\nthe same rollouts with their logits streamed to the server: advantages agree: {agree}")
    finally:
        if server is not None:
            code = server.stop()
            print(f"stopped corrpo-server (exit code {code})")


if __name__ == "__main__":
    main()
