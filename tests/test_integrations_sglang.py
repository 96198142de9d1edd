"""SGLang ``/generate`` responses as corrpo payloads (``corrpo.integrations.sglang``): the
response recorded in SGLang 0.5.23's format, synthetic responses made from known
distributions (their top-k bounds must contain the exact H and G), the n-samples list, an
SSE stream, and the errors. Scored through a real server process. Also a response recorded
from a real SGLang 0.5.23 engine with corrpo's plugin on, and the plugin's two reductions
(corrpo's Triton kernel, its native core) against float64. The live engine's tests are in
test_integrations_sglang_engine.py (they need .venv-sglang)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import corrpo
from corrpo.integrations.sglang import parse_generate, parse_sse

# A non-streaming /generate response (top_logprobs_num 5, return_text_in_logprobs), as
# recorded for ../shared/research/sglang.md section 6.
RECORDED = json.loads("""
{
  "text": " Paris. The",
  "output_ids": [12095, 13, 576],
  "meta_info": {
    "id": "3f1c9a2e8b7d4c0e9a6b5d4c3b2a1f00",
    "finish_reason": {"type": "length", "length": 3},
    "prompt_tokens": 5,
    "weight_version": "default",
    "num_retractions": 0,
    "input_token_logprobs": [],
    "output_token_logprobs": [[-0.12030000239610672, 12095, " Paris"], [-0.44179999828338623, 13, "."], [-1.2264000177383423, 576, " The"]],
    "output_token_logprobs_length": 3,
    "input_top_logprobs": [],
    "output_top_logprobs": [
      [[-0.12030000239610672, 12095, " Paris"], [-2.6930999755859375, 264, " a"], [-4.051199913024902, 279, " the"], [-4.887599945068359, 7407, " located"], [-5.431000232696533, 6722, " known"]],
      [[-0.44179999828338623, 13, "."], [-1.2107000350952148, 11, ","], [-3.3050999641418457, 624, ".\\n"], [-4.496300220489502, 323, " and"], [-4.907199859619141, 320, " ("]],
      [[-1.0377999544143677, 1084, " It"], [-1.2264000177383423, 576, " The"], [-1.9903000593185425, 4710, "\\n\\n"], [-2.6630001068115234, 198, "\\n"], [-3.321700096130371, 12095, " Paris"]]
    ],
    "reasoning_tokens": 0,
    "completion_tokens": 3,
    "cached_tokens": 0,
    "weight_versions": [{"version": "default", "start": 0, "end": 3}],
    "e2e_latency": 0.0841
  }
}
""")
VOCAB = 64

# n=2 samples of one prompt from SGLang 0.5.23 (CPU engine, float32, the tiny Llama of
# corrpo.testing.build_tiny_model, vocabulary 25) with CORRPO_SGLANG_STATS=1, temperature 1,
# top_logprobs_num 3: the plugin's keys beside SGLang's own.
RECORDED_PLUGIN = json.loads("""
[
 {"text": " what the mat make", "output_ids": [24, 4, 2, 18, 17], "meta_info": {
  "id": "fbaccedd47284d4aae232ffdfb870cf6",
  "finish_reason": {"type": "length", "length": 5},
  "prompt_tokens": 3,
  "weight_version": "default",
  "num_retractions": 0,
  "input_token_logprobs": [],
  "output_token_logprobs": [[-4.063697338104248, 24, null], [-3.1849825382232666, 4, null], [-3.1146297454833984, 2, null], [-2.9316952228546143, 18, null], [-1.7274638414382935, 17, null]],
  "output_token_logprobs_length": 5,
  "input_top_logprobs": [],
  "output_top_logprobs": [[[-1.8993436098098755, 8, null], [-1.951314091682434, 4, null], [-2.1026744842529297, 23, null]], [[-1.9143096208572388, 2, null], [-1.9459460973739624, 12, null], [-2.5071702003479004, 13, null]], [[-1.699540138244629, 13, null], [-1.8392353057861328, 8, null], [-2.402989149093628, 20, null]], [[-1.5045138597488403, 4, null], [-2.479543685913086, 8, null], [-2.5495996475219727, 24, null]], [[-1.7274638414382935, 17, null], [-1.7765076160430908, 21, null], [-2.1214382648468018, 1, null]]],
  "reasoning_tokens": 0,
  "completion_tokens": 5,
  "cached_tokens": 2,
  "weight_versions": [{"version": "default", "start": 0, "end": 5}],
  "cached_tokens_details": {"device": 2, "host": 0},
  "corrpo_entropy": [2.684246778488159, 2.886610269546509, 2.775747776031494, 2.769803762435913, 2.6811697483062744],
  "corrpo_grad_norm": [1.0272034406661987, 0.9952245950698853, 0.9996077418327332, 0.9911059737205505, 0.8604094386100769],
  "corrpo_logprob": [-4.063697338104248, -3.1849825382232666, -3.1146297454833984, -2.931694984436035, -1.7274638414382935],
  "dp_rank": null,
  "e2e_latency": 0.02254090300266398,
  "response_sent_to_client_ts": 1795770755.1319742
 }},
 {"text": " plus what and dog and", "output_ids": [8, 24, 12, 14, 12], "meta_info": {
  "id": "7fbd83459f3c4a3cb942c16a3d66c9f2",
  "finish_reason": {"type": "length", "length": 5},
  "prompt_tokens": 3,
  "weight_version": "default",
  "num_retractions": 0,
  "input_token_logprobs": [],
  "output_token_logprobs": [[-1.8993436098098755, 8, null], [-3.438732147216797, 24, null], [-1.9031555652618408, 12, null], [-2.2335686683654785, 14, null], [-0.5947809219360352, 12, null]],
  "output_token_logprobs_length": 5,
  "input_top_logprobs": [],
  "output_top_logprobs": [[[-1.8993436098098755, 8, null], [-1.951314091682434, 4, null], [-2.1026744842529297, 23, null]], [[-0.9264593720436096, 4, null], [-2.3659005165100098, 17, null], [-2.482672929763794, 0, null]], [[-1.9031555652618408, 12, null], [-2.116014003753662, 23, null], [-2.1337456703186035, 21, null]], [[-2.0988831520080566, 13, null], [-2.1033310890197754, 15, null], [-2.2335686683654785, 14, null]], [[-0.5947809219360352, 12, null], [-2.7196428775787354, 11, null], [-2.7414093017578125, 20, null]]],
  "reasoning_tokens": 0,
  "completion_tokens": 5,
  "cached_tokens": 2,
  "weight_versions": [{"version": "default", "start": 0, "end": 5}],
  "cached_tokens_details": {"device": 2, "host": 0},
  "corrpo_entropy": [2.684246778488159, 2.4083986282348633, 2.811868906021118, 2.7843587398529053, 1.9570355415344238],
  "corrpo_grad_norm": [0.8889228701591492, 1.057922124862671, 0.8827612996101379, 0.9293387532234192, 0.4650753438472748],
  "corrpo_logprob": [-1.899343490600586, -3.438732147216797, -1.9031554460525513, -2.2335686683654785, -0.5947808623313904],
  "dp_rank": null,
  "e2e_latency": 0.022411588997783838,
  "response_sent_to_client_ts": 1795770755.131991
 }}
]

""")
RECORDED_PLUGIN_VOCAB = 25


def synthetic(rng: np.random.Generator, length: int, k: int = 5, text: bool = False) -> tuple[dict, np.ndarray, np.ndarray]:
    """A /generate output sampled from known random distributions over VOCAB tokens, in
    SGLang's format; also the exact float64 H and G of every token."""
    ids, entries, tops, h, g = [], [], [], [], []
    for _ in range(length):
        z = rng.standard_normal(VOCAB) * 2.5
        logp = z - np.logaddexp.reduce(z)
        p = np.exp(logp)
        y = int(rng.choice(VOCAB, p=p))
        order = np.argsort(-logp)[:k]
        label = (lambda t: f"t{t}") if text else (lambda t: None)
        ids.append(y)
        entries.append([float(logp[y]), y, label(y)])
        tops.append([[float(logp[t]), int(t), label(t)] for t in order])
        h.append(-(p * logp).sum())
        g.append(math.sqrt(max(0.0, 1 - 2 * p[y] + (p * p).sum())))
    item = {
        "text": "",
        "output_ids": ids,
        "meta_info": {
            "finish_reason": {"type": "length", "length": length},
            "weight_version": "default",
            "output_token_logprobs": entries,
            "output_top_logprobs": tops,
        },
    }
    return item, np.array(h), np.array(g)


def test_the_recorded_response_parses_to_its_values():
    r = parse_generate(RECORDED)
    assert len(r) == 1 and r.group_sizes == [1]
    np.testing.assert_array_equal(r.output_ids[0], [12095, 13, 576])
    np.testing.assert_array_equal(r.logprob[0], [-0.12030000239610672, -0.44179999828338623, -1.2264000177383423])
    assert r.top_logprobs[0].shape == (3, 5) and r.top_token_ids[0][2].tolist() == [1084, 576, 4710, 198, 12095]
    assert r.finish_reasons == [{"type": "length", "length": 3}] and r.weight_versions == ["default"]
    # The sampled third token is not the top-1: the top-k bounds still hold it.
    stats = corrpo.top_k_stats(r.top_logprobs[0], r.top_token_ids[0], r.logprob[0], r.output_ids[0], 151936)
    assert (stats.entropy_lower <= stats.entropy_upper).all() and (stats.grad_norm_lower <= stats.grad_norm_upper).all()


def test_n_samples_through_a_server_bound_the_exact_statistics(client, rng):
    """Two prompts x n=3 samples of known distributions: the server's top-k figures equal
    corrpo's in-process ones, and the bounds contain the exact H and G."""
    made = [synthetic(rng, int(rng.integers(9, 20)), text=bool(i % 2)) for i in range(6)]
    rollouts = parse_generate([m[0] for m in made], n=3)
    assert rollouts.group_sizes == [3, 3]
    rewards = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    scores = client.score(**rollouts.top_k_payload(VOCAB), rewards=rewards)
    h_est, g_est, lengths = [], [], []
    for i, (_, h, g) in enumerate(made):
        stats = corrpo.top_k_stats(
            rollouts.top_logprobs[i], rollouts.top_token_ids[i], rollouts.logprob[i], rollouts.output_ids[i], VOCAB
        )
        assert (stats.entropy_lower <= h + 1e-6).all() and (h <= stats.entropy_upper + 1e-6).all()
        assert (stats.grad_norm_lower <= g + 1e-6).all() and (g <= stats.grad_norm_upper + 1e-6).all()
        e, s = stats.estimate("concentrated_tail")
        h_est.append(e)
        g_est.append(s)
        lengths.append(len(h))
        np.testing.assert_allclose(scores.top_k.entropy_mean_lower[i], stats.entropy_lower.mean(), rtol=1e-5)
    want = corrpo.score(
        np.concatenate(h_est), np.concatenate(g_est), lengths, [3, 3], rewards=rewards,
        token_ids=np.concatenate(rollouts.output_ids), config=corrpo.ScoreConfig().resolve({"top_k"}),
    )  # fmt: skip
    np.testing.assert_allclose(scores.rho, want.rho, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores.advantages, want.advantages, rtol=1e-4, atol=1e-5)
    assert (scores.config.measure, scores.config.estimator) == ("logit_grad", "top_k")


def test_tokens_payload_repeats_each_prompt_for_its_samples(rng):
    rollouts = parse_generate([synthetic(rng, 4)[0] for _ in range(4)], n=2)
    payload = rollouts.tokens_payload([[1, 2], [3]])
    assert [p.tolist() for p in payload["prompt_ids"]] == [[1, 2], [1, 2], [3], [3]]
    assert payload["group_sizes"] == [2, 2] and payload["token_ids"] is rollouts.output_ids
    assert [p.tolist() for p in rollouts.tokens_payload([[1], [2], [3], [4]])["prompt_ids"]] == [[1], [2], [3], [4]]
    with pytest.raises(corrpo.ShapeError, match="3 prompts for 4 rollouts"):
        rollouts.tokens_payload([[1], [2], [3]])


def test_a_streamed_response_gives_each_output_its_last_event(rng):
    a, b = synthetic(rng, 5)[0], synthetic(rng, 7)[0]

    def cut(item: dict, t: int, index: int) -> dict:
        meta = {**item["meta_info"], "output_token_logprobs": item["meta_info"]["output_token_logprobs"][:t],
                "output_top_logprobs": item["meta_info"]["output_top_logprobs"][:t]}  # fmt: skip
        return {"index": index, "output_ids": item["output_ids"][:t], "meta_info": meta}

    events = [cut(a, 2, 0), cut(b, 3, 1), cut(b, 7, 1), cut(a, 5, 0)]
    text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    final = parse_sse(text)
    assert [e["index"] for e in final] == [0, 1]
    r = parse_generate(final, n=2)
    assert [x.tolist() for x in r.output_ids] == [a["output_ids"], b["output_ids"]]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda item: item["meta_info"]["output_top_logprobs"].__setitem__(1, None), "token 1 has none"),
        (lambda item: item["output_ids"].__setitem__(0, 7), "output_token_logprobs name other tokens"),
        (lambda item: item["meta_info"]["output_top_logprobs"].pop(), "rows of output_top_logprobs for"),
        (lambda item: item.pop("meta_info"), "not a /generate output"),
    ],
)
def test_malformed_responses_are_refused_with_the_reason(change, message):
    item = json.loads(json.dumps(RECORDED))
    change(item)
    with pytest.raises(corrpo.ShapeError, match=message):
        parse_generate(item)


def test_groups_must_divide_and_logprobs_must_be_asked_for(rng):
    with pytest.raises(corrpo.ShapeError, match="do not split into groups of n=2"):
        parse_generate([RECORDED] * 3, n=2)
    bare = {"output_ids": [1, 2], "meta_info": {"finish_reason": None}}
    r = parse_generate(bare)
    assert r.logprob is None and r.top_logprobs is None
    with pytest.raises(ValueError, match="request return_logprob=True and top_logprobs_num > 0"):
        r.top_k_payload(VOCAB)


def test_a_recorded_plugin_response_scores_its_exact_statistics(client):
    """The plugin's H and G lie inside the top-k bounds SGLang's own logprobs give for the
    same tokens, its log p is SGLang's (temperature 1), and the stats payload scores as
    corrpo does in-process."""
    r = parse_generate(RECORDED_PLUGIN, n=2)
    assert r.group_sizes == [2] and [len(h) for h in r.entropy] == [5, 5]
    np.testing.assert_allclose(r.entropy[1], RECORDED_PLUGIN[1]["meta_info"]["corrpo_entropy"])
    for i in range(2):
        np.testing.assert_allclose(r.policy_logprob[i], r.logprob[i], atol=1e-6)
        b = corrpo.top_k_stats(r.top_logprobs[i], r.top_token_ids[i], r.logprob[i], r.output_ids[i], RECORDED_PLUGIN_VOCAB)
        assert (b.entropy_lower <= r.entropy[i] + 1e-5).all() and (r.entropy[i] <= b.entropy_upper + 1e-5).all()
        assert (b.grad_norm_lower <= r.grad_norm[i] + 1e-5).all() and (r.grad_norm[i] <= b.grad_norm_upper + 1e-5).all()
    scores = client.score(**r.stats_payload(), rewards=[1.0, 0.0], min_tokens=3)
    want = corrpo.score(
        np.concatenate(r.entropy), np.concatenate(r.grad_norm), [5, 5], [2], rewards=[1.0, 0.0],
        token_ids=np.concatenate(r.output_ids), config=corrpo.ScoreConfig(min_tokens=3),
    )  # fmt: skip
    np.testing.assert_allclose(scores.rho, want.rho, rtol=1e-5)
    np.testing.assert_allclose(scores.rewards, want.rewards, rtol=1e-5)
    np.testing.assert_allclose(scores.advantages, want.advantages, rtol=1e-4, atol=1e-6)


def test_plugin_statistics_must_be_whole_and_present_to_be_sent():
    bare = parse_generate(RECORDED)
    assert bare.entropy is None
    with pytest.raises(ValueError, match="CORRPO_SGLANG_STATS=1"):
        bare.stats_payload()
    item = json.loads(json.dumps(RECORDED_PLUGIN[0]))
    item["meta_info"]["corrpo_grad_norm"][2] = None  # SGLang writes the plugin's NaN as null
    faulty = parse_generate(item)
    assert np.isnan(faulty.grad_norm[0][2])
    with pytest.raises(corrpo.InvalidValueError, match="rollout 0, token 2: corrpo's plugin found no finite statistics"):
        faulty.stats_payload()
    item["meta_info"]["corrpo_entropy"].pop()
    with pytest.raises(corrpo.ShapeError, match=r"meta_info\['corrpo_entropy'\] must hold one value per output token \(5\), got 4"):
        parse_generate(item)
    del item["meta_info"]["corrpo_entropy"]
    with pytest.raises(corrpo.ShapeError, match="meta_info has only some of corrpo_entropy"):
        parse_generate(item)
    plain = json.loads(json.dumps(RECORDED_PLUGIN[1]))
    for key in ("corrpo_entropy", "corrpo_grad_norm", "corrpo_logprob"):
        del plain["meta_info"][key]
    with pytest.raises(corrpo.ShapeError, match="some outputs carry corrpo statistics and others do not"):
        parse_generate([RECORDED_PLUGIN[0], plain], n=2)


def test_the_plugins_reductions_equal_float64(rng):
    """What the plugin computes inside SGLang, on a GPU (corrpo's Triton kernel; here Triton's
    CPU interpreter unless a GPU is present) and on a CPU (the native core): [3, rows] of
    H, G and log p, NaN only in a faulty row, against float64 NumPy."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("corrpo_kernels")
    from corrpo.integrations.sglang_plugin import kernel_stats, native_stats

    logits = rng.standard_normal((6, 50)).astype(np.float32) * 4
    logits[1, 10:20] = -np.inf  # masked vocabulary (penalties, padding)
    ids = np.array([3, 2, 49, 0, 7, 11])
    z = logits.astype(np.float64)
    logp = z - np.logaddexp.reduce(z, axis=1, keepdims=True)
    p = np.exp(logp)
    onehot = np.eye(50)[ids]
    want = np.stack([
        -(p * np.nan_to_num(logp, neginf=0.0)).sum(1), np.linalg.norm(p - onehot, axis=1), logp[np.arange(6), ids],
    ])  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for reduce, where in ((native_stats, "cpu"), (kernel_stats, device)):
        got = reduce(torch.from_numpy(logits).to(where), torch.from_numpy(ids).to(where)).cpu().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=reduce.__name__)
        bad = logits.copy()
        bad[4, 5] = np.nan
        got = reduce(torch.from_numpy(bad).to(where), torch.from_numpy(ids).to(where)).cpu().numpy()
        assert np.isnan(got[:, 4]).all() and not np.isnan(np.delete(got, 4, axis=1)).any(), reduce.__name__
