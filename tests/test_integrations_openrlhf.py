"""CorR-PO in OpenRLHF 0.11.2 (``corrpo.integrations.openrlhf``), driven by OpenRLHF's own
code: its ``SingleTurnAgentExecutor`` generates a rollout, decodes it to a query and asks the
reward model, over HTTP (``_fetch_rewards_via_http``, aiohttp) from our server, a real
``python -m corrpo.integrations.openrlhf`` process in front of a real corrpo-server process
started with ``--model``, and through its ``reward_func`` file loader. The rewards must equal
corrpo's in-process answer (``corrpo.gradients.response_strengths`` + ``corrpo.score``) on
the exact ids that were generated, so the prompt/response split is checked too. vLLM does not
install here (it needs CUDA): a sampler on the same tiny model stands in for its engine."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
agent = pytest.importorskip("openrlhf.utils.agent")  # OpenRLHF 0.11.2, installed --no-deps

import corrpo  # noqa: E402
from corrpo.integrations.openrlhf import request_seed, split_query  # noqa: E402
from corrpo.testing import build_tiny_model  # noqa: E402

# The verifier the servers load from a file: r = 1 when the response says the label.
VERIFIER = '''
def verify(query, prompt, label):
    if label == "raise":
        raise RuntimeError("no verdict")
    return float(query.count(label) > prompt.count(label))
'''
MIN_TOKENS = 4
QUESTIONS = [("what is four plus four ?", "four"), ("two plus three is", "five"), ("the cat sat on", "mat"),
             ("a dog ran in", "the"), ("one and one make", "two"), ("what is one plus one ?", "two")]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("openrlhf") / "policy"
    build_tiny_model(path)
    (path.parent / "verifier.py").write_text(VERIFIER)
    return path


@pytest.fixture(scope="module")
def policy(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny)


@pytest.fixture(scope="module")
def rm_url(tiny):
    """corrpo-server --model on the policy, and our HTTP reward server in front of it."""
    from corrpo_server import ServerProcess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with ServerProcess("--model", str(tiny), "--device", "cpu", env=env, ready_timeout=180) as server:
        port_file = tiny.parent / "rm-port.json"
        log = open(tiny.parent / "rm.log", "wb")
        command = [
            sys.executable, "-m", "corrpo.integrations.openrlhf", "--tokenizer", str(tiny), "--corrpo", server.target,
            "--verifier", f"{tiny.parent / 'verifier.py'}:verify", "--min-tokens", str(MIN_TOKENS),
            "--port", "0", "--port-file", str(port_file),
        ]  # fmt: skip
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 120
            while not port_file.exists():
                assert process.poll() is None, (tiny.parent / "rm.log").read_text()
                assert time.monotonic() < deadline, "the reward server did not start"
                time.sleep(0.05)
            yield f"http://127.0.0.1:{json.loads(port_file.read_text())['port']}/get_reward"
            assert process.poll() is None, "the reward server died during the tests"
        finally:
            process.terminate()
            process.wait(30)
            log.close()


class Sampler:
    """Stands in for vLLM's engine in ``SingleTurnAgentExecutor.execute``: samples from the
    policy, and returns vLLM's output shape (token ids, finish reason, no logprobs)."""

    def __init__(self, model, seed: int) -> None:
        self.model = model
        self.generator = torch.Generator().manual_seed(seed)

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        ids, out = list(prompt_token_ids), []
        with torch.no_grad():
            while len(out) < sampling_params.max_tokens:
                logits = self.model(torch.tensor([ids + out])).logits[0, -1]
                out.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=self.generator)))
                if out[-1] == self.model.config.eos_token_id:
                    break
        finish = "length" if out[-1] != self.model.config.eos_token_id else "stop"
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=out, text=None, finish_reason=finish, logprobs=None)])


def rollouts(executor, policy, max_length: int = 64, max_tokens: int = 24, seed: int = 0) -> list[dict]:
    """OpenRLHF's executor runs every question: a prompt through the chat template (as its
    dataset does with --apply_chat_template), generation, and the reward request."""
    model, tokenizer = policy
    sampler = Sampler(model, seed)
    params = SimpleNamespace(max_tokens=max_tokens, logprobs=None)

    async def run() -> list[dict]:
        outs = []
        for question, label in QUESTIONS:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
            outs.append(await executor.execute(prompt, label, params, max_length, tokenizer, sampler))
        return outs

    return asyncio.run(run())


def reference(model, prompt_ids, response_ids, rewards, seed: int, **settings) -> corrpo.Scores:
    """corrpo's answer in this process for the exact generated ids, each rollout a group of
    one, with the server's settings (by default the paper's l1_mean by local, gate correct)."""
    from corrpo.gradients import response_strengths

    settings = {"gate": "correct", "min_tokens": MIN_TOKENS, "estimator_seed": seed, **settings}
    config = corrpo.ScoreConfig(**settings).resolve({"tokens"})
    out = response_strengths(
        model, prompt_ids, response_ids, measures=(config.measure, "logit_grad"), estimator=config.estimator,
        k=config.estimator_k, seed=seed,
    )  # fmt: skip
    return corrpo.score(
        out.entropy_bits * math.log(2), out.measure(config.measure), out.lengths, [1] * len(prompt_ids), rewards=rewards,
        token_ids=out.token_ids, config=config, logit_grad=out.logit_grad,
    )  # fmt: skip


def verified(query: str, prompt: str, label: str) -> float:
    return float(query.count(label) > prompt.count(label))


def read_ids(tokenizer, out: dict) -> tuple[str, list[int], list[int], bool]:
    """An executor output's query (as OpenRLHF sent it), its prompt and response ids, and
    whether the text reads back as the generated ids. The tiny tokenizer's pre-tokenizer
    reads a run like "??" (two "?" decoded together) as one unknown word: such a response
    cannot be read back from text, and is scored as the tokenizer reads the text after the
    prompt."""
    (start, end) = out["action_ranges"][0]
    prompt_ids, response_ids = out["observation_tokens"][:start], out["observation_tokens"][start:end]
    query = tokenizer.decode(out["observation_tokens"], skip_special_tokens=False)
    faithful = "??" not in query
    if not faithful:
        tail = query[len(tokenizer.decode(prompt_ids, skip_special_tokens=False)) :]
        response_ids = tokenizer(text=tail, add_special_tokens=False)["input_ids"]
    return query, prompt_ids, response_ids, faithful


def check_rollout(policy, out: dict) -> tuple[float, bool, bool]:
    """One executor output against the reference; returns (r, whether the term applied,
    whether the text was read back faithfully)."""
    model, tokenizer = policy
    query, prompt_ids, response_ids, faithful = read_ids(tokenizer, out)
    r = verified(query, out["prompt"], out["label"])
    want = reference(model, [prompt_ids], [response_ids], [r], request_seed([query]))
    assert (want.config.measure, want.config.estimator, want.config.estimator_k) == ("l1_mean", "local", None)
    assert out["reward"] == pytest.approx([float(want.rewards[0])], rel=1e-5, abs=1e-6)
    assert out["scores"] == [r]
    logs = out["extra_logs"]
    defined = bool(np.isfinite(want.rho[0]))
    assert logs["corrpo_rho"] == pytest.approx([float(want.rho[0]) if defined else 0.0], rel=1e-5, abs=1e-6)
    assert logs["corrpo_rho_defined"] == [float(defined)]
    assert logs["corrpo_applied"] == [float(want.regularized[0])]
    assert logs["corrpo_response_tokens"] == [len(response_ids)]  # the split found the generated ids
    assert logs["corrpo_text_exact"] == [float(faithful)]
    return r, bool(want.regularized[0]), faithful


def test_openrlhf_executor_gets_corrpo_rewards_over_http(policy, rm_url):
    outs = rollouts(agent.SingleTurnAgentExecutor(rm_url), policy)
    checked = [check_rollout(policy, out) for out in outs]
    # Both verdicts occur, the term applied to some rollouts but not to the wrong ones, and
    # rollouts were read back exactly as generated.
    assert {r for r, _, _ in checked} == {0.0, 1.0}
    assert any(applied for _, applied, _ in checked)
    assert not any(applied for r, applied, _ in checked if r < 1.0)
    assert any(faithful for _, _, faithful in checked)


def test_truncated_prompt_is_split_at_what_the_policy_saw(policy, rm_url):
    # max_length 12 with 8 new tokens: OpenRLHF keeps the prompt's last 4 tokens (and warns).
    outs = rollouts(agent.SingleTurnAgentExecutor(rm_url), policy, max_length=12, max_tokens=8, seed=1)
    for out in outs:
        assert out["action_ranges"][0][0] == 4
        check_rollout(policy, out)


def test_a_request_of_several_queries_scores_them_together(policy, rm_url):
    model, tokenizer = policy
    outs = rollouts(agent.SingleTurnAgentExecutor(rm_url), policy, seed=2)
    queries, prompt_ids, response_ids, faithful = zip(*(read_ids(tokenizer, o) for o in outs))
    prompts, labels = [o["prompt"] for o in outs], [o["label"] for o in outs]
    executor = agent.SingleTurnAgentExecutor(rm_url)
    (got,) = asyncio.run(executor._fetch_rewards_via_http(list(queries), prompts, labels))  # one server: one shard
    r = [verified(q, p, lab) for q, p, lab in zip(queries, prompts, labels)]
    want = reference(model, list(prompt_ids), list(response_ids), r, request_seed(queries))
    np.testing.assert_allclose(got["rewards"], want.rewards, rtol=1e-5, atol=1e-6)
    assert got["scores"] == r
    np.testing.assert_allclose(got["extra_logs"]["corrpo_rho"], np.nan_to_num(want.rho, nan=0.0), rtol=1e-5, atol=1e-6)
    assert got["extra_logs"]["corrpo_response_tokens"] == [len(ids) for ids in response_ids]
    assert got["extra_logs"]["corrpo_text_exact"] == [float(f) for f in faithful]
    assert any(want.regularized)


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


BAD = [
    (b"{not json", 400, "the body is not JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b'{"query": ["<s> two"]}', 400, "the body lacks ['prompts']"),
    (b'{"query": "<s> two", "prompts": ["<s>"]}', 400, "query must be a list of strings (one per rollout), got str"),
    (b'{"query": ["<s> two", 3], "prompts": ["<s>", "<s>"]}', 400, "query[1] must be a string, got int"),
    (b'{"query": [], "prompts": []}', 400, "query is empty"),
    (b'{"query": ["<s> two"], "prompts": ["<s>", "<s>"]}', 400, "2 prompts for 1 queries"),
    (b'{"query": ["<s> two"], "prompts": ["<s>"], "labels": ["a", "b"]}', 400, "one label per query (1), got 2 labels"),
    (b'{"query": ["<s> two cat"], "prompts": ["the dog"]}', 400, "query[0] does not start with the text of prompts[0]"),
    (b'{"query": ["<s> two plus three"], "prompts": ["<s> two"], "labels": ["raise"]}', 500,
     "the verifier raised on rollout 0: RuntimeError: no verdict"),
]  # fmt: skip


def test_bad_requests_are_refused_precisely_and_the_server_keeps_serving(policy, rm_url):
    model, tokenizer = policy
    for body, status, message in BAD:
        code, answer = post(rm_url, body)
        assert (code, message in answer["error"]) == (status, True), (body, answer)
    # Still serving: a good request (prompt "<s> two", response "plus three is five").
    query, prompt = "<s> two plus three is five", "<s> two"
    code, answer = post(rm_url, json.dumps({"query": [query], "prompts": [prompt], "labels": ["five"]}).encode())
    assert code == 200
    p, r = tokenizer(text=prompt, add_special_tokens=False)["input_ids"], tokenizer(text=" plus three is five", add_special_tokens=False)["input_ids"]
    want = reference(model, [p], [r], [1.0], request_seed([query]))
    assert answer["rewards"] == pytest.approx(want.rewards.tolist(), rel=1e-5, abs=1e-6)
    assert answer["extra_logs"]["corrpo_response_tokens"] == [4]


def test_reward_func_file_loaded_by_openrlhf_scores_in_process(tiny, policy, tmp_path):
    # The user's file of the docs, with model= (S computed in the process that loads it).
    path = tmp_path / "corrpo_reward.py"
    path.write_text(
        "from transformers import AutoModelForCausalLM\n"
        "from corrpo.integrations.openrlhf import CorrpoReward\n"
        f"policy = AutoModelForCausalLM.from_pretrained({str(tiny)!r})\n"
        f"reward_func = CorrpoReward({str(tiny)!r}, model=policy, verifier={str(tiny.parent / 'verifier.py') + ':verify'!r},\n"
        f"                           min_tokens={MIN_TOKENS})\n"
    )
    executor = agent.SingleTurnAgentExecutor(str(path))
    assert executor.reward_func is not None  # OpenRLHF loaded it from the .py path
    outs = rollouts(executor, policy, seed=3)
    checked = [check_rollout(policy, out) for out in outs]
    assert any(applied for _, applied, _ in checked)


def test_split_query_reads_other_tokenizers():
    """Byte-level BPE (GPT-2 style) and Metaspace (SentencePiece style) tokenizers trained
    here: the split returns the ids that were decoded into the query."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from corrpo.testing import TEXTS

    def trained(pre, dec, alphabet=()):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer, tok.decoder = pre, dec
        tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, initial_alphabet=list(alphabet), special_tokens=["</s>"]))
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")

    def ids(tok, text):
        return tok(text=text, add_special_tokens=False)["input_ids"]

    byte = trained(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(), pre_tokenizers.ByteLevel.alphabet())
    meta = trained(pre_tokenizers.Metaspace(prepend_scheme="always"), decoders.Metaspace(prepend_scheme="always"))
    cases = [
        # A prompt that ends in a space: the whole query reads " three" where the policy
        # wrote " " then "three", so the response is read from the text after the prompt.
        (byte, "two plus ", ids(byte, "three is five</s>")),
        (byte, "what is four plus four ?", ids(byte, " four</s>")),
        (meta, "two plus", [meta.convert_tokens_to_ids("▁three"), meta.convert_tokens_to_ids("</s>")]),
    ]
    for tok, prompt, response in cases:
        query = tok.decode(ids(tok, prompt) + response, skip_special_tokens=False)
        assert split_query(tok, query, prompt) == (ids(tok, prompt), response), (prompt, query)
    assert ids(byte, "two plus three is five</s>")[: len(ids(byte, "two plus "))] != ids(byte, "two plus ")


def test_verifier_free_rewards_and_settings_errors(tiny, policy):
    from transformers import AutoTokenizer

    from corrpo.integrations.openrlhf import CorrpoReward

    model, tokenizer = policy
    # Without a verifier r = 0, the gate is off, and OpenRLHF's scores are the rewards.
    reward = CorrpoReward(tokenizer, model=model, estimator="exact", min_tokens=MIN_TOKENS, coef=0.3)
    query, prompt = "<s> two plus three is five the cat sat on the mat </s>", "<s> two"
    got = reward([query], [prompt], None)
    ids = lambda text: tokenizer(text=text, add_special_tokens=False)["input_ids"]  # noqa: E731
    want = reference(model, [ids(prompt)], [ids(query)[2:]], None, 0, gate="none", estimator="exact", coef=0.3)
    assert np.isfinite(want.rho[0]) and want.regularized[0]
    assert got["rewards"] == pytest.approx([-0.3 * float(want.rho[0])], rel=1e-6)
    assert got["scores"] == got["rewards"]
    assert got["extra_logs"]["corrpo_text_exact"] == [1.0]
    # A tokenizer that is not the model's: ids beyond its vocabulary are refused by name.
    wider = AutoTokenizer.from_pretrained(tiny)
    wider.add_tokens(["zebra"])
    with pytest.raises(corrpo.InvalidTokenError, match="rollout 0: token id 25 is outside the model's vocabulary of 25"):
        CorrpoReward(wider, model=model)(["<s> two zebra"], ["<s> two"])

    verifier = f"{tiny.parent / 'verifier.py'}:verify"
    errors = [
        ({}, "give exactly one of client (a corrpo-server started with --model) and model"),
        ({"model": model, "client": "127.0.0.1:1"}, "give exactly one of client (a corrpo-server started with --model) and model"),
        ({"model": model, "gate": "correct"}, 'gate "correct" applies the term where the verifier'),
        ({"model": model, "verifier": "verify"}, "a verifier is named 'package.module:function'"),
        ({"model": model, "verifier": "json:nope"}, "json has no function 'nope'"),
        ({"model": model, "verifier": "missing.py:verify"}, "verifier file 'missing.py' does not exist"),
        ({"model": model, "verifier": verifier, "measure": "l2"}, "measure must be one of"),
    ]
    for kwargs, message in errors:
        with pytest.raises(corrpo.ConfigError) as err:
            CorrpoReward(tokenizer, **kwargs)
        assert message in str(err.value), (kwargs, str(err.value))


def test_the_server_refuses_a_verifier_it_cannot_import(tiny_model_dir):
    """A verifier that does not import is one line and exit 2 at start, not a traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "corrpo.integrations.openrlhf", "--tokenizer", str(tiny_model_dir),
         "--corrpo", "127.0.0.1:9", "--verifier", "no_such_module_here:verify", "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "--verifier 'no_such_module_here:verify'" in done.stderr and "ModuleNotFoundError" in done.stderr
    assert "Traceback" not in done.stderr
