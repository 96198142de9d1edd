"""A model-backed server meets real work (issue 21): a model directory whose tokenizer does
not load still serves token ids, and scores them as corrpo does in-process; a request whose
deadline passes mid-work stops within about a second, logs the rollouts and tokens it was
given, and leaves the model to the next request; requests past --max-queued waiting for the
model are refused with RESOURCE_EXHAUSTED; and the server's stderr stays JSON lines while a
GGUF model loads with transformers' progress bar."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import corrpo  # noqa: E402
from corrpo.client import RewardClient  # noqa: E402
from corrpo.models import load_model  # noqa: E402
from corrpo.testing import build_tiny_gguf  # noqa: E402
from corrpo_server import ServerProcess  # noqa: E402

VOCAB = 64
#: What a trainer that saves a policy's config and weights but not its vocabulary leaves:
#: a tokenizer_config.json from which no tokenizer can be built.
PARTIAL_TOKENIZER = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096}
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory) -> Path:
    """A random Llama of 16 thin blocks and no usable tokenizer. Many blocks make the exact
    estimator's batched backward long (4-5 s a chunk at 740 tokens of context on one core
    of the 2-core CI machine) and its steps from block to block short: what the deadline
    check has to cut through. Stopped only between chunks, the request below ran 2.5 s
    past its 2 s deadline there; checked at every block, 0.07 s."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4)  # entropies and strengths that vary from token to token
    path = tmp_path_factory.mktemp("models") / "policy"
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps(PARTIAL_TOKENIZER))
    return path


@pytest.fixture(scope="module")
def deep_server(deep_model):
    with ServerProcess("--model", str(deep_model), "--device", "cpu", "--max-queued", "2", env=ENV, ready_timeout=180) as server:
        yield server


def short_rollouts(seed: int, n: int = 4) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, 3) for _ in range(n)], [rng.integers(0, VOCAB, 12) for _ in range(n)]


def long_rollouts(n: int = 3) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Work of about half a minute with the exact estimator on one core: each rollout is
    two chunks of 20 backward seeds through up to 740 positions of context."""
    rng = np.random.default_rng(1)
    return [rng.integers(0, VOCAB, 700) for _ in range(n)], [rng.integers(0, VOCAB, 40) for _ in range(n)]


def request_lines(server: ServerProcess, request_id: str) -> list[dict]:
    return [e for e in server.events() if e.get("event") == "request" and e.get("request_id") == request_id]


def test_a_directory_whose_tokenizer_does_not_load_scores_ids_in_process(deep_model):
    loaded = load_model(deep_model)
    assert loaded.tokenizer is None
    assert "Couldn't instantiate the backend tokenizer" in loaded.tokenizer_error
    # What needs text says so, naming the directory and why its tokenizer did not load.
    with pytest.raises(corrpo.ConfigError) as info:
        loaded.require_tokenizer("decoding responses")
    message = info.value.message
    assert message.startswith(f"decoding responses needs a tokenizer, and the one beside the model {str(deep_model)!r} did not load")
    assert "Couldn't instantiate the backend tokenizer" in message


def test_a_directory_whose_tokenizer_does_not_load_serves_ids_as_corrpo_scores_them(deep_model, deep_server):
    from corrpo.gradients import measured_strengths
    from transformers import AutoModelForCausalLM

    prompts, responses = short_rollouts(0)
    rewards = [1.0, 0.0, 1.0, 0.0]
    settings = {"measure": "nuclear_qkvo", "estimator": "exact"}
    with RewardClient(deep_server.target, timeout=120) as client:
        got = client.score(prompt_ids=prompts, token_ids=responses, rewards=rewards, group_sizes=[2, 2], **settings)
    # The reference: the same weights, read by transformers alone, scored in this process.
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(deep_model, dtype=torch.float32).eval().requires_grad_(False)
    out = measured_strengths(model, prompts, responses, measure="nuclear_qkvo", estimator="exact", objective="logit")
    want = corrpo.score(
        out.entropy_bits * math.log(2),
        out.nuclear_qkvo,
        out.lengths,
        [2, 2],
        rewards=rewards,
        token_ids=out.token_ids,
        config=corrpo.ScoreConfig(**settings).resolve({"tokens"}),
        logit_grad=out.logit_grad,
    )
    assert np.ptp(want.rho) > 0.1  # the comparison is of values that differ
    np.testing.assert_allclose(got.rho, want.rho, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.advantages, want.advantages, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.entropy_mean, want.entropy_mean, rtol=1e-5)
    assert got.weights_version == "initial"


def test_a_request_past_its_deadline_stops_logs_its_counts_and_frees_the_model(deep_server):
    prompts, responses = long_rollouts()
    deadline_s = 2.0
    with RewardClient(deep_server.target, timeout=120) as client:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            client.score(
                prompt_ids=prompts, token_ids=responses, group_sizes=[3], estimator="exact", request_id="late", timeout=deadline_s
            )
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < deadline_s + 2
        # The model is free again at once: a small request right behind it is answered
        # promptly, not after the abandoned one's minute of work.
        prompts_s, responses_s = short_rollouts(1)
        started = time.monotonic()
        answer = client.score(prompt_ids=prompts_s, token_ids=responses_s, group_sizes=[4], estimator="exact", request_id="next")
        assert time.monotonic() - started < 5, "the abandoned request still held the model"
        assert np.isfinite(answer.rho).all()
    [line] = request_lines(deep_server, "late")
    assert line["status"] in ("DEADLINE_EXCEEDED", "CANCELLED"), line
    # It stopped within about a second of its deadline, not at the end of a chunk of work.
    assert line["ms"] < (deadline_s + 1.0) * 1e3, line
    assert (line["rollouts"], line["tokens"]) == (3, sum(len(r) for r in responses)), line
    [line] = request_lines(deep_server, "next")
    assert (line["status"], line["rollouts"], line["tokens"]) == ("OK", 4, 48), line


def test_requests_past_the_queue_bound_are_refused_under_concurrent_clients(deep_server):
    """One long request holds the model; six clients then ask at once: two wait in line (the
    server's --max-queued 2) and are answered once the long one's deadline ends it; four are
    refused at once with RESOURCE_EXHAUSTED and a message that says what to do."""
    prompts, responses = long_rollouts()
    prompts_s, responses_s = short_rollouts(2)
    outcomes: dict[str, object] = {}

    def ask(name: str, timeout: float, **payload) -> None:
        started = time.monotonic()
        try:
            with RewardClient(deep_server.target, timeout=timeout) as client:
                outcomes[name] = client.score(request_id=name, estimator="exact", **payload)
        except grpc.RpcError as err:
            outcomes[name] = (err.code(), err.details(), time.monotonic() - started)

    long = threading.Thread(target=ask, args=("long", 4.0), kwargs=dict(prompt_ids=prompts, token_ids=responses, group_sizes=[3]))
    long.start()
    time.sleep(1.0)  # the long request has the model
    short = dict(prompt_ids=prompts_s, token_ids=responses_s, group_sizes=[4])
    clients = [threading.Thread(target=ask, args=(f"short{i}", 60.0), kwargs=short) for i in range(6)]
    for thread in clients:
        thread.start()
    for thread in [long, *clients]:
        thread.join(120)
    assert outcomes["long"][0] == grpc.StatusCode.DEADLINE_EXCEEDED, outcomes["long"]
    answered = [name for name in outcomes if name != "long" and isinstance(outcomes[name], corrpo.Scores)]
    refused = [name for name in outcomes if name != "long" and name not in answered]
    assert len(answered) == 2 and len(refused) == 4, outcomes
    for name in refused:
        code, details, seconds = outcomes[name]
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, outcomes[name]
        assert details.startswith("2 requests are already waiting for the model, the server's bound (--max-queued 2)"), details
        assert "retry with backoff" in details
        assert seconds < 2, "a refusal must come at once, not after a wait"
    reference = outcomes[answered[0]]
    np.testing.assert_array_equal(outcomes[answered[1]].rho, reference.rho)


def test_the_server_log_stays_json_while_a_gguf_model_loads_and_scores(tmp_path):
    pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    build_tiny_gguf(path)
    with ServerProcess("--model", str(path), "--device", "cpu", env=ENV, ready_timeout=180) as server:
        with RewardClient(server.target, timeout=120) as client:
            answer = client.score(prompt_ids=[[1, 2, 3]], token_ids=[[4, 5, 6, 7, 8]], group_sizes=[1], estimator="exact")
        assert answer.n_tokens.tolist() == [5]
        lines = server.log().splitlines()
    events = [json.loads(line) for line in lines]  # every line of the log: a JSON object
    names = [e["event"] for e in events]
    assert {"model_loaded", "serving", "request"} <= set(names), names
    # transformers' dequantizing bar, finished: one log line, not a redrawn bar.
    bars = [e["text"] for e in events if e["event"] == "stderr" and "de-quantizing GGUF tensors" in e["text"]]
    assert len(bars) == 1 and "100%" in bars[0], bars
