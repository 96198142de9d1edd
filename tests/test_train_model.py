"""The trainer's model, sampler and losses against independent references: the KV cache
against full recomputation, rotary positions against their defining property, sampling
against a float64 inverse CDF, the PPO loss against its formula in NumPy, and the
per-token statistics of the training forward pass against corrpo.reference."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import corrpo
from corrpo import reference
from corrpo.train.loop import Batch, response_lengths
from corrpo.train.loss import policy_loss, token_logprobs
from corrpo.train.model import ModelConfig, Transformer, apply_rope, generate, rope_tables

EOS, PAD = 2, 0


def model(seed: int = 0, vocab: int = 17) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, max_len=40))
    # Larger weights than the init's, so that logits and samples vary.
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(20)
    return m.eval()


def test_kv_cache_matches_full_recomputation() -> None:
    m = model()
    prompts = torch.randint(3, 17, (5, 6))
    out = generate(m, prompts, 12, temperature=1.0, uniforms=None, eos=-1, pad=PAD)
    with torch.no_grad():
        _, logits = m(torch.cat([prompts, out], dim=1))
    # Greedy decoding with the cache picks what the uncached forward pass ranks first.
    expected = logits[:, prompts.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(out, expected)
    # And the cached logits themselves agree with the uncached ones.
    from corrpo.train.model import KVCache

    cache = KVCache(m.cfg, 5, 18, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        _, first = m(prompts, cache)
        steps = [first[:, -1]]
        for t in range(out.shape[1] - 1):
            steps.append(m(out[:, t : t + 1], cache)[1][:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), logits[:, prompts.shape[1] - 1 : -1], rtol=1e-4, atol=1e-4)


def test_rope_scores_depend_on_offset_only() -> None:
    cfg = ModelConfig(vocab_size=5, d_model=16, n_heads=2, max_len=32)
    cos, sin = rope_tables(cfg)
    q, k = torch.randn(cfg.head_dim, dtype=torch.float32), torch.randn(cfg.head_dim, dtype=torch.float32)

    def at(x: torch.Tensor, pos: int) -> torch.Tensor:
        return apply_rope(x[None, None, None, :], cos[pos : pos + 1], sin[pos : pos + 1])[0, 0, 0]

    assert torch.allclose(at(q, 7).norm(), q.norm(), rtol=1e-5)
    for m_, n in ((3, 1), (12, 10), (30, 28)):
        assert torch.allclose(at(q, m_) @ at(k, n), at(q, 2) @ at(k, 0), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(at(q, 5) @ at(k, 0), at(q, 2) @ at(k, 0), rtol=1e-3)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampling_inverts_the_cdf(temperature: float) -> None:
    m = model(1)
    prompts = torch.randint(3, 17, (64, 4))
    uniforms = torch.from_numpy(np.random.default_rng(0).random((64, 1))).float()
    token = generate(m, prompts, 1, temperature=temperature, uniforms=uniforms, eos=-1, pad=PAD)[:, 0]
    with torch.no_grad():
        logits = m(prompts)[1][:, -1].double().numpy() / temperature
    p = np.exp(logits - logits.max(1, keepdims=True))
    cdf = np.cumsum(p / p.sum(1, keepdims=True), axis=1)
    expected = (cdf <= uniforms.double().numpy()).sum(1)
    # float32 vs float64 may move a draw that lands within rounding of a CDF step.
    gap = np.abs(cdf - uniforms.double().numpy()).min(1)
    near = gap < 1e-5
    assert np.array_equal(token.numpy()[~near], expected[~near]) and near.sum() <= 1
    assert len(set(token.tolist())) > 3


def test_sampling_is_per_row_and_stops_at_eos() -> None:
    m = model(2)
    prompts = torch.randint(3, 17, (6, 4))
    uniforms = torch.from_numpy(np.random.default_rng(3).random((6, 10))).float()
    full = generate(m, prompts, 10, temperature=1.0, uniforms=uniforms, eos=EOS, pad=PAD)
    # A row's sample is the same alone or in a batch: it hangs on its own noise only.
    alone = generate(m, prompts[2:3], 10, temperature=1.0, uniforms=uniforms[2:3], eos=EOS, pad=PAD)
    assert torch.equal(full[2:3], alone)
    lengths = response_lengths(full)
    for row, n in zip(full.tolist(), lengths.tolist()):
        if EOS in row:
            assert row.index(EOS) + 1 == n and all(t == PAD for t in row[n:])
        else:
            assert n == 10


def test_policy_loss_matches_its_formula() -> None:
    rng = np.random.default_rng(0)
    logp = rng.normal(-1, 0.3, 200)
    old = logp + rng.normal(0, 0.3, 200)
    ref = logp + rng.normal(0, 0.2, 200)
    adv = rng.normal(0, 1, 200)
    eps, beta = 0.2, 0.05
    ratio = np.exp(logp - old)
    expected = -np.minimum(ratio * adv, np.clip(ratio, 1 - eps, 1 + eps) * adv) + beta * (np.exp(ref - logp) - (ref - logp) - 1)
    t = torch.tensor(logp, requires_grad=True)
    terms = policy_loss(t, torch.tensor(old), torch.tensor(adv), eps, torch.tensor(ref), beta)
    np.testing.assert_allclose(terms.loss.detach().numpy(), expected, rtol=1e-12)
    # Where the clip binds, the surrogate passes no gradient; the KL term still does.
    terms.loss.sum().backward()
    binding = (adv > 0) & (ratio > 1 + eps) | (adv < 0) & (ratio < 1 - eps)
    assert binding.any()
    kl_grad = beta * (1 - np.exp(ref - logp))
    np.testing.assert_allclose(t.grad.numpy()[binding], kl_grad[binding], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(t.grad.numpy()[~binding], (-ratio * adv + kl_grad)[~binding], rtol=1e-10, atol=1e-12)
    assert np.array_equal(terms.clipped.numpy().astype(bool), binding)


def test_token_logprobs_match_log_softmax() -> None:
    logits = torch.randn(7, 11, dtype=torch.float64) * 3
    tokens = torch.randint(0, 11, (7,))
    z = logits.numpy() / 0.7
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    np.testing.assert_allclose(token_logprobs(logits, tokens, 0.7).numpy(), z[np.arange(7), tokens] - lse, rtol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_training_forward_statistics_match_the_reference(temperature: float) -> None:
    """What the trainer sends to the server: H and G of its own forward pass."""
    m = model(4)
    prompts = torch.randint(3, 17, (4, 5))
    responses = torch.randint(3, 17, (4, 9))
    batch = Batch(prompts, responses, torch.tensor([9, 3, 6, 1]))
    with torch.no_grad():
        hidden, logits = batch.forward(m)
    mask = batch.mask
    ids = responses[mask]
    stats = corrpo.token_stats_from_hidden(hidden[mask], m.lm_head.weight, ids, temperature=temperature, lengths=batch.lengths.numpy())
    want = reference.token_stats(logits[mask].double().numpy(), ids.numpy(), temperature=temperature)
    np.testing.assert_allclose(stats.entropy, want["entropy"], atol=1e-4)
    np.testing.assert_allclose(stats.grad_norm, want["grad_norm"], atol=1e-5)
    assert stats.entropy.std() > 0.05  # the check has something to check
