"""Prompts in, responses out: reading prompt and response JSONL files, applying the chat
template, and sampling the model's own responses.

Prompt files hold one JSON object a line: ``{"prompt": "...", "id": ...}`` (``id``
optional) or ``{"messages": [{"role": "user", "content": "..."}, ...]}``. Response files
(what ``generate`` writes as ``responses.jsonl``) hold ``prompt`` and ``response`` and,
when known, ``prompt_ids`` and ``response_ids``; ids win over text.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError


@dataclass
class Prompt:
    index: int
    id: Any
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None


@dataclass
class Response:
    """One response to score. ``response_ids`` are the scored tokens; ``prompt_ids`` their
    context (chat template included)."""

    index: int
    prompt_index: int
    sample: int
    id: Any
    prompt: str
    response: str
    prompt_ids: list[int]
    response_ids: list[int]
    finished: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out


def read_jsonl(path: str | Path, what: str) -> list[dict[str, Any]]:
    """The objects of a JSONL file; a clear ConfigError naming the line otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file {str(p)!r} does not exist")
    rows = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{p}:{n}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise ConfigError(f"{p}:{n}: each line must be a JSON object, got {type(obj).__name__}")
            obj["_line"] = n
            rows.append(obj)
    if not rows:
        raise ConfigError(f"{what} file {str(p)!r} has no lines")
    return rows


def read_prompts(path: str | Path) -> list[Prompt]:
    out = []
    for i, row in enumerate(read_jsonl(path, "prompts")):
        where = f"{path}:{row['_line']}"
        if "messages" in row:
            msgs = row["messages"]
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and "content" in m for m in msgs):
                raise ConfigError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
            out.append(Prompt(i, row.get("id", i), messages=msgs))
        elif isinstance(row.get("prompt"), str):
            out.append(Prompt(i, row.get("id", i), prompt=row["prompt"]))
        else:
            raise ConfigError(f"{where}: each line needs a string 'prompt' or a list 'messages'")
    return out


def _check_chars(tokenizer: Any, text: str, where: str) -> None:
    """Text the tokenizer has no token for would silently become its unknown token (a
    word-level tokenizer such as corrpo-train's character one has one): the model would score
    another text than the one given. Offsets, which say what text each token covers, need a
    fast tokenizer (what transformers loads by default)."""
    unk = tokenizer.unk_token_id
    if unk is None or not getattr(tokenizer, "is_fast", False):
        return
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = (text[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == unk)
    bad = sorted({span for span in spans if span != tokenizer.unk_token})
    if bad:
        raise ConfigError(
            f"{where}: {bad} are not in the tokenizer's vocabulary (each would encode as its unknown token {tokenizer.unk_token!r})"
        )


def encode_prompt(tokenizer: Any, prompt: Prompt | str, *, chat_template: bool = True, where: str = "prompt") -> tuple[str, list[int]]:
    """(the prompt text as the model sees it, its ids): through the chat template when the
    tokenizer has one (and ``chat_template``), else the plain text with the tokenizer's
    special tokens (e.g. BOS)."""
    if isinstance(prompt, str):
        prompt = Prompt(0, 0, prompt=prompt)
    has_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
    if prompt.messages is not None:
        if not has_template:
            raise ConfigError(f"{where}: 'messages' needs a tokenizer with a chat template; give a plain 'prompt' instead")
        messages = prompt.messages
    else:
        messages = [{"role": "user", "content": prompt.prompt}]
    if has_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        text = prompt.prompt
        _check_chars(tokenizer, text, where)
        ids = tokenizer(text)["input_ids"]
    return text, [int(i) for i in ids]


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]


def _generation(model: Any, tokenizer: Any, max_new_tokens: int, temperature: float) -> tuple[list[int], int, Any]:
    """(end-of-sequence ids, the pad id, the ``GenerationConfig``): greedy when
    ``temperature`` is 0, else sampling from softmax(logits / temperature) (no top-k or top-p)."""
    from transformers import GenerationConfig

    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    sampled = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampled,
        temperature=temperature if sampled else None,
        top_k=0 if sampled else None,
        top_p=1.0 if sampled else None,
        eos_token_id=eos or None,
        pad_token_id=pad,
    )
    return eos, pad, config


def _until_eos(new: list[int], eos: list[int]) -> list[int]:
    """The generated ids up to the first end-of-sequence token (kept)."""
    for j, t in enumerate(new):
        if t in eos:
            return new[: j + 1]
    return new


def _response(index: int, prompt: Prompt, sample: int, text: str, ids: list[int], new: list[int], tokenizer: Any, eos: list[int]) -> Response:
    return Response(
        index=index,
        prompt_index=prompt.index,
        sample=sample,
        id=prompt.id,
        prompt=text,
        response=tokenizer.decode(new, skip_special_tokens=False),
        prompt_ids=ids,
        response_ids=new,
        finished=bool(new) and new[-1] in eos,
    )


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    *,
    n: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
    chat_template: bool = True,
    source: str = "prompts",
    progress: Callable[[int], None] | None = None,
) -> list[Response]:
    """``n`` responses per prompt: greedy when ``temperature`` is 0, else sampled from
    softmax(logits / temperature) (no top-k or top-p), each with its own seed derived from
    (``seed``, prompt, sample). Responses end at an end-of-sequence token (kept) or after
    ``max_new_tokens``."""
    import torch

    if n < 1:
        raise ConfigError(f"--generate must be >= 1, got {n}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    eos, _, config = _generation(model, tokenizer, max_new_tokens, temperature)
    sampled = temperature > 0
    device = next(model.parameters()).device
    out: list[Response] = []
    for prompt in prompts:
        text, ids = encode_prompt(tokenizer, prompt, chat_template=chat_template, where=f"{source} line {prompt.index + 1}")
        x = torch.tensor([ids], dtype=torch.long, device=device)
        for k in range(n):
            if sampled:
                torch.manual_seed(int(np.random.SeedSequence([seed, prompt.index, k]).generate_state(1)[0]))
            with torch.no_grad():
                y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config)
            new = _until_eos([int(t) for t in y[0, len(ids) :].tolist()], eos)
            out.append(_response(len(out), prompt, k, text, ids, new, tokenizer, eos))
            if progress is not None:
                progress(1)
    return out


def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
    first_index: int = 0,
) -> list[Response]:
    """One response per prompt, all prompts in one left-padded ``generate`` call (several
    times faster than one at a time on a CPU), the batch's sampling seeded once with
    ``seed``: the same prompts and weights give the same answers, but a prompt's answer
    depends on the batch it is in. Responses are numbered from ``first_index``."""
    import torch

    eos, pad, config = _generation(model, tokenizer, max_new_tokens, temperature)
    encoded = [encode_prompt(tokenizer, p, where=f"prompts[{p.index}]") for p in prompts]
    width = max(len(ids) for _, ids in encoded)
    device = next(model.parameters()).device
    x = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(x)
    for row, (_, ids) in enumerate(encoded):
        x[row, width - len(ids) :] = torch.tensor(ids, device=device)
        mask[row, width - len(ids) :] = 1
    if temperature > 0:
        torch.manual_seed(seed)
    with torch.no_grad():
        y = model.generate(input_ids=x, attention_mask=mask, generation_config=config)
    out = []
    for row, (prompt, (text, ids)) in enumerate(zip(prompts, encoded)):
        new = _until_eos([int(t) for t in y[row, width:].tolist()], eos)
        out.append(_response(first_index + row, prompt, 0, text, ids, new, tokenizer, eos))
    return out


def read_responses(path: str | Path, tokenizer: Any, *, chat_template: bool = True) -> list[Response]:
    """Responses to score, from a ``responses.jsonl``: ids when given, else the text
    tokenized (the prompt through the chat template, as ``generate`` does)."""
    out: list[Response] = []
    vocab = len(tokenizer)
    for row in read_jsonl(path, "responses"):
        where = f"{path}:{row.pop('_line')}"
        ids = {}
        for key in ("prompt_ids", "response_ids"):
            value = row.get(key)
            if value is None:
                continue
            if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
                raise ConfigError(f"{where}: {key!r} must be a list of integer token ids")
            bad = [t for t in value if t < 0 or t >= vocab]
            if bad:
                raise ConfigError(f"{where}: {key!r} holds ids outside the tokenizer's vocabulary [0, {vocab}): {bad[:5]}")
            ids[key] = value
        if "prompt_ids" in ids:
            prompt_ids = ids["prompt_ids"]
            prompt_text = row.get("prompt") if isinstance(row.get("prompt"), str) else tokenizer.decode(prompt_ids)
        elif isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list):
            p = Prompt(len(out), row.get("id"), prompt=row.get("prompt"), messages=row.get("messages"))
            prompt_text, prompt_ids = encode_prompt(tokenizer, p, chat_template=chat_template, where=where)
        else:
            raise ConfigError(f"{where}: each line needs 'prompt_ids' or a string 'prompt' (or 'messages')")
        if "response_ids" in ids:
            response_ids = ids["response_ids"]
            response_text = row.get("response") if isinstance(row.get("response"), str) else tokenizer.decode(response_ids)
        elif isinstance(row.get("response"), str):
            response_text = row["response"]
            _check_chars(tokenizer, response_text, where)
            response_ids = [int(t) for t in tokenizer(response_text, add_special_tokens=False)["input_ids"]]
        else:
            raise ConfigError(f"{where}: each line needs 'response_ids' or a string 'response'")
        if not response_ids:
            raise ConfigError(f"{where}: the response is empty")
        if not prompt_ids:
            raise ConfigError(f"{where}: the prompt is empty (the first response token needs a context)")
        known = {"index", "prompt_index", "sample", "id", "prompt", "response", "prompt_ids", "response_ids", "finished", "messages"}
        out.append(
            Response(
                index=len(out),
                prompt_index=int(row.get("prompt_index", len(out))),
                sample=int(row.get("sample", 0)),
                id=row.get("id", len(out)),
                prompt=prompt_text,
                response=response_text,
                prompt_ids=prompt_ids,
                response_ids=response_ids,
                finished=row.get("finished"),
                extra={k: v for k, v in row.items() if k not in known},
            )
        )
    return out


def write_responses(path: str | Path, responses: list[Response]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in responses:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")


__all__ = [
    "Prompt",
    "Response",
    "encode_prompt",
    "eos_ids",
    "generate_batch",
    "generate_responses",
    "read_jsonl",
    "read_prompts",
    "read_responses",
    "write_responses",
]
