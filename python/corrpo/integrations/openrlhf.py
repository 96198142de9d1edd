"""CorR-PO rewards for OpenRLHF 0.11 (imports nothing of OpenRLHF): its remote reward model
over HTTP, and its ``reward_func`` file form.

OpenRLHF's ``SingleTurnAgentExecutor`` asks for a reward once per rollout: it POSTs
``{"query": [prompt + response text], "prompts": [prompt], "labels": [label]}`` to
``--reward.remote_url`` and reads ``{"rewards", "scores", "extra_logs"}``; given a ``.py``
path instead, it calls that file's ``reward_func(queries, prompts, labels)``, which returns
the same dict. Both answer here with ``r - coef * rho(H, S)``: r from the user's verifier
``(query, prompt, label) -> float``, rho from the tokens of the rollout alone (rho is per
rollout; OpenRLHF forms the group advantages itself), so each request is scored on its own,
every rollout as a group of one.

    python -m corrpo.integrations.openrlhf --tokenizer POLICY_DIR --corrpo 127.0.0.1:50051 \\
        --verifier my_task:verify --port 5000
    # then: python -m openrlhf.cli.train_ppo_ray ... --reward.remote_url http://HOST:5000/get_reward

OpenRLHF sends text only, so the text is tokenized again with the policy's tokenizer (see
``split_query``) and S is computed on a model: a corrpo-server started with
``--model`` (``client=``), or one held in this process (``model=``).
"""

# No `from __future__ import annotations`: FastAPI must see the endpoint's `Request`
# annotation as the class (imported when the app is made), not as a string to resolve.

import dataclasses
import hashlib
import importlib
import importlib.util
import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, CorrpoError, InvalidTokenError, InvalidValueError, ShapeError

ENDPOINT = "/get_reward"  # the path of OpenRLHF's own reward server (openrlhf.cli.serve_rm)


class VerifierError(RuntimeError):
    """The verifier raised, or returned something other than a finite number: a fault of the
    reward server's code, not of the request (HTTP 500)."""


def load_verifier(spec: str) -> Callable[[str, str, Any], float]:
    """The function named by ``package.module:function`` or ``path/to/file.py:function``."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr.isidentifier():
        raise ConfigError(f"a verifier is named 'package.module:function' or 'path/to/file.py:function', got {spec!r}")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"verifier file {where!r} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"corrpo_verifier_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{where} has no function {attr!r}")
    return fn


def request_seed(queries: Sequence[str]) -> int:
    """The estimator_seed of a request that sets none: a hash of its queries, so that a
    retried request gets the same answer while rollouts of one length do not all get the
    same subsample draws (as a fixed seed would give, each request being scored alone)."""
    digest = hashlib.blake2b(digest_size=8)
    for query in queries:
        digest.update(query.encode())
        digest.update(b"\0")
    return int.from_bytes(digest.digest(), "little") >> 1  # 63 bits: any RNG takes it


def _check(queries: Any, prompts: Any, labels: Any) -> tuple[list[str], list[str], list[Any]]:
    for name, values in (("query", queries), ("prompts", prompts)):
        if not isinstance(values, (list, tuple)):
            raise ShapeError(f"{name} must be a list of strings (one per rollout), got {type(values).__name__}", field=name)
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise ShapeError(f"{name}[{i}] must be a string, got {type(value).__name__}", field=name, index=i)
    if not queries:
        raise ShapeError("query is empty: a request needs at least one rollout", field="query")
    if len(prompts) != len(queries):
        raise ShapeError(f"{len(prompts)} prompts for {len(queries)} queries: one prompt per query", field="prompts")
    if labels is None:
        labels = [None] * len(queries)
    elif not isinstance(labels, (list, tuple)) or len(labels) != len(queries):
        got = f"{len(labels)} labels" if isinstance(labels, (list, tuple)) else type(labels).__name__
        raise ShapeError(f"labels must be a list with one label per query ({len(queries)}), got {got}", field="labels")
    return list(queries), list(prompts), list(labels)


#: Tokens decoded to rule a prompt tail out quickly (split_query).
_WINDOW = 4


def split_query(tokenizer: Any, query: str, prompt: str, index: int = 0) -> tuple[list[int], list[int]]:
    """The token ids of the prompt as the policy saw it and of the response, read from
    OpenRLHF's ``query = decode(P + R, skip_special_tokens=False)``, where P =
    ``tokenizer(prompt, add_special_tokens=False)`` (cut to its last tokens when the prompt is
    too long) and R the engine's response ids.

    1. The prompt: P if ``decode(P)`` starts the query (decode, not the prompt's own text,
       since decoding may normalize it), else the longest tail of P whose decoding does
       (OpenRLHF's left truncation).
    2. The response: the rest of the query tokenized with it whole, when that keeps the
       prompt's ids (so tokenizers that mark word starts, like SentencePiece, read the
       response's first word as the policy wrote it); otherwise, when the text across the
       boundary merges into other tokens (a prompt ending in a space), the text after
       ``decode(P)`` tokenized alone.

    The ids are the tokenizer's reading of the text: a response sampled in a non-canonical
    tokenization (rare) is scored as its canonical tokens, and text that a tokenizer cannot
    read back (one whose decoding is lossy) as what it reads; ``CorrpoReward`` logs where
    the ids do not decode to the query. ``index`` names the rollout in errors.
    """

    def encode(text: str) -> list[int]:
        # As OpenRLHF tokenizes prompts: the text's own tokens, no BOS added.
        return list(tokenizer(text=text, add_special_tokens=False)["input_ids"])

    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=False)

    def could_start(start: int) -> bool:
        # A few tokens decoded, their last characters left out (decoding may join or clean
        # up across a cut, or end mid-character): cheap to rule out a tail whose full
        # decoding cannot start the query, so a long truncated prompt is not decoded
        # once per dropped token.
        text = decode(ids[start : start + _WINDOW])
        return query.startswith(text[: max(1, len(text) - 2)])

    ids = encode(prompt)
    used = None
    # Tails the window rules out first; should it ever rule out the right one, every tail.
    for quick in (True, False):
        for start in range(len(ids)):
            if start and quick and not could_start(start):
                continue
            head = decode(ids[start:])
            if query.startswith(head):
                used = ids[start:]
                break
        if used is not None:
            break
    if used is None:
        raise InvalidValueError(
            f"query[{index}] does not start with the text of prompts[{index}] (nor of its last tokens, as OpenRLHF "
            f"truncates long prompts): the query starts {query[:80]!r}, the prompt decodes to "
            f"{tokenizer.decode(ids, skip_special_tokens=False)[:80]!r}",
            field="query",
            index=index,
        )
    whole = encode(query)
    if whole[: len(used)] == used:
        return used, whole[len(used) :]
    return used, encode(query[len(head) :])


class CorrpoReward:
    """OpenRLHF's reward contract with the CorR-PO term: call it with ``(queries, prompts,
    labels)``, get ``{"rewards", "scores", "extra_logs"}``, one entry per rollout.

    tokenizer: the policy's (an object, or its directory), to read OpenRLHF's text as ids
        (``split_query``).
    client: a ``corrpo.client.RewardClient`` (or its target) of a corrpo-server started with
        ``--model`` on the policy's weights; or model: the policy itself, scored in this process.
    verifier: ``(query, prompt, label) -> float`` (query: prompt and response, special tokens
        kept, as OpenRLHF decodes them), a ``module:function`` naming one, or None
        (verifier-free: r = 0).
    settings: ``corrpo.ScoreConfig``'s (coef, gate, threshold, min_tokens, measure, estimator,
        objective, estimator_k, estimator_seed, ...): the paper's ``l1_mean`` by ``subsample``
        unless set. gate defaults to ``correct`` with a verifier (ungated CorR-PO collapsed
        weak policies in our study) and ``none`` without one (there is no r to gate on).
        estimator_seed defaults to ``request_seed(queries)``.

    ``rewards``: r - coef * rho where the term applied, else r. ``scores``: the verifier's r,
    which OpenRLHF's dynamic filtering reads (the rewards without a verifier). ``extra_logs``
    (per rollout, logged by OpenRLHF): ``corrpo_rho`` (0 where undefined: JSON has no NaN and
    OpenRLHF averages these), ``corrpo_rho_defined``, ``corrpo_applied`` (1 where the term
    changed the reward), ``corrpo_response_tokens`` and ``corrpo_text_exact`` (1 where the ids
    read decode back to the query, so the text was read faithfully; see ``split_query``).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        client: Any = None,
        model: Any = None,
        verifier: Callable[[str, str, Any], float] | str | None = None,
        **settings: Any,
    ) -> None:
        from ..scoring import ScoreConfig

        if (client is None) == (model is None):
            raise ConfigError("give exactly one of client (a corrpo-server started with --model) and model (scored in this process)")
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if isinstance(client, str):
            from ..client import RewardClient

            client = RewardClient(client)
        self.verifier = load_verifier(verifier) if isinstance(verifier, str) else verifier
        self.seeded = "estimator_seed" not in settings
        settings.setdefault("gate", "none" if self.verifier is None else "correct")
        if settings["gate"] == "correct" and self.verifier is None:
            raise ConfigError('gate "correct" applies the term where the verifier\'s reward reaches threshold: give a verifier', field="gate")
        self.config = ScoreConfig(**settings).resolve({"tokens"})
        self.tokenizer = tokenizer
        self.client = client
        self.model = model
        self._model_lock = threading.Lock()  # corrpo.gradients hooks the model's layers per call

    def _verify(self, query: str, prompt: str, label: Any, index: int) -> float:
        try:
            value = self.verifier(query, prompt, label)
        except Exception as err:
            raise VerifierError(f"the verifier raised on rollout {index}: {type(err).__name__}: {err}") from err
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise VerifierError(f"the verifier returned {value!r} for rollout {index}, not a number") from None
        if not math.isfinite(value):
            raise VerifierError(f"the verifier returned {value} for rollout {index}; rewards must be finite")
        return value

    def _score_in_process(self, prompt_ids: list[list[int]], response_ids: list[list[int]], rewards: Any, config: Any) -> Any:
        # What a corrpo-server started with --model does with a tokens payload.
        from ..gradients import measured_strengths
        from ..scoring import score

        vocab = int(self.model.get_output_embeddings().weight.shape[0])
        for k, (p, r) in enumerate(zip(prompt_ids, response_ids)):
            bad = [t for t in p + r if t >= vocab]
            if bad:
                raise InvalidTokenError(
                    f"rollout {k}: token id {bad[0]} is outside the model's vocabulary of {vocab}: the tokenizer is not the model's",
                    rollout=k,
                    token_id=bad[0],
                )
        with self._model_lock:
            out = measured_strengths(
                self.model,
                prompt_ids,
                response_ids,
                measure=config.measure,
                estimator=config.estimator,
                objective=config.objective,
                k=config.estimator_k,
                seed=config.estimator_seed,
            )
        return score(
            out.entropy_bits * math.log(2),
            out.measure(config.measure),
            out.lengths,
            [1] * len(prompt_ids),
            rewards=rewards,
            token_ids=out.token_ids,
            config=config,
            logit_grad=None if config.measure == "logit_grad" else out.logit_grad,
        )

    def __call__(self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any] | None = None) -> dict[str, Any]:
        queries, prompts, labels = _check(queries, prompts, labels)
        prompt_ids, response_ids, exact = [], [], []
        for i, (query, prompt) in enumerate(zip(queries, prompts)):
            p, r = split_query(self.tokenizer, query, prompt, i)
            prompt_ids.append(p)
            response_ids.append(r)
            exact.append(float(self.tokenizer.decode(p + r, skip_special_tokens=False) == query))
        rewards = None
        if self.verifier is not None:
            rewards = [self._verify(q, p, lab, i) for i, (q, p, lab) in enumerate(zip(queries, prompts, labels))]
        config = self.config
        if self.seeded:
            config = dataclasses.replace(config, estimator_seed=request_seed(queries))
        if self.model is not None:
            scores = self._score_in_process(prompt_ids, response_ids, rewards, config)
        else:
            settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
            scores = self.client.score(prompt_ids=prompt_ids, token_ids=response_ids, rewards=rewards, group_sizes=1, **settings)
        defined = np.isfinite(scores.rho)
        regularized = scores.rewards.tolist()
        return {
            "rewards": regularized,
            "scores": regularized if rewards is None else rewards,
            "extra_logs": {
                "corrpo_rho": np.where(defined, scores.rho, 0.0).tolist(),
                "corrpo_rho_defined": defined.astype(float).tolist(),
                "corrpo_applied": np.asarray(scores.regularized, dtype=float).tolist(),
                "corrpo_response_tokens": [len(r) for r in response_ids],
                "corrpo_text_exact": exact,
            },
        }


def make_app(reward: CorrpoReward) -> Any:
    """A FastAPI app (OpenRLHF's own reward server is FastAPI on uvicorn) serving ``reward``
    at ``POST /get_reward``: 400 with the reason for a request that does not fit the contract,
    500 when the verifier fails, 502 when the corrpo-server does; it keeps serving after each."""
    import json

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="corrpo reward model for OpenRLHF")
    if reward.client is not None:
        import grpc

        rpc_error: Any = grpc.RpcError
    else:
        rpc_error = ()  # scored in this process: no gRPC (an optional dependency) involved

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.post(ENDPOINT)
    async def get_reward(request: Request) -> JSONResponse:
        try:
            payload = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return error(400, f"the body is not JSON: {err}")
        if not isinstance(payload, dict):
            return error(400, f'the body must be a JSON object {{"query": [...], "prompts": [...], "labels": [...]}}, got {type(payload).__name__}')
        missing = [key for key in ("query", "prompts") if key not in payload]
        if missing:
            return error(400, f"the body lacks {missing}: OpenRLHF sends query, prompts and labels")
        try:
            # Tokenizing and scoring block: off the event loop, so requests overlap.
            result = await run_in_threadpool(reward, payload["query"], payload["prompts"], payload.get("labels"))
        except CorrpoError as err:
            return error(400, str(err))
        except VerifierError as err:
            return error(500, str(err))
        except rpc_error as err:
            status = 400 if err.code().name == "INVALID_ARGUMENT" else 502
            return error(status, f"the corrpo-server answered {err.code().name}: {err.details()}")
        return JSONResponse(result)

    return app


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m corrpo.integrations.openrlhf``: the HTTP reward server."""
    import argparse
    import json
    import os
    import socket

    parser = argparse.ArgumentParser(
        prog="python -m corrpo.integrations.openrlhf",
        description="OpenRLHF's remote reward model (--reward.remote_url http://HOST:PORT/get_reward) with CorR-PO's term",
    )
    parser.add_argument("--tokenizer", required=True, help="the policy's tokenizer (a Hugging Face directory or name)")
    # S comes from a corrpo-server, whose ReloadWeights keeps it on the current policy.
    parser.add_argument("--corrpo", required=True, metavar="HOST:PORT", help="a corrpo-server started with --model on the policy")
    parser.add_argument("--verifier", help="package.module:function or path/to/file.py:function, (query, prompt, label) -> float; none: r = 0")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=5000, help="port; 0 picks a free one (see --port-file)")
    parser.add_argument("--port-file", type=Path, help="write the bound port and pid here once listening, as JSON")
    parser.add_argument("--coef", type=float, default=0.1)
    parser.add_argument("--gate", choices=("none", "correct"), help="default: correct with a verifier, else none")
    parser.add_argument("--threshold", type=float, default=1.0, help="the reward at or above which gate=correct applies the term")
    parser.add_argument("--min-tokens", type=int, default=8, help="fewer response tokens leave rho undefined")
    parser.add_argument("--measure", help="the strength S (default l1_mean, the paper's)")
    parser.add_argument("--estimator", help="how S is computed (default subsample)")
    parser.add_argument("--estimator-k", type=int)
    parser.add_argument("--estimator-seed", type=int, help="default: a hash of each request's queries")
    args = parser.parse_args(argv)

    import uvicorn

    settings = {"coef": args.coef, "threshold": args.threshold, "min_tokens": args.min_tokens}
    for name in ("gate", "measure", "estimator", "estimator_k", "estimator_seed"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    try:
        reward = CorrpoReward(args.tokenizer, client=args.corrpo, verifier=args.verifier, **settings)
    except CorrpoError as err:
        parser.exit(2, f"error: {err}\n")
    except (ImportError, OSError, AttributeError, ValueError) as err:  # the verifier or the tokenizer
        parser.exit(2, f"error: --verifier {args.verifier!r} / --tokenizer {args.tokenizer!r}: {type(err).__name__}: {err}\n")
    # Bound here, before uvicorn runs, so that --port 0 can report its port; connections
    # wait in the listen backlog until uvicorn accepts them.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(128)
    if args.port_file is not None:
        tmp = args.port_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"port": sock.getsockname()[1], "pid": os.getpid()}))
        tmp.replace(args.port_file)
    uvicorn.Server(uvicorn.Config(make_app(reward), log_level="info")).run(sockets=[sock])


if __name__ == "__main__":
    main()
