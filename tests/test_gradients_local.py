"""The ``local`` and ``jvp_cv`` estimators of corrpo.gradients against independent references.

``local`` (SPEC 3) keeps each token's own path and detaches the keys and values of the other
positions. The reference here shares nothing with corrpo.gradients.local: for every scored
token t it runs a fresh forward in which the outputs of the k and v projections (GPT-2: the
k and v columns of c_attn, Gemma 3's k_norm) are detached at every row but t - 1, takes torch.autograd.grad
of that token's seed with respect to every block parameter, and sums entrywise |g|, g^2
and the singular values of the q, k, v, o weight gradients in float64.

The models are tiny, random, float64, and run attention through a plain float64 softmax
registered below (transformers' eager functions upcast the softmax to float32 only, which
would cap the agreement near 1e-7).

Runtime: about 20 s on one CPU thread.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from corrpo.errors import ConfigError  # noqa: E402

VOCAB = 64
HIDDEN = 16
HEADS = 4
RTOL = 1e-8
REFERENCE = "corrpo_test_float64"


@pytest.fixture(scope="module", autouse=True)
def _few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def G():
    import corrpo.gradients as gradients

    return gradients


def _float64_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """softmax(q k^T scaling [softcapped] + mask) v, all in the inputs' dtype."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(2, 3) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask
    return (torch.softmax(scores, dim=-1) @ value).transpose(1, 2).contiguous(), None


def _register_reference() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(REFERENCE, _float64_attention)
    AttentionMaskInterface.register(REFERENCE, eager_mask)


def _config(name: str):
    tf = transformers
    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        max_position_embeddings=64,
        initializer_range=0.3,
    )
    if name == "llama":  # grouped-query attention
        return tf.LlamaConfig(num_key_value_heads=2, **common), tf.LlamaForCausalLM
    if name == "qwen2":  # q, k, v biases
        return tf.Qwen2Config(num_key_value_heads=2, **common), tf.Qwen2ForCausalLM
    if name == "gemma3":  # q_norm and k_norm, one sliding-window layer, one global
        cfg = tf.Gemma3TextConfig(
            num_key_value_heads=1,
            head_dim=4,
            query_pre_attn_scalar=4,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            final_logit_softcapping=4.0,
            **common,
        )
        return cfg, tf.Gemma3ForCausalLM
    if name == "gemma2":  # attention logit softcapping
        cfg = tf.Gemma2Config(
            num_key_value_heads=2,
            head_dim=4,
            query_pre_attn_scalar=4,
            sliding_window=4,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=4.0,
            **common,
        )
        return cfg, tf.Gemma2ForCausalLM
    if name == "gpt2":  # fused Conv1D c_attn, biases, LayerNorm
        cfg = tf.GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=HEADS, n_positions=64, initializer_range=0.3,
            bos_token_id=0, eos_token_id=0,
        )
        return cfg, tf.GPT2LMHeadModel
    raise KeyError(name)


FAMILIES = ["llama", "qwen2", "gemma3", "gemma2", "gpt2"]
_MODELS: dict[str, nn.Module] = {}


def tiny(name: str) -> nn.Module:
    """A float64, eval-mode, 2-block model with every parameter perturbed, built once."""
    if name not in _MODELS:
        _register_reference()
        cfg, cls = _config(name)
        torch.manual_seed(4321 + FAMILIES.index(name))
        model = cls(cfg).double().eval()
        model.config._attn_implementation = REFERENCE
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        _MODELS[name] = model
    return _MODELS[name]


def token_row(seed: int, length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


def _blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.transformer.h) if hasattr(model, "transformer") else list(model.model.layers)


def _kv_and_parts(block: nn.Module):
    """(the last modules with parameters before attention whose outputs carry k and v: with
    the output columns that are k and v, and the axis of positions) and (weight, function
    taking its gradient to the q, k, v or o matrix)."""
    if hasattr(block, "attn"):  # GPT-2: Conv1D weight [d_in, 3 d], output columns [q | k | v]
        d = block.attn.c_proj.weight.shape[1]
        w = block.attn.c_attn.weight
        parts = [(w, lambda g: g[:, :d]), (w, lambda g: g[:, d : 2 * d]), (w, lambda g: g[:, 2 * d :]),
                 (block.attn.c_proj.weight, lambda g: g)]
        return [(block.attn.c_attn, slice(d, 3 * d), 1)], parts
    a = block.self_attn
    parts = [(getattr(a, n).weight, lambda g: g) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    # Gemma 3 normalizes the keys per head, [batch, heads, positions, d], after k_proj: the key
    # an attention sees is k_norm's output, and k_norm's weight must not reach other rows.
    key = (a.k_norm, slice(None), 2) if hasattr(a, "k_norm") else (a.k_proj, slice(None), 1)
    return [key, (a.v_proj, slice(None), 1)], parts


def _seed(z: torch.Tensor, y: int, objective: str) -> torch.Tensor:
    return z[y] if objective == "logit" else torch.log_softmax(z, -1)[y]


def token_grads(name: str, ids: torch.Tensor, objective: str = "logit", local: bool = True):
    """Per scored token t = 1 .. L-1, the gradient of t's seed with respect to every block
    parameter (a list per block), from a fresh forward; ``local``: with k and v detached at
    every row but t - 1."""
    model = tiny(name)
    blocks = _blocks(model)
    out = []
    for t in range(1, len(ids)):
        j = t - 1
        hooks = []
        for block in blocks if local else []:
            for module, cols, axis in _kv_and_parts(block)[0]:

                def keep_own_row(m, args, o, cols=cols, axis=axis, j=j):
                    shape = [1] * o.dim()
                    shape[axis] = o.shape[axis]
                    live = torch.zeros(shape, dtype=torch.bool)
                    live.view(-1)[j] = True
                    mixed = torch.where(live, o, o.detach())
                    return torch.cat([o[..., : cols.start], mixed[..., cols]], dim=-1) if cols.start else mixed

                hooks.append(module.register_forward_hook(keep_own_row))
        try:
            logits = model(ids[None]).logits[0]
        finally:
            for h in hooks:
                h.remove()
        seed = _seed(logits[j], int(ids[t]), objective)
        per_block = []
        for block in blocks:
            params = list(block.parameters())
            grads = torch.autograd.grad(seed, params, retain_graph=True, allow_unused=True)
            per_block.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
        out.append(per_block)
    return out


def local_oracle(name: str, ids: torch.Tensor, objective: str = "logit") -> dict[str, np.ndarray]:
    """Per block and scored token t = 1 .. L-1: L1, squared Frobenius and q/k/v/o nuclear
    norms of the gradient of t's seed, with k and v detached at every row but t - 1."""
    blocks = _blocks(tiny(name))
    out = {"l1": [], "sq": [], "nuclear": []}
    for per_block in token_grads(name, ids, objective):
        rows = {"l1": [], "sq": [], "nuclear": []}
        for block, grads in zip(blocks, per_block):
            by_id = {id(p): g for p, g in zip(block.parameters(), grads)}
            rows["l1"].append(sum(float(g.abs().sum()) for g in grads))
            rows["sq"].append(sum(float(g.square().sum()) for g in grads))
            parts = _kv_and_parts(block)[1]
            rows["nuclear"].append(sum(float(torch.linalg.svdvals(f(by_id[id(w)])).sum()) for w, f in parts))
        for key in out:
            out[key].append(rows[key])
    return {key: np.asarray(v) for key, v in out.items()}


# ------------------------------------------------------------------ local against its oracle


@pytest.mark.parametrize("objective", ["logit", "logprob"])
@pytest.mark.parametrize("family", FAMILIES)
def test_local_matches_detached_oracle(G, family, objective):
    ids = token_row(FAMILIES.index(family), 10)
    want = local_oracle(family, ids, objective)
    res = G.token_strengths(tiny(family), ids, estimator="local", objective=objective)
    assert res.estimator == "local" and tuple(res.measures) == ("l1_mean", "nuclear_qkvo", "frobenius")
    np.testing.assert_array_equal(res.positions, np.arange(1, 10))
    np.testing.assert_allclose(res.per_block["l1_mean"], want["l1"], rtol=RTOL)
    np.testing.assert_allclose(res.per_block["nuclear_qkvo"], want["nuclear"], rtol=RTOL)
    np.testing.assert_allclose(res.per_block["frobenius"], want["sq"], rtol=RTOL)
    np.testing.assert_allclose(res.frobenius, np.sqrt(want["sq"].sum(axis=1)), rtol=RTOL)
    np.testing.assert_allclose(res.l1_mean, want["l1"].mean(axis=1), rtol=RTOL)


def test_local_is_not_exact(G):
    """Beyond the first token local and exact differ (so the identity below can fail), and
    the first scored token, whose prefix is one position, has no other keys and values to
    detach: there local is the exact measure in every block."""
    ids = token_row(11, 9)
    model = tiny("gemma3")
    local = G.token_strengths(model, ids, estimator="local", measures=("l1_mean", "nuclear_qkvo", "frobenius"))
    exact = G.token_strengths(model, ids, estimator="exact", measures=("l1_mean", "nuclear_qkvo", "frobenius"))
    for m in ("l1_mean", "nuclear_qkvo", "frobenius"):
        np.testing.assert_allclose(local.per_block[m][0], exact.per_block[m][0], rtol=RTOL, err_msg=m)
        rel = np.abs(local.per_block[m][1:] - exact.per_block[m][1:]) / exact.per_block[m][1:]
        assert rel.max() > 1e-3, m
    np.testing.assert_allclose(local.entropy_bits, exact.entropy_bits, rtol=RTOL)


def test_local_chunked_attention_matches(G, monkeypatch):
    """Queries taken a few at a time (each chunk recomputed in the backward) give the same
    values as one chunk."""
    import corrpo.gradients.local as local

    ids = token_row(12, 12)
    model = tiny("gemma2")
    whole = G.token_strengths(model, ids, estimator="local")
    monkeypatch.setattr(local, "SCORE_ELEMENTS", 3 * HEADS * 12)  # 3 queries a chunk
    chunked = G.token_strengths(model, ids, estimator="local")
    for m in whole.measures:
        np.testing.assert_allclose(chunked.measure(m), whole.measure(m), rtol=RTOL, err_msg=m)


def test_local_padding_and_positions(G):
    """A left-padded batch gives what each row alone gives, for the chosen positions only."""
    model = tiny("qwen2")
    a, b = token_row(13, 8), token_row(14, 6)
    ids = torch.zeros((2, 8), dtype=torch.long)
    mask = torch.zeros((2, 8), dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 2:], mask[1, 2:] = b, 1
    res = G.token_strengths(model, ids, [[3, 5, 7], [4, 7]], attention_mask=mask, estimator="local")
    alone_a = G.token_strengths(model, a, [3, 5, 7], estimator="local")
    alone_b = G.token_strengths(model, b, [2, 5], estimator="local")
    for m in res.measures:
        np.testing.assert_allclose(res.measure(m), np.concatenate([alone_a.measure(m), alone_b.measure(m)]), rtol=RTOL)


def test_local_restores_attention_and_model(G):
    model = tiny("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    G.token_strengths(model, token_row(15, 6), estimator="local")
    assert model.config._attn_implementation == REFERENCE
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kwargs", [dict(estimator="local", k=4), dict(estimator="jvp_cv", measures=("l1_mean",))])
def test_bad_settings(G, kwargs):
    with pytest.raises(ConfigError):
        G.token_strengths(tiny("llama"), token_row(18, 5), **kwargs)


def test_local_needs_swappable_attention(G):
    """An attention that does not dispatch through transformers' AttentionInterface cannot
    be made local: a clear error, and the model's setting is restored."""

    from transformers.models.llama import modeling_llama as ml

    class Fixed(ml.LlamaAttention):
        """Calls the eager attention function directly, whatever the config says."""

        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
            shape = (*hidden_states.shape[:-1], -1, self.head_dim)
            q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
            k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
            v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
            q, k = ml.apply_rotary_pos_emb(q, k, *position_embeddings)
            out, w = ml.eager_attention_forward(self, q, k, v, attention_mask, scaling=self.scaling)
            return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1)), w

    cfg, cls = _config("llama")
    model = cls(cfg).double().eval()
    model.model.layers[1].self_attn.__class__ = Fixed
    with pytest.raises(G.ArchitectureError, match=r"AttentionInterface in 1 of 2 decoder blocks"):
        G.token_strengths(model, token_row(16, 5), estimator="local")
    assert model.config._attn_implementation != "corrpo_local"


# ------------------------------------------------------------------ forward-mode passes


@pytest.mark.parametrize("softcap, window", [(None, None), (2.0, 3)])
def test_attention_rules_against_finite_differences(softcap, window):
    """corrpo's attention, plain form: its written-out reverse- and forward-mode rules
    against finite differences (torch.autograd.gradcheck), over query chunks of 2, with and
    without softcapping and a sliding window."""
    from corrpo.gradients import local

    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    before = local.SCORE_ELEMENTS
    local.SCORE_ELEMENTS = 2 * 2 * 5
    try:
        assert torch.autograd.gradcheck(
            lambda q, k, v: local._Attend.apply(q, k, v, None, window, 0.7, softcap, False),
            (q, k, v), check_forward_ad=True,
        )  # fmt: skip
    finally:
        local.SCORE_ELEMENTS = before


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_mode_derivatives_match_gradients(G, family):
    """The forward-mode passes of jvp and jvp_cv, along given directions, against the dot
    products of the per-token gradients with them: with corrpo's chunked attention, J_t v
    (every token's full gradient); with the straight-through one, L_t v (the gradient with
    the other rows' k and v detached)."""
    from corrpo.gradients.architecture import describe
    from corrpo.gradients.capture import Capture
    from corrpo.gradients.estimators import _seeds_along, _stats
    from corrpo.gradients.local import swapped

    model = tiny(family)
    ids = token_row(20 + FAMILIES.index(family), 9)
    arch = describe(model)
    positions = torch.arange(1, 9)
    gen = torch.Generator().manual_seed(5)
    with Capture(model, arch, list(range(len(arch.blocks)))) as capture:
        h, stats = _stats(capture, ids, positions, "logit", graph=False)
        params, along = _seeds_along(capture, ids, positions, h[0], stats.cotangent)
        tangents = {n: torch.randn((3, *p.shape), generator=gen, dtype=p.dtype) for n, p in params.items()}
        got = {}
        with torch.no_grad():
            for local in (False, True):
                with swapped(model, len(arch.blocks), local=local):
                    got[local] = along(tangents).numpy()
    by_param = dict(model.base_model.named_parameters())
    order = [name for block in _blocks(model) for name in (n for n, p in by_param.items() if any(p is q for q in block.parameters()))]
    for local in (False, True):
        want = np.zeros((3, 8))
        for t, per_block in enumerate(token_grads(family, ids, local=local)):
            flat = [g for grads in per_block for g in grads]
            for name, g in zip(order, flat):
                want[:, t] += (tangents[name].reshape(3, -1) @ g.reshape(-1)).numpy()
        # transformers' RMSNorms cast to float32 inside even a float64 model, and forward and
        # reverse mode round there differently: about 1e-6 apart (GPT-2's LayerNorm: 1e-12)
        tol = 1e-11 if family == "gpt2" else 1e-5
        np.testing.assert_allclose(got[local], want, rtol=tol, atol=tol * np.abs(want).max(), err_msg=f"local={local}")
    assert np.abs(got[True] - got[False])[:, 1:].max() > 1e-3 * np.abs(got[False]).max()


# ------------------------------------------------------------------ jvp_cv


def test_orthogonal_gaussian_directions(G):
    """Directions orthogonal within each tensor (so over all), and each one Gaussian: for a
    fixed vector a, the mean of (a . v)^2 over many draws is |a|^2 within the bound its
    variance gives (Var (a . v)^2 = 2 |a|^4 for Gaussian v), and |v|^2 / D has mean 1."""
    from corrpo.gradients.estimators import orthogonal_gaussian

    params = {"w": torch.zeros(6, 5, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}
    gen = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(6, 5, generator=gen, dtype=torch.float64), "b": torch.randn(3, generator=gen, dtype=torch.float64)}
    a2 = sum(float(t.square().sum()) for t in a.values())
    draws, n = 2000, 8  # 8 directions a draw: more than b's 3 entries, so b's come in blocks
    proj, norms = [], []
    for _ in range(draws):
        v = orthogonal_gaussian(n, params, gen)
        assert v["w"].shape == (n, 6, 5) and v["b"].shape == (n, 3) and v["w"].dtype == torch.float64
        flat = torch.cat([v["w"].reshape(n, -1), v["b"]], dim=1)
        gram = v["w"].reshape(n, -1) @ v["w"].reshape(n, -1).T
        assert torch.allclose(gram - torch.diag(gram.diagonal()), torch.zeros(n, n, dtype=torch.float64), atol=1e-5)
        proj.append((flat @ torch.cat([a["w"].reshape(-1), a["b"]])).square())
        norms.append(flat.square().sum(dim=1) / flat.shape[1])
    proj = torch.cat(proj).numpy()
    # 16000 draws, correlated within a draw by orthogonality only (negatively): 4 sigma
    bound = 4 * math.sqrt(2 * a2**2 / len(proj))
    assert abs(proj.mean() - a2) < bound, (proj.mean(), a2, bound)
    assert abs(torch.cat(norms).mean().item() - 1) < 4 * math.sqrt(2 / 33 / len(proj))


def test_jvp_cv_is_unbiased_and_converges(G):
    """jvp_cv's estimate of frobenius^2 against the exact one. Its mean over seeds is within
    4.5 standard errors of it (the standard error taken from the spread of the seeds'
    estimates); with 32x the directions each token is within 4.5 of the spread that
    implies; at t = 1, where the local gradient is the exact one, every estimate is exact;
    and the estimates spread less than plain jvp's with as many directions."""
    model = tiny("llama")
    ids = token_row(17, 9)
    exact2 = G.token_strengths(model, ids, estimator="exact", measures=("frobenius",)).frobenius ** 2
    local2 = G.token_strengths(model, ids, estimator="local", measures=("frobenius",)).frobenius ** 2
    assert np.abs(local2[1:] / exact2[1:] - 1).min() > 0.1  # the control variate alone is off
    k, seeds = 8, 48
    runs = np.stack([G.token_strengths(model, ids, estimator="jvp_cv", k=k, seed=s).frobenius ** 2 for s in range(seeds)])
    spread = runs.std(axis=0, ddof=1)
    np.testing.assert_allclose(runs[:, 0], exact2[0], rtol=RTOL)
    assert np.all(np.abs(runs.mean(axis=0) - exact2) <= 4.5 * spread / math.sqrt(seeds) + 1e-9 * exact2)
    plain = np.stack([G.token_strengths(model, ids, estimator="jvp", k=k, seed=s).frobenius ** 2 for s in range(seeds)])
    assert np.mean(plain.std(axis=0, ddof=1)[1:] ** 2) > np.mean(spread[1:] ** 2)
    big = G.token_strengths(model, ids, estimator="jvp_cv", k=32 * k, seed=seeds)
    assert big.estimator == "jvp_cv" and big.per_block == {} and big.l1_mean is None
    assert np.all(np.abs(big.frobenius**2 - exact2) <= 4.5 * spread / math.sqrt(32) + 1e-9 * exact2)
