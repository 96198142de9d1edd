"""SGLang ``/generate`` responses as corrpo payloads (``corrpo.integrations.sglang``): the
response recorded in SGLang 0.5.23's format, synthetic responses made from known
distributions (their top-k bounds must contain the exact H and G), the n-samples list, an
SSE stream, and the errors. Scored through a real server process."""

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
