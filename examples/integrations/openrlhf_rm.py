"""CorR-PO as OpenRLHF's remote reward model, on the CPU, in well under a minute.

Builds a tiny random Llama and a tokenizer trained here (no downloads), starts a
corrpo-server on it (``--model``: the paper's strength S needs the policy's weights) and
the OpenRLHF reward server of ``corrpo.integrations.openrlhf`` in front of it, with a toy
verifier. Then does what OpenRLHF 0.11 does for every rollout: samples a response, decodes
prompt + response with its special tokens, and POSTs ``{"query", "prompts", "labels"}``.
Prints each rollout's verifier reward r, rho(H, S) and ``r - coef * rho``, the advantages
OpenRLHF's ``group_norm`` estimator then forms, and checks that the ``reward_func`` file
form gives the same answers.

    .venv/bin/python examples/integrations/openrlhf_rm.py   (after `make test`, or in the corrpo
        checkout: pip install '.[gradients,grpc]' fastapi uvicorn ./server)

(Named ``openrlhf_rm.py``, not ``openrlhf.py``, so that it never shadows the openrlhf package.)
"""

import json
import socket
import tempfile
import threading
import time
import urllib.request

import numpy as np
import torch
import uvicorn
from transformers import AutoModelForCausalLM, AutoTokenizer

from corrpo.client import RewardClient
from corrpo.integrations.openrlhf import ENDPOINT, CorrpoReward, make_app, split_query
from corrpo.testing import build_tiny_model
from corrpo_server import ServerProcess

SAMPLES = 4  # OpenRLHF's --rollout.n_samples_per_prompt


def verify(query: str, prompt: str, label: str) -> float:
    """A toy verifier: 1 when the response says the label."""
    return float(query.count(label) > prompt.count(label))


def sample(model, tokenizer, prompt: str) -> list[str]:
    """What vLLM and OpenRLHF's SingleTurnAgentExecutor make of a prompt: SAMPLES queries,
    prompt + response decoded with their special tokens."""
    ids = tokenizer(text=prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    rows = [model.generate(ids, do_sample=True, max_new_tokens=24, pad_token_id=tokenizer.pad_token_id)[0] for _ in range(SAMPLES)]
    return [tokenizer.decode(row, skip_special_tokens=False) for row in rows]


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_model(f"{tmp}/policy")
        model = AutoModelForCausalLM.from_pretrained(f"{tmp}/policy", dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(f"{tmp}/policy")
        with ServerProcess("--model", f"{tmp}/policy", "--device", "cpu", ready_timeout=180) as corrpo_server:
            # gate="none" so that the toy run shows the term on every rollout; the default with a
            # verifier is gate="correct" (ungated CorR-PO collapsed weak policies in our study).
            settings = {"coef": 0.5, "gate": "none", "min_tokens": 4}
            reward = CorrpoReward(tokenizer, client=corrpo_server.target, verifier=verify, **settings)

            # The HTTP server, as `python -m corrpo.integrations.openrlhf` runs it, in a thread here.
            sock = socket.create_server(("127.0.0.1", 0))
            http = uvicorn.Server(uvicorn.Config(make_app(reward), log_level="warning"))
            threading.Thread(target=http.run, kwargs={"sockets": [sock]}, daemon=True).start()
            while not http.started:
                time.sleep(0.05)
            url = f"http://127.0.0.1:{sock.getsockname()[1]}{ENDPOINT}"
            print(f"reward server at {url}: train with  --reward.remote_url {url}\n")

            for question, label in [("two plus three is", "the"), ("the cat sat on", "park")]:
                prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
                queries = sample(model, tokenizer, prompt)
                answers = []
                for query in queries:  # one request per rollout, as OpenRLHF sends them
                    body = json.dumps({"query": [query], "prompts": [prompt], "labels": [label]}).encode()
                    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(request) as response:
                        answers.append(json.loads(response.read()))
                rewards = np.array([a["rewards"][0] for a in answers])
                # OpenRLHF's group_norm advantage (--algo.advantage.estimator group_norm).
                advantages = (rewards - rewards.mean()) / (rewards.std(ddof=1) + 1e-9)
                print(f"prompt {prompt!r}, label {label!r}")
                for query, a, adv in zip(queries, answers, advantages):
                    response = tokenizer.decode(split_query(tokenizer, query, prompt)[1], skip_special_tokens=False)
                    logs = a["extra_logs"]
                    rho = f"{logs['corrpo_rho'][0]:+.3f}" if logs["corrpo_rho_defined"][0] else "  none"
                    print(f"  r={a['scores'][0]:.0f}  rho={rho}  r-coef*rho={a['rewards'][0]:+.3f}  adv={adv:+.3f}  "
                          f"{logs['corrpo_response_tokens'][0]:>2} tokens  {response!r}")  # fmt: skip

                # The reward_func file form (--reward.remote_url corrpo_reward.py): OpenRLHF
                # calls it once per rollout too, and gets the same answers.
                with RewardClient(corrpo_server.target) as client:
                    reward_func = CorrpoReward(tokenizer, client=client, verifier=verify, **settings)
                    same = [reward_func([q], [prompt], [label])["rewards"][0] for q in queries]
                np.testing.assert_allclose(same, rewards, rtol=1e-6)
                print("  reward_func form: the same rewards\n")
            http.should_exit = True


if __name__ == "__main__":
    main()
