"""corrpo.gradients.token_strengths (SPEC 3) against an independent brute-force oracle.

The oracle below shares nothing with corrpo.gradients: for every scored token it runs a fresh
forward pass of the whole (unpadded) row, seeds the target logit or log-prob, takes
``torch.autograd.grad`` of that one scalar with respect to every parameter of the decoder
blocks, and sums entrywise |g|, g^2 and the singular values of the (split) q, k, v, o weight
gradients. The models are tiny, randomly initialised transformers models cast to float64
(transformers still runs RMSNorm statistics and eager softmax in float32 inside them; both
sides run the same forward, so the comparisons hold to ~1e-8 nonetheless).

Runtime: ~15 s on one CPU thread.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from scipy import stats as scipy_stats  # noqa: E402
from torch import nn  # noqa: E402

import corrpo  # noqa: E402

VOCAB = 64
HIDDEN = 16
HEADS = 4
LN2 = math.log(2.0)
RTOL = 1e-8

EXACT_DEFAULT = ("l1_mean", "nuclear_qkvo")
PARAMETER_MEASURES = ("l1_mean", "nuclear_qkvo", "frobenius")
ALL_MEASURES = PARAMETER_MEASURES + ("logit_grad", "head_logit_grad")


@pytest.fixture(scope="module", autouse=True)
def _few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def G():
    """corrpo.gradients, imported lazily so that the rest of the suite collects without it."""
    import corrpo.gradients as gradients

    return gradients


# ----------------------------------------------------------------------------- tiny models


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
    if name == "llama":  # grouped-query attention: 2 kv heads for 4 query heads
        return tf.LlamaConfig(num_key_value_heads=2, **common), tf.LlamaForCausalLM
    if name == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, **common), tf.MistralForCausalLM
    if name == "qwen2":  # q, k, v biases
        return tf.Qwen2Config(num_key_value_heads=2, **common), tf.Qwen2ForCausalLM
    if name == "gemma":  # scaled embeddings, (1 + w) RMSNorm, tied head
        return tf.GemmaConfig(num_key_value_heads=1, head_dim=4, **common), tf.GemmaForCausalLM
    if name == "gemma2":  # final-logit and attention softcapping, sliding window
        cfg = tf.Gemma2Config(
            num_key_value_heads=2,
            head_dim=4,
            final_logit_softcapping=4.0,
            attn_logit_softcapping=3.0,
            query_pre_attn_scalar=4,
            sliding_window=4,
            **common,
        )
        return cfg, tf.Gemma2ForCausalLM
    if name == "gpt2":  # fused Conv1D c_attn, mlp.c_proj beside attn.c_proj, LayerNorm, biases
        cfg = tf.GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=HEADS, n_positions=64, initializer_range=0.3,
            bos_token_id=0, eos_token_id=0,
        )
        return cfg, tf.GPT2LMHeadModel
    if name == "neox":  # query_key_value fused per head
        cfg = tf.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=HEADS, max_position_embeddings=64, initializer_range=0.3,
            bos_token_id=0, eos_token_id=0,
        )
        return cfg, tf.GPTNeoXForCausalLM
    if name == "phi3":  # qkv_proj fused as [q, k, v] with 2 kv heads, gate_up_proj fused
        return tf.Phi3Config(num_key_value_heads=2, pad_token_id=0, **common), tf.Phi3ForCausalLM
    raise KeyError(name)


FAMILIES = ["llama", "mistral", "qwen2", "gemma", "gemma2", "gpt2", "neox", "phi3"]

_MODELS: dict[str, nn.Module] = {}


def tiny(name: str) -> nn.Module:
    """A float64, eval-mode, 2-block model with every parameter perturbed (non-trivial norms
    and biases), built once per session."""
    if name not in _MODELS:
        cfg, cls = _config(name)
        cfg._attn_implementation = "eager"
        torch.manual_seed(1234 + FAMILIES.index(name))
        model = cls(cfg).double().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        _MODELS[name] = model
    return _MODELS[name]


def token_rows(seed: int, batch: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


# ------------------------------------------------------------------------------ the oracle


def _blocks(model: nn.Module) -> list[nn.Module]:
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        try:
            return list(model.get_submodule(path))
        except AttributeError:
            continue
    raise AssertionError("test oracle: no block list")


def _qkvo(block: nn.Module) -> list[tuple[torch.Tensor, object]]:
    """(weight parameter, function taking its gradient to the q, k, v or o matrix)."""
    if hasattr(block, "self_attn") and hasattr(block.self_attn, "qkv_proj"):  # Phi-3: rows [q | k | v]
        a = block.self_attn
        w = a.qkv_proj.weight
        q = HEADS * (HIDDEN // HEADS)
        kv = (w.shape[0] - q) // 2
        return [
            (w, lambda g: g[:q]),
            (w, lambda g: g[q : q + kv]),
            (w, lambda g: g[q + kv :]),
            (a.o_proj.weight, lambda g: g),
        ]
    if hasattr(block, "self_attn"):
        a = block.self_attn
        return [(getattr(a, n).weight, lambda g: g) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if hasattr(block, "attn"):  # GPT-2, Conv1D weight [d_in, 3 d]
        d = block.attn.c_proj.weight.shape[1]
        w = block.attn.c_attn.weight
        return [
            (w, lambda g: g[:, :d]),
            (w, lambda g: g[:, d : 2 * d]),
            (w, lambda g: g[:, 2 * d :]),
            (block.attn.c_proj.weight, lambda g: g),
        ]
    a = block.attention  # GPT-NeoX, Linear weight [3 d, d], rows [heads, 3, head_size]
    w = a.query_key_value.weight
    heads = HEADS
    size = w.shape[0] // (3 * heads)

    def part(i):
        return lambda g: g.reshape(heads, 3, size, g.shape[1])[:, i].reshape(heads * size, g.shape[1])

    return [(w, part(0)), (w, part(1)), (w, part(2)), (a.dense.weight, lambda g: g)]


def _seed(z: torch.Tensor, y: int, objective: str) -> torch.Tensor:
    return z[y] if objective == "logit" else torch.log_softmax(z, -1)[y]


def _grads(seed: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(seed, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


_ORACLE: dict[tuple, dict[str, np.ndarray]] = {}


def oracle(name: str, row, positions, objective: str) -> dict[str, np.ndarray]:
    """Every per-token quantity of SPEC 3 for one unpadded row (1-D ids) at the given
    positions, by brute force: one fresh forward and one autograd.grad per token."""
    ids = torch.as_tensor(row, dtype=torch.long).reshape(-1)
    positions = [int(t) for t in positions]
    key = (name, tuple(ids.tolist()), tuple(positions), objective)
    if key in _ORACLE:
        return _ORACLE[key]
    model = tiny(name)
    blocks = _blocks(model)
    block_params = [list(b.parameters()) for b in blocks]
    flat = [p for ps in block_params for p in ps]
    index = {id(p): i for i, p in enumerate(flat)}
    head = model.get_output_embeddings()
    out = {k: [] for k in ("l1_block", "nuc_block", "frob2_block", "entropy_bits", "logit_grad", "h_norm", "token_ids")}
    for t in positions:
        captured = {}
        hook = head.register_forward_hook(lambda m, args, o: captured.__setitem__("h", args[0]))
        try:
            logits = model(ids[None]).logits[0]
        finally:
            hook.remove()
        z = logits[t - 1]
        y = int(ids[t])
        assert z.dtype == torch.float64
        grads = _grads(_seed(z, y, objective), flat)
        l1, nuc, frob2 = [], [], []
        for b, ps in zip(blocks, block_params):
            gs = [grads[index[id(p)]] for p in ps]
            l1.append(sum(float(g.abs().sum()) for g in gs))
            frob2.append(sum(float((g * g).sum()) for g in gs))
            nuc.append(sum(float(torch.linalg.svdvals(f(grads[index[id(w)]])).sum()) for w, f in _qkvo(b)))
        out["l1_block"].append(l1)
        out["nuc_block"].append(nuc)
        out["frob2_block"].append(frob2)
        with torch.no_grad():
            zd = z.detach()
            p = torch.softmax(zd, -1)
            out["entropy_bits"].append(float(-(p * torch.log_softmax(zd, -1)).sum()) / LN2)
            onehot = torch.zeros_like(p)
            onehot[y] = 1.0
            out["logit_grad"].append(float(torch.linalg.vector_norm(p - onehot)))
            out["h_norm"].append(float(torch.linalg.vector_norm(captured["h"][0, t - 1].detach())))
        out["token_ids"].append(y)
    res = {k: np.asarray(v, dtype=np.int64 if k == "token_ids" else np.float64) for k, v in out.items()}
    n = len(positions)
    for k in ("l1_block", "nuc_block", "frob2_block"):
        res[k] = res[k].reshape(n, len(blocks))
    res["l1_mean"] = res["l1_block"].mean(axis=1)
    res["nuclear_qkvo"] = res["nuc_block"].mean(axis=1)
    res["frobenius"] = np.sqrt(res["frob2_block"].sum(axis=1))
    res["head_logit_grad"] = res["logit_grad"] * res["h_norm"]
    res["positions"] = np.asarray(positions, dtype=np.int64)
    _ORACLE[key] = res
    return res


def oracle_batch(name, rows_and_positions, objective):
    """Concatenate per-row oracles: rows_and_positions is [(unpadded ids, positions in
    unpadded coordinates, offset of the row's first real token)]."""
    parts = []
    for b, (ids, positions, offset) in enumerate(rows_and_positions):
        o = oracle(name, ids, positions, objective)
        parts.append(dict(o, rows=np.full(len(positions), b, np.int64), positions=o["positions"] + offset))
    keys = parts[0].keys()
    res = {k: np.concatenate([p[k] for p in parts]) for k in keys}
    res["lengths"] = np.asarray([len(p[1]) for p in rows_and_positions], np.int64)
    return res


PER_BLOCK = {"l1_mean": "l1_block", "nuclear_qkvo": "nuc_block", "frobenius": "frob2_block"}


def assert_matches(res, want, measures, rtol=RTOL, per_block=True):
    atol = 1e-12 if rtol <= 1e-6 else 1e-7
    np.testing.assert_array_equal(res.rows, want["rows"])
    np.testing.assert_array_equal(res.positions, want["positions"])
    np.testing.assert_array_equal(res.token_ids, want["token_ids"])
    np.testing.assert_array_equal(res.lengths, want["lengths"])
    for arr in (res.rows, res.positions, res.token_ids, res.lengths):
        assert np.asarray(arr).dtype == np.int64
    assert len(res) == len(want["positions"])
    np.testing.assert_allclose(res.entropy_bits, want["entropy_bits"], rtol=rtol, atol=atol)
    assert np.asarray(res.entropy_bits).dtype == np.float64
    for m in measures:
        got = res.measure(m)
        assert np.asarray(got).dtype == np.float64, m
        assert got.shape == (len(res),), m
        np.testing.assert_allclose(got, want[m], rtol=rtol, atol=atol, err_msg=m)
        if per_block and m in PER_BLOCK:
            block = np.asarray(res.per_block[m])
            assert block.shape == want[PER_BLOCK[m]].shape, m
            np.testing.assert_allclose(block, want[PER_BLOCK[m]], rtol=rtol, atol=atol, err_msg=f"per_block {m}")


def full_rows(ids: torch.Tensor):
    return [(row, list(range(1, len(row))), 0) for row in ids]


# ------------------------------------------------------------------ 1. every measure, 6 families

def test_oracle_is_not_degenerate():
    """The tiny models give varied, non-zero strengths (so the comparisons below can fail)."""
    ids = token_rows(0, 1, 10)[0]
    o = oracle("llama", ids, range(1, 10), "logit")
    for k in ("l1_mean", "nuclear_qkvo", "frobenius", "logit_grad", "head_logit_grad", "entropy_bits"):
        assert np.all(o[k] > 0) and np.std(o[k]) > 1e-3 * np.mean(o[k]), k
    assert np.all(o["entropy_bits"] < math.log2(VOCAB))
    # the two blocks contribute differently
    assert not np.allclose(o["l1_block"][:, 0], o["l1_block"][:, 1])


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_gradients_match_finite_differences(family):
    """The oracle's block gradient checked against numerics: along the unit vector g/|g| the
    seed's slope (a Richardson-extrapolated central difference) is |g|, the oracle's
    frobenius. GPT-2 is float64 end to end; the others run their norm statistics or eager
    softmax in float32 inside a float64 model (transformers upcasts then casts back), so
    their difference quotient is only good to ~1e-5."""
    rtol = 1e-6 if family == "gpt2" else 2e-4
    model = tiny(family)
    ids = token_rows(30, 1, 8)[0]
    t = 5
    flat = [p for b in _blocks(model) for p in b.parameters()]
    for objective in ("logit", "logprob"):

        def seed_at(step, direction):
            saved = [p.detach().clone() for p in flat]
            with torch.no_grad():
                for p, d in zip(flat, direction):
                    p.add_(step * d)
                try:
                    return float(_seed(model(ids[None]).logits[0, t - 1], int(ids[t]), objective))
                finally:
                    for p, v in zip(flat, saved):
                        p.copy_(v)  # bit-exact restore: the models are shared

        grads = _grads(_seed(model(ids[None]).logits[0, t - 1], int(ids[t]), objective), flat)
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
        unit = [g / norm for g in grads]

        def slope(h):
            return (seed_at(h, unit) - seed_at(-h, unit)) / (2 * h)

        h = 1e-2
        numeric = (4 * slope(h / 2) - slope(h)) / 3
        assert norm == pytest.approx(oracle(family, ids, [t], objective)["frobenius"][0], rel=1e-12)
        assert numeric == pytest.approx(norm, rel=rtol)


@pytest.mark.parametrize("objective", ["logit", "logprob"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_measure_matches_oracle(G, family, objective):
    ids = token_rows(1, 1, 9)[0]
    model = tiny(family)
    res = G.token_strengths(model, ids, objective=objective, measures=ALL_MEASURES)
    assert res.objective == objective and res.estimator == "exact"
    assert tuple(res.measures) == ALL_MEASURES or set(res.measures) == set(ALL_MEASURES)
    want = oracle_batch(family, full_rows(ids[None]), objective)
    assert_matches(res, want, ALL_MEASURES)
    assert len(res.block_names) == 2
    assert all(n.endswith(str(i)) for i, n in enumerate(res.block_names))


@pytest.mark.parametrize("family", FAMILIES)
def test_block_by_block_backward_matches_oracle(G, family, monkeypatch):
    """Long prefixes take the backward one block at a time (memory of one block's backprops,
    not all of them): forced here by a tiny budget, it must give the oracle's values."""
    import corrpo.gradients.exact as exact

    model = tiny(family)
    ids = token_rows(2, 2, 9)
    capture_blocks = len(_blocks(model))
    monkeypatch.setattr(exact, "CHUNK_ELEMENTS", 1)
    with G.capture.Capture(model, G.architecture.describe(model), list(range(capture_blocks))) as capture:
        assert exact.plan(capture, 9, None) == (1, True)
    res = G.token_strengths(model, ids, objective="logprob", measures=ALL_MEASURES, chunk_size=3)
    assert_matches(res, oracle_batch(family, full_rows(ids), "logprob"), ALL_MEASURES)


def test_objectives_differ(G):
    """logit and logprob seeds give different gradients (guards against an ignored objective)."""
    ids = token_rows(1, 1, 9)[0]
    a = G.token_strengths(tiny("llama"), ids, objective="logit")
    b = G.token_strengths(tiny("llama"), ids, objective="logprob")
    assert not np.allclose(a.l1_mean, b.l1_mean, rtol=1e-3)


def test_default_measures_and_model_untouched(G):
    model = tiny("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = token_rows(2, 1, 8)[0]
    res = G.token_strengths(model, ids)  # exact, logit
    assert tuple(res.measures) == EXACT_DEFAULT
    assert res.frobenius is None and res.logit_grad is None and res.head_logit_grad is None
    with pytest.raises(KeyError):
        res.measure("frobenius")
    assert set(res.per_block) == set(EXACT_DEFAULT)
    want = oracle_batch("qwen2", full_rows(ids[None]), "logit")
    assert_matches(res, want, EXACT_DEFAULT)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert all(p.requires_grad for p in model.parameters())


def test_array_like_input_ids(G):
    ids = token_rows(3, 2, 7)
    res = G.token_strengths(tiny("gpt2"), ids.numpy(), measures=("l1_mean",))
    want = oracle_batch("gpt2", full_rows(ids), "logit")
    assert_matches(res, want, ("l1_mean",))
    res = G.token_strengths(tiny("gpt2"), ids[0].tolist(), measures=("l1_mean",))
    assert_matches(res, oracle_batch("gpt2", full_rows(ids[:1]), "logit"), ("l1_mean",))


# ------------------------------------------------------------------ 2. batches and padding


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batch_rows_equal_rows_alone(G, family):
    ids = token_rows(4, 2, 8)
    res = G.token_strengths(tiny(family), ids, measures=ALL_MEASURES, objective="logprob")
    want = oracle_batch(family, full_rows(ids), "logprob")
    assert_matches(res, want, ALL_MEASURES)


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
def test_padding_left_and_right(G, family):
    """Row 0 left-padded by 3, row 1 right-padded by 2, row 2 unpadded: each equals itself
    alone, with positions in the padded coordinates."""
    L = 10
    raw = token_rows(5, 3, L)
    real = [raw[0, :7], raw[1, :8], raw[2]]
    ids = token_rows(6, 3, L)  # pad slots hold arbitrary tokens
    mask = torch.zeros(3, L, dtype=torch.long)
    ids[0, 3:] = real[0]
    mask[0, 3:] = 1
    ids[1, :8] = real[1]
    mask[1, :8] = 1
    ids[2] = real[2]
    mask[2] = 1
    res = G.token_strengths(tiny(family), ids, attention_mask=mask, measures=ALL_MEASURES)
    want = oracle_batch(
        family,
        [(real[0], list(range(1, 7)), 3), (real[1], list(range(1, 8)), 0), (real[2], list(range(1, L)), 0)],
        "logit",
    )
    assert_matches(res, want, ALL_MEASURES)
    np.testing.assert_array_equal(res.lengths, [6, 7, 9])


def test_padding_with_explicit_positions(G):
    L = 9
    raw = token_rows(7, 1, 6)[0]
    ids = torch.full((1, L), 5, dtype=torch.long)
    ids[0, 3:] = raw
    mask = torch.zeros(1, L, dtype=torch.long)
    mask[0, 3:] = 1
    res = G.token_strengths(tiny("gpt2"), ids, [[4, 7]], attention_mask=mask)
    want = oracle_batch("gpt2", [(raw, [1, 4], 3)], "logit")
    assert_matches(res, want, EXACT_DEFAULT)


# ------------------------------------------------------------------ 3. explicit positions


def test_positions_one_dimensional(G):
    ids = token_rows(8, 1, 10)[0]
    res = G.token_strengths(tiny("mistral"), ids, [2, 5, 9], measures=ALL_MEASURES)
    want = oracle_batch("mistral", [(ids, [2, 5, 9], 0)], "logit")
    assert_matches(res, want, ALL_MEASURES)
    np.testing.assert_array_equal(res.lengths, [3])
    np.testing.assert_array_equal(res.token_ids, ids[[2, 5, 9]].numpy())


def test_positions_per_row(G):
    ids = token_rows(9, 2, 8)
    res = G.token_strengths(tiny("neox"), ids, [[1, 4], [2, 3, 7]], measures=("nuclear_qkvo", "frobenius"))
    want = oracle_batch("neox", [(ids[0], [1, 4], 0), (ids[1], [2, 3, 7], 0)], "logit")
    assert_matches(res, want, ("nuclear_qkvo", "frobenius"))
    np.testing.assert_array_equal(res.rows, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(res.lengths, [2, 3])


def test_positions_unsorted_come_back_ascending(G):
    ids = token_rows(10, 1, 10)[0]
    res = G.token_strengths(tiny("llama"), ids, [7, 2, 4], measures=("l1_mean",))
    want = oracle_batch("llama", [(ids, [2, 4, 7], 0)], "logit")
    assert_matches(res, want, ("l1_mean",))


def test_empty_positions_row(G):
    ids = token_rows(11, 2, 6)
    res = G.token_strengths(tiny("llama"), ids, [[], [3]], measures=("l1_mean",))
    np.testing.assert_array_equal(res.lengths, [0, 1])
    np.testing.assert_array_equal(res.rows, [1])
    want = oracle("llama", ids[1], [3], "logit")
    np.testing.assert_allclose(res.l1_mean, want["l1_mean"], rtol=RTOL)


# ------------------------------------------------------------------ 4. chunking invariance


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_chunk_size_invariance(G, family):
    ids = token_rows(12, 2, 9)
    results = [
        G.token_strengths(tiny(family), ids, measures=ALL_MEASURES, objective="logprob", chunk_size=c)
        for c in (1, 3, 64)
    ]
    ref = results[0]
    for other in results[1:]:
        np.testing.assert_array_equal(other.positions, ref.positions)
        for m in ALL_MEASURES + ("entropy_bits",):
            np.testing.assert_allclose(getattr(other, m), getattr(ref, m), rtol=1e-10, atol=1e-13, err_msg=m)
        for m in PARAMETER_MEASURES:
            np.testing.assert_allclose(other.per_block[m], ref.per_block[m], rtol=1e-10, atol=1e-13, err_msg=m)
    assert_matches(ref, oracle_batch(family, full_rows(ids), "logprob"), ALL_MEASURES)


def test_progress_counts_every_token(G):
    ids = token_rows(23, 2, 7)
    seen = []
    res = G.token_strengths(tiny("llama"), ids, chunk_size=4, progress=seen.append)
    assert sum(seen) == len(res) == 12 and all(n > 0 for n in seen)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_float32_model_close_to_float64_oracle(G, family):
    """The same weights in float32: every measure within float32 accuracy of the float64
    oracle (observed ~1e-6; the per-token norms are accumulated without catastrophic loss)."""
    import copy

    model = copy.deepcopy(tiny(family)).float()
    ids = token_rows(24, 1, 10)[0]
    res = G.token_strengths(model, ids, measures=ALL_MEASURES, objective="logprob")
    want = oracle_batch(family, full_rows(ids[None]), "logprob")
    assert_matches(res, want, ALL_MEASURES, rtol=3e-5)


# ------------------------------------------------------------------ 5. subsample


def test_subsample(G):
    ids = token_rows(13, 2, 12)
    model = tiny("llama")
    a = G.token_strengths(model, ids, estimator="subsample", k=3, seed=0)
    b = G.token_strengths(model, ids, estimator="subsample", k=3, seed=0)
    assert a.estimator == "subsample" and tuple(a.measures) == EXACT_DEFAULT
    np.testing.assert_array_equal(a.lengths, [3, 3])
    np.testing.assert_array_equal(a.rows, [0, 0, 0, 1, 1, 1])
    for r in (0, 1):
        p = a.positions[a.rows == r]
        assert np.all(np.diff(p) > 0) and p.min() >= 1 and p.max() <= 11
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.l1_mean, b.l1_mean)
    others = [G.token_strengths(model, ids, estimator="subsample", k=3, seed=s).positions for s in (1, 2, 3, 4)]
    assert any(not np.array_equal(o, a.positions) for o in others)
    # values equal the exact ones at the chosen positions
    rows = [(ids[r], a.positions[a.rows == r].tolist(), 0) for r in (0, 1)]
    assert_matches(a, oracle_batch("llama", rows, "logit"), EXACT_DEFAULT)


def test_subsample_short_row_keeps_all(G):
    ids = token_rows(14, 1, 4)[0]
    res = G.token_strengths(tiny("gpt2"), ids, estimator="subsample", k=10, seed=3, measures=ALL_MEASURES)
    assert_matches(res, oracle_batch("gpt2", full_rows(ids[None]), "logit"), ALL_MEASURES)


# ------------------------------------------------------------------ 6. jvp


def test_jvp_converges_to_exact_frobenius(G):
    ids = token_rows(15, 2, 12)
    model = tiny("llama")
    exact = oracle_batch("llama", full_rows(ids), "logit")["frobenius"]

    def rel_error(k, seed):
        res = G.token_strengths(model, ids, estimator="jvp", k=k, seed=seed)
        assert res.estimator == "jvp" and tuple(res.measures) == ("frobenius",)
        assert res.l1_mean is None and res.nuclear_qkvo is None
        f = res.frobenius
        assert f.shape == exact.shape and np.all(np.isfinite(f)) and np.all(f >= 0)
        np.testing.assert_allclose(res.entropy_bits, oracle_batch("llama", full_rows(ids), "logit")["entropy_bits"],
                                   rtol=RTOL)
        return f, float(np.mean(np.abs(f - exact) / exact))

    small = np.mean([rel_error(4, s)[1] for s in (0, 1, 2)])
    big_f, big = rel_error(256, 0)
    assert big < 0.15, big
    assert small > 2 * big, (small, big)
    rho = scipy_stats.spearmanr(big_f, exact).statistic
    assert rho > 0.8, rho
    # same seed, same estimate; another seed, another
    np.testing.assert_array_equal(rel_error(4, 0)[0], rel_error(4, 0)[0])
    assert not np.array_equal(rel_error(4, 0)[0], rel_error(4, 1)[0])


def test_jvp_is_unbiased_for_the_square(G):
    """With only k = 2 directions per call, averaging frobenius^2 over 256 seeds approaches the
    exact squared norm (a 1/(k+c) or 1/(k-1) normalisation would be off by 2x)."""
    ids = token_rows(16, 1, 7)[0]
    model = tiny("gpt2")
    exact2 = oracle_batch("gpt2", full_rows(ids[None]), "logit")["frobenius"] ** 2
    est2 = np.mean([G.token_strengths(model, ids, estimator="jvp", k=2, seed=s).frobenius ** 2 for s in range(256)], 0)
    ratio = est2 / exact2
    # 512 directions in all; observed spread of the mean ratio over seed sets is ~0.03
    assert abs(np.mean(ratio) - 1) < 0.12, ratio
    assert np.all(np.abs(ratio - 1) < 0.35), ratio


def test_jvp_cauchy_estimate_of_l1_converges(G):
    """Cauchy directions (1-stable): the median of |J v| over k directions estimates the L1
    norm of the whole block gradient, so l1_mean (that over the number of blocks) converges
    to the oracle's as k grows."""
    ids = token_rows(23, 1, 10)[0]
    model = tiny("llama")
    exact = oracle_batch("llama", full_rows(ids[None]), "logit")["l1_mean"]

    def rel_error(k: int, seed: int) -> tuple[np.ndarray, float]:
        res = G.token_strengths(model, ids, estimator="jvp", k=k, seed=seed, measures=("l1_mean",))
        assert res.frobenius is None and res.per_block == {}
        return res.l1_mean, float(np.mean(np.abs(res.l1_mean - exact) / exact))

    small = np.mean([rel_error(8, s)[1] for s in (0, 1, 2)])
    big_l1, big = rel_error(1024, 0)
    assert big < 0.12, big  # median of 1024 Cauchy draws: about 5% relative spread
    assert small > 2 * big, (small, big)
    assert scipy_stats.spearmanr(big_l1, exact).statistic > 0.8


def test_jvp_with_logit_measures(G):
    ids = token_rows(17, 1, 7)[0]
    res = G.token_strengths(tiny("llama"), ids, estimator="jvp", k=8, measures=("frobenius", "head_logit_grad"))
    want = oracle_batch("llama", full_rows(ids[None]), "logit")
    np.testing.assert_allclose(res.head_logit_grad, want["head_logit_grad"], rtol=RTOL)
    assert res.frobenius.shape == (6,) and np.all(res.frobenius > 0)


# ------------------------------------------------------------------ 7. last_block, logit_grad


def test_last_block(G):
    ids = token_rows(18, 2, 8)
    res = G.token_strengths(tiny("qwen2"), ids, estimator="last_block")
    assert res.estimator == "last_block"
    assert tuple(res.measures) == ("l1_mean", "nuclear_qkvo", "frobenius")
    want = oracle_batch("qwen2", full_rows(ids), "logit")
    np.testing.assert_array_equal(res.positions, want["positions"])
    np.testing.assert_array_equal(res.rows, want["rows"])
    np.testing.assert_array_equal(res.lengths, [7, 7])
    np.testing.assert_allclose(res.entropy_bits, want["entropy_bits"], rtol=RTOL)
    for m in res.measures:
        v = res.measure(m)
        assert v.shape == (14,) and v.dtype == np.float64 and np.all(np.isfinite(v)) and np.all(v >= 0), m
        assert np.any(v > 0), m
        if m in res.per_block:
            pb = np.asarray(res.per_block[m])
            assert pb.shape[0] == 14 and np.all(np.isfinite(pb)) and np.all(pb >= 0), m


@pytest.mark.parametrize("objective", ["logit", "logprob"])
def test_last_block_rank_one_terms(G, objective):
    """last_block's values against plain autograd: one backward of the summed seeds; for
    every nn.Linear W of the top block and token t, with j = t - 1, the row-j term of W's
    gradient g_j a_j^T has L1 |g_j|_1 |a_j|_1 and nuclear and Frobenius norm |g_j| |a_j|."""
    model = tiny("llama")
    ids = token_rows(24, 1, 9)[0]
    top = _blocks(model)[-1]
    linears = {name: m for name, m in top.named_modules() if isinstance(m, nn.Linear)}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0].detach(), o)))
             for n, m in linears.items()]
    try:
        logits = model(ids[None]).logits[0]
    finally:
        for h in hooks:
            h.remove()
    t = torch.arange(1, len(ids))
    seeds = torch.stack([_seed(logits[j - 1], int(ids[j]), objective) for j in t.tolist()])
    names = list(linears)
    grads = torch.autograd.grad(seeds.sum(), [seen[n][1] for n in names])
    l1 = np.zeros(len(t))
    sq = np.zeros(len(t))
    nuclear = np.zeros(len(t))
    for n, g in zip(names, grads):
        a, g = seen[n][0][0, t - 1], g[0, t - 1]
        l1 += (g.abs().sum(1) * a.abs().sum(1)).numpy()
        sq += (g.square().sum(1) * a.square().sum(1)).numpy()
        if n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj"):
            nuclear += (g.norm(dim=1) * a.norm(dim=1)).numpy()
    res = G.token_strengths(model, ids, estimator="last_block", objective=objective)
    np.testing.assert_allclose(res.l1_mean, l1, rtol=RTOL)
    np.testing.assert_allclose(res.nuclear_qkvo, nuclear, rtol=RTOL)
    np.testing.assert_allclose(res.frobenius, np.sqrt(sq), rtol=RTOL)
    assert res.block_names == (res.block_names[-1],) and res.per_block["l1_mean"].shape == (len(t), 1)


def test_logit_grad_estimator(G):
    ids = token_rows(19, 2, 8)
    for family in ("gemma", "neox"):
        for objective in ("logit", "logprob"):
            res = G.token_strengths(tiny(family), ids, estimator="logit_grad", objective=objective)
            assert tuple(res.measures) == ("logit_grad", "head_logit_grad")
            assert res.l1_mean is None and res.nuclear_qkvo is None and res.frobenius is None
            want = oracle_batch(family, full_rows(ids), "logit")
            assert_matches(res, want, ("logit_grad", "head_logit_grad"))


# ------------------------------------------------------------------ 8. errors


class _OddBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.ModuleDict({n: nn.Linear(HIDDEN, HIDDEN) for n in ("wq", "wk", "wv", "wo")})
        self.norm = nn.LayerNorm(HIDDEN)

    def forward(self, x):
        a = self.attention
        scores = (a["wq"](x) @ a["wk"](x).transpose(-1, -2)) / math.sqrt(HIDDEN)
        causal = torch.ones(x.shape[-2], x.shape[-2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        return x + a["wo"](torch.softmax(scores, -1) @ a["wv"](self.norm(x)))


class _OddLM(nn.Module):
    """A causal LM whose blocks hold wq/wk/wv/wo instead of any recognised projection; with
    ``in_list=False`` its blocks are not in a list at all."""

    def __init__(self, in_list=True):
        super().__init__()
        torch.manual_seed(0)
        self.config = transformers.PretrainedConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
                                                    num_attention_heads=HEADS)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        if in_list:
            self.model.layers = nn.ModuleList([_OddBlock(), _OddBlock()])
        else:
            self.model.first = nn.Linear(HIDDEN, HIDDEN)
            self.model.second = nn.Linear(HIDDEN, HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.in_list = in_list

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, **kwargs):
        x = self.model.embed_tokens(input_ids)
        if self.in_list:
            for block in self.model.layers:
                x = block(x)
        else:
            x = torch.tanh(self.model.second(torch.tanh(self.model.first(x))))
        return SimpleNamespace(logits=self.lm_head(x), hidden_states=(x,) if output_hidden_states else None)


def test_unknown_architecture_names_what_was_looked_for(G):
    ids = token_rows(20, 1, 6)[0]
    with pytest.raises(G.ArchitectureError) as info:
        G.token_strengths(_OddLM().double(), ids)
    assert isinstance(info.value, corrpo.CorrpoError)
    assert "q_proj" in str(info.value)
    with pytest.raises(G.ArchitectureError) as info:
        G.token_strengths(_OddLM(in_list=False).double(), ids, measures=("l1_mean",))
    message = str(info.value).lower()
    assert "block" in message or "layers" in message, message


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(objective="prob"),
        dict(estimator="hutchinson"),
        dict(measures=("l2",)),
        dict(measures=("l1_mean", "entropy")),
        dict(estimator="jvp", measures=("nuclear_qkvo",)),
        dict(estimator="last_block", k=4),
        dict(estimator="logit_grad", measures=("frobenius",)),
        dict(chunk_size=0),
        dict(positions=[0, 2]),
        dict(positions=[2, 8]),
        dict(positions=[-1]),
    ],
)
def test_bad_settings_raise_config_error(G, kwargs):
    ids = token_rows(21, 1, 8)[0]
    with pytest.raises(corrpo.ConfigError):
        G.token_strengths(tiny("llama"), ids, **kwargs)


def test_shape_errors(G):
    ids = token_rows(22, 2, 8)
    model = tiny("llama")
    with pytest.raises(corrpo.ShapeError):
        G.token_strengths(model, ids, attention_mask=torch.ones(2, 7, dtype=torch.long))
    with pytest.raises((corrpo.ShapeError, corrpo.ConfigError)):
        G.token_strengths(model, ids, [[1, 2]])  # one list for two rows
    with pytest.raises((corrpo.ShapeError, corrpo.ConfigError)):
        G.token_strengths(model, ids, [[1, 2], [3, 8]])  # t >= L in the second row
    assert issubclass(corrpo.ConfigError, ValueError) and issubclass(corrpo.ShapeError, ValueError)
