"""Score a synthetic batch of rollouts with corrpo, in-process.

Two prompts, four sampled rollouts each: per-token statistics from the logits, rho per
rollout, CorR-PO rewards and GRPO advantages, and the batch fingerprint. Run it with
`make demo`; it needs only NumPy and the native extension.
"""

from __future__ import annotations

import argparse

import numpy as np

import corrpo


def synthetic_rollout(rng: np.random.Generator, length: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose sharpness varies token by token, and tokens sampled from them."""
    sharpness = rng.gamma(2.0, 1.5, size=(length, 1))
    logits = (sharpness * rng.standard_normal((length, vocab))).astype(np.float32)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    tokens = np.array([rng.choice(vocab, p=p) for p in probs])
    return logits, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--coef", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    n = args.prompts * args.group_size
    lengths = rng.integers(24, 120, size=n)
    rollouts = [synthetic_rollout(rng, int(t), args.vocab) for t in lengths]
    logits = np.concatenate([r[0] for r in rollouts])
    tokens = np.concatenate([r[1] for r in rollouts])
    rewards = rng.integers(0, 2, size=n).astype(float)  # a verifier's 0/1 verdicts

    stats = corrpo.token_stats(logits, tokens, lengths=lengths)
    rc = corrpo.rollout_correlations(stats.entropy, stats.grad_norm, lengths)
    out = corrpo.regularize(rewards, rc.rho, [args.group_size] * args.prompts, coef=args.coef)
    fp = corrpo.fingerprint(stats.entropy, stats.grad_norm, tokens, lengths)

    print(f"corrpo {corrpo.__version__} ({corrpo.simd_isa()}): {len(tokens)} tokens, vocabulary {args.vocab}")
    print(f"{'rollout':>7} {'group':>5} {'tokens':>6} {'H mean':>7} {'G mean':>7} {'rho':>7} {'reward':>6} {'r~':>7} {'adv':>7}")
    start = 0
    for i, t in enumerate(lengths):
        h, g = stats.entropy[start : start + t], stats.grad_norm[start : start + t]
        rho = f"{rc.rho[i]:+.3f}" if rc.defined[i] else rc.reasons[i]
        print(
            f"{i:>7} {i // args.group_size:>5} {t:>6} {h.mean():>7.3f} {g.mean():>7.3f} {rho:>7} "
            f"{rewards[i]:>6.0f} {out.rewards[i]:>+7.3f} {out.advantages[i]:>+7.3f}"
        )
        start += t
    print(
        f"fingerprint ({fp.method}): pooled rho {fp.rho_pooled:+.3f}, over {fp.n_unique_tokens} distinct tokens "
        f"{fp.rho_unique:+.3f}, mean per rollout {fp.rho_rollout_mean:+.3f}; "
        f"mean entropy {fp.entropy_mean_bits:.2f} bits"
    )
    print(f"settings: coef={out.coef} gate={out.gate} threshold={out.threshold} advantage={out.advantage}")


if __name__ == "__main__":
    main()
