"""corrpo against a real SGLang engine (sglang 0.5.23, as tests/sglang_engine/setup.sh pins
it), serving a tiny random Llama that the module builds, with corrpo's plugin enabled:
``/generate`` responses parsed by ``corrpo.integrations.sglang`` and scored by a real
corrpo-server, and every value checked against an independent float64 forward pass of the
same model in Hugging Face transformers.

Runs in .venv-sglang (``make test-integrations``); skipped in any environment without
sglang. Without a GPU the engine runs on the CPU with a stub of ``sgl_kernel`` (see
tests/sglang_engine/stub_sgl_kernel.py: the PyPI wheel of its kernels only loads with
CUDA); on a GPU it runs as shipped. One engine serves the whole module (about two minutes
to start on two CPU cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sglang", reason="needs SGLang: run it in .venv-sglang (make test-integrations)")
torch = pytest.importorskip("torch")

import corrpo  # noqa: E402
from corrpo.integrations.sglang import parse_generate, parse_sse  # noqa: E402
from corrpo.integrations.sglang_server import SGLangServer  # noqa: E402
from corrpo.testing import build_tiny_model  # noqa: E402

PROMPTS = [[4, 5, 6], [7, 8]]
# Frequent enough under the tiny model that some rollouts stop early (and SGLang trims them).
STOP = [9, 22]
# SGLang's float32 engine against float64 transformers on the same weights (measured
# differences are about 1e-6); a token off by one position differs by 0.1 or more.
ATOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sglang") / "tiny"
    build_tiny_model(path)
    return path


@pytest.fixture(scope="module")
def engine(model_dir):
    stub = None
    if not torch.cuda.is_available():
        stub = Path(sys.prefix) / "sgl-kernel-cpu-stub"
        if not stub.is_dir():
            pytest.fail(f"no CPU stub of sgl_kernel at {stub}: run tests/sglang_engine/setup.sh")
    args = ["--dtype", "float32", "--max-total-tokens", "4096", "--mem-fraction-static", "0.05", "--sleep-on-idle"]
    # One OpenMP thread for the CPU engine (the machine is shared); ignored on a GPU.
    env = {"CORRPO_SGLANG_STATS": "1", "SGLANG_CPU_OMP_THREADS_BIND": "0"}
    with SGLangServer(model_dir, *args, env=env, cpu_stub=stub) as server:
        yield server


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()


def reference(hf, prompt: list[int], output: np.ndarray, temperature: float = 1.0) -> dict[str, np.ndarray]:
    """float64 H, G = ||p - e_y|| and log p_y of each output token of softmax(z / T), and
    the full log-probabilities, from one forward pass over prompt + output."""
    ids = torch.tensor([list(prompt) + [int(t) for t in output]])
    with torch.no_grad():
        z = hf(ids).logits[0, len(prompt) - 1 : -1] / temperature
    logp = z.log_softmax(-1)
    p = logp.exp()
    y = torch.as_tensor(output)
    return {
        "entropy": (-(p * logp).sum(-1)).numpy(),
        "grad_norm": (p - torch.nn.functional.one_hot(y, p.shape[1])).norm(dim=-1).numpy(),
        "logprob": logp[torch.arange(len(y)), y].numpy(),
        "logp": logp.numpy(),
    }


def vocab(hf) -> int:
    return hf.config.vocab_size


def test_n_samples_with_top_k_score_through_a_corrpo_server(engine, hf, client):
    """Two prompts x n=4 with top-5 logprobs: prompt-major groups of 4 whose logprobs and
    top-k rows are the model's; the server's top-k scores equal corrpo's in-process ones."""
    response = engine.generate(
        input_ids=PROMPTS, sampling_params={"n": 4, "temperature": 1.0, "max_new_tokens": 12, "stop_token_ids": STOP},
        return_logprob=True, top_logprobs_num=5,
    )  # fmt: skip
    rollouts = parse_generate(response, n=4)
    assert len(rollouts) == 8 and rollouts.group_sizes == [4, 4]
    for i in range(8):
        ref = reference(hf, PROMPTS[i // 4], rollouts.output_ids[i])
        np.testing.assert_allclose(rollouts.logprob[i], ref["logprob"], atol=ATOL)
        np.testing.assert_allclose(rollouts.top_logprobs[i], -np.sort(-ref["logp"], axis=1)[:, :5], atol=ATOL)
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    scores = client.score(**rollouts.top_k_payload(vocab(hf)), rewards=rewards, min_tokens=2)
    h, g = [], []
    for i in range(8):
        stats = corrpo.top_k_stats(
            rollouts.top_logprobs[i], rollouts.top_token_ids[i], rollouts.logprob[i], rollouts.output_ids[i], vocab(hf)
        )
        e, s = stats.estimate("concentrated_tail")
        h.append(e)
        g.append(s)
    want = corrpo.score(
        np.concatenate(h), np.concatenate(g), [len(x) for x in rollouts.output_ids], [4, 4], rewards=rewards,
        token_ids=np.concatenate(rollouts.output_ids), config=corrpo.ScoreConfig(min_tokens=2).resolve({"top_k"}),
    )  # fmt: skip
    np.testing.assert_allclose(scores.rho, want.rho, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores.rewards, want.rewards, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores.advantages, want.advantages, rtol=1e-4, atol=1e-5)


def test_top_k_bounds_contain_the_exact_statistics_and_close_at_the_full_vocabulary(engine, hf):
    v = vocab(hf)
    for k in (3, v):
        response = engine.generate(
            input_ids=PROMPTS[0], sampling_params={"n": 2, "temperature": 1.0, "max_new_tokens": 10},
            return_logprob=True, top_logprobs_num=k,
        )  # fmt: skip
        rollouts = parse_generate(response, n=2)
        for i in range(2):
            ref = reference(hf, PROMPTS[0], rollouts.output_ids[i])
            b = corrpo.top_k_stats(
                rollouts.top_logprobs[i], rollouts.top_token_ids[i], rollouts.logprob[i], rollouts.output_ids[i], v
            )
            assert (b.entropy_lower <= ref["entropy"] + ATOL).all() and (ref["entropy"] <= b.entropy_upper + ATOL).all()
            assert (b.grad_norm_lower <= ref["grad_norm"] + ATOL).all() and (ref["grad_norm"] <= b.grad_norm_upper + ATOL).all()
            if k == v:  # nothing left outside the top-k: both bounds are the exact values
                for bound in (b.entropy_lower, b.entropy_upper):
                    np.testing.assert_allclose(bound, ref["entropy"], atol=ATOL)
                for bound in (b.grad_norm_lower, b.grad_norm_upper):
                    np.testing.assert_allclose(bound, ref["grad_norm"], atol=ATOL)
            else:  # three of the vocabulary leave the entropy open
                assert (b.entropy_upper - b.entropy_lower > 0.1).any()


def test_the_plugin_returns_the_policys_exact_statistics_at_any_temperature(engine, hf, client):
    """At temperature 0.7 SGLang samples from and reports logprobs of softmax(z / 0.7); the
    plugin's H, G and log p are of the policy's softmax(z), for every token of every
    rollout, stopped early or not. Its stats payload scores as corrpo does in-process."""
    response = engine.generate(
        input_ids=PROMPTS, sampling_params={"n": 4, "temperature": 0.7, "max_new_tokens": 12, "stop_token_ids": STOP},
        return_logprob=True,
    )  # fmt: skip
    rollouts = parse_generate(response, n=4)
    assert sum(len(x) for x in rollouts.output_ids) > 8
    for i in range(8):
        prompt, ids = PROMPTS[i // 4], rollouts.output_ids[i]
        ref = reference(hf, prompt, ids)
        np.testing.assert_allclose(rollouts.entropy[i], ref["entropy"], atol=ATOL)
        np.testing.assert_allclose(rollouts.grad_norm[i], ref["grad_norm"], atol=ATOL)
        np.testing.assert_allclose(rollouts.policy_logprob[i], ref["logprob"], atol=ATOL)
        np.testing.assert_allclose(rollouts.logprob[i], reference(hf, prompt, ids, 0.7)["logprob"], atol=ATOL)
    rewards = [0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    scores = client.score(**rollouts.stats_payload(), rewards=rewards, min_tokens=2)
    want = corrpo.score(
        np.concatenate(rollouts.entropy), np.concatenate(rollouts.grad_norm), [len(x) for x in rollouts.output_ids],
        [4, 4], rewards=rewards, token_ids=np.concatenate(rollouts.output_ids), config=corrpo.ScoreConfig(min_tokens=2),
    )  # fmt: skip
    np.testing.assert_allclose(scores.rho, want.rho, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores.advantages, want.advantages, rtol=1e-4, atol=1e-5)
    assert (scores.config.measure, scores.config.estimator) == ("logit_grad", "exact")


def test_streamed_outputs_carry_the_statistics_of_every_token(engine, hf):
    text = engine.generate(
        input_ids=PROMPTS[1], sampling_params={"n": 2, "temperature": 1.0, "max_new_tokens": 9}, return_logprob=True,
        stream=True,
    )  # fmt: skip
    events = parse_sse(text)
    rollouts = parse_generate(events, n=2)
    for i in range(2):
        ref = reference(hf, PROMPTS[1], rollouts.output_ids[i])
        np.testing.assert_allclose(rollouts.entropy[i], ref["entropy"], atol=ATOL)
        np.testing.assert_allclose(rollouts.grad_norm[i], ref["grad_norm"], atol=ATOL)


def test_the_plugin_registers_nothing_unless_enabled(monkeypatch):
    """An installed entry point loads in every SGLang server: without CORRPO_SGLANG_STATS=1
    it must hook nothing."""
    from importlib.metadata import entry_points

    from sglang.srt.plugins.hook_registry import HookRegistry

    from corrpo.integrations import sglang_plugin

    (entry,) = [e for e in entry_points(group="sglang.srt.plugins") if e.name == "corrpo"]
    assert entry.load() is sglang_plugin.register
    targets = (sglang_plugin._MODEL_RUNNER_INIT, sglang_plugin._STREAMER_CLASS)
    monkeypatch.setattr(HookRegistry, "_hooks", type(HookRegistry._hooks)(list))
    monkeypatch.delenv("CORRPO_SGLANG_STATS", raising=False)
    sglang_plugin.register()
    assert not any(HookRegistry._hooks.get(t) for t in targets)
    monkeypatch.setenv("CORRPO_SGLANG_STATS", "1")
    sglang_plugin.register()
    assert all(len(HookRegistry._hooks[t]) == 1 for t in targets)
