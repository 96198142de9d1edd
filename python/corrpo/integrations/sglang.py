"""SGLang's ``/generate`` responses (HTTP JSON, an SSE stream, or ``Engine.generate``'s
dicts) turned into what ``RewardClient.score`` takes. No SGLang import: the response is
plain data (SGLang 0.5.x, ``meta_info`` entries ``[logprob, token_id, text]``).

    response = requests.post(f"{url}/generate", json={
        "input_ids": prompts, "sampling_params": {"n": 8, "temperature": 1.0},
        "return_logprob": True, "top_logprobs_num": 20}).json()
    rollouts = parse_generate(response, n=8)
    scores = client.score(**rollouts.top_k_payload(vocab_size), rewards=rewards)   # bounds of H, G
    scores = client.score(**rollouts.stats_payload(), rewards=rewards)             # exact H, G (plugin on)
    scores = client.score(**rollouts.tokens_payload(prompts), rewards=rewards)     # the paper's measure

What the top-k path can and cannot give: SGLang's logprobs are of the distribution after
penalties and temperature, before top-p (set temperature 1, or ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``
on the server, for the policy's own), and the top-k only bound H and G (``Scores.top_k``).
With corrpo's SGLang plugin on (``CORRPO_SGLANG_STATS=1`` in the server's environment;
``corrpo.integrations.sglang_plugin``) every output also carries the exact H and G of each
token, and ``stats_payload()`` sends those. The paper's parameter-space measure needs the
model: send ``tokens_payload`` to a corrpo-server started with ``--model``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidValueError, ShapeError

# The meta_info keys of corrpo's SGLang plugin (corrpo.integrations.sglang_plugin): per
# output token, H and G of the policy's distribution (temperature 1) and log p of the token.
STATS_KEYS = ("corrpo_entropy", "corrpo_grad_norm", "corrpo_logprob")


@dataclass(frozen=True)
class GeneratedRollouts:
    """The rollouts of one ``/generate`` call, in SGLang's order (prompt-major, ``n`` samples
    per prompt), one array per rollout.

    output_ids: int64 [T_i]; logprob: float64 [T_i] of each output token, or None when the
        request did not ask for logprobs; top_logprobs, top_token_ids: [T_i, k], or None
        without ``top_logprobs_num``; group_sizes: rollouts per prompt; finish_reasons and
        weight_versions: per rollout, as SGLang reported them.
    entropy, grad_norm, policy_logprob: float64 [T_i], the exact H, G and log p of each
        token under the policy's distribution (temperature 1), from corrpo's SGLang plugin;
        None when the server did not run it. NaN where the plugin could not reduce a row.
    """

    output_ids: list[np.ndarray]
    logprob: list[np.ndarray] | None
    top_logprobs: list[np.ndarray] | None
    top_token_ids: list[np.ndarray] | None
    group_sizes: list[int]
    finish_reasons: list[Any]
    weight_versions: list[str | None]
    entropy: list[np.ndarray] | None = None
    grad_norm: list[np.ndarray] | None = None
    policy_logprob: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.output_ids)

    def top_k_payload(self, vocab_size: int) -> dict[str, Any]:
        """Keyword arguments of ``RewardClient.score`` for top-k payloads (bounds of H and G)."""
        if self.top_logprobs is None or self.logprob is None:
            raise ValueError("the response has no top-k logprobs: request return_logprob=True and top_logprobs_num > 0")
        return {
            "top_logprobs": self.top_logprobs,
            "top_token_ids": self.top_token_ids,
            "logprob": self.logprob,
            "token_ids": self.output_ids,
            "vocab_size": int(vocab_size),
            "group_sizes": self.group_sizes,
        }

    def stats_payload(self) -> dict[str, Any]:
        """Keyword arguments of ``RewardClient.score`` for stats payloads: the exact H and G
        that corrpo's SGLang plugin computed from the live logits (measure ``logit_grad``)."""
        if self.entropy is None or self.grad_norm is None:
            raise ValueError(
                "the response has no corrpo statistics: start SGLang with CORRPO_SGLANG_STATS=1 in its environment "
                "(corrpo's plugin, corrpo.integrations.sglang_plugin)"
            )
        for i, (h, g) in enumerate(zip(self.entropy, self.grad_norm)):
            bad = np.flatnonzero(~(np.isfinite(h) & np.isfinite(g)))
            if len(bad):
                # The plugin writes NaN (JSON null) where the step's logits held NaN or +inf.
                raise InvalidValueError(
                    f"rollout {i}, token {bad[0]}: corrpo's plugin found no finite statistics (the engine's logits "
                    "held NaN or +inf there): drop this rollout, or score its ids with tokens_payload",
                    field="entropy",
                    index=i,
                )
        return {
            "entropy": self.entropy,
            "grad_norm": self.grad_norm,
            "logprob": self.policy_logprob,
            "token_ids": self.output_ids,
            "group_sizes": self.group_sizes,
        }

    def tokens_payload(self, prompt_ids: Sequence[Sequence[int]]) -> dict[str, Any]:
        """Keyword arguments of ``RewardClient.score`` for tokens payloads, scored by a
        model-backed corrpo-server with the paper's measure. ``prompt_ids``: one per prompt
        (repeated for its samples) or one per rollout."""
        prompts = [np.asarray(p, dtype=np.int64) for p in prompt_ids]
        if len(prompts) == len(self.group_sizes) and len(prompts) != len(self):
            prompts = [p for p, n in zip(prompts, self.group_sizes) for _ in range(n)]
        if len(prompts) != len(self):
            raise ShapeError(
                f"{len(prompt_ids)} prompts for {len(self)} rollouts in {len(self.group_sizes)} groups: "
                "give one prompt per group or one per rollout"
            )
        return {"prompt_ids": prompts, "token_ids": self.output_ids, "group_sizes": self.group_sizes}


def parse_sse(text: str) -> list[dict[str, Any]]:
    """The final object of each output of a streamed ``/generate`` (``data: {...}`` events,
    ``data: [DONE]``), ordered by ``index``. Events are cumulative (SGLang's default);
    with ``--incremental-streaming-output`` they are deltas, which this does not join."""
    last: dict[int, dict[str, Any]] = {}
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        body = line[len("data:") :].strip()
        if body == "[DONE]":
            break
        event = json.loads(body)
        last[int(event.get("index", 0))] = event
    return [last[i] for i in sorted(last)]


def _entries(rows: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Logprobs and ids of ``[logprob, token_id, text]`` entries."""
    if any(not isinstance(e, (list, tuple)) or len(e) < 2 for e in rows):
        raise ShapeError(f"{where}: entries must be [logprob, token_id, text]")
    return np.array([e[0] for e in rows], dtype=np.float64), np.array([e[1] for e in rows], dtype=np.int64)


def _plugin_stats(meta: dict[str, Any], length: int, where: str) -> tuple[np.ndarray, ...] | None:
    """The plugin's per-token columns (STATS_KEYS order), or None without them."""
    present = [key in meta for key in STATS_KEYS]
    if not any(present):
        return None
    if not all(present):
        raise ShapeError(f"{where}: meta_info has only some of {', '.join(STATS_KEYS)}")
    columns = []
    for key in STATS_KEYS:
        values = meta[key]
        if not isinstance(values, (list, tuple)) or len(values) != length:
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise ShapeError(f"{where}: meta_info[{key!r}] must hold one value per output token ({length}), got {got}")
        # JSON has no NaN: SGLang writes the plugin's NaN as null.
        columns.append(np.array([np.nan if v is None else v for v in values], dtype=np.float64))
    return tuple(columns)


def _rollout(item: dict[str, Any], i: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    where = f"rollout {i}"
    if "output_ids" not in item or "meta_info" not in item:
        raise ShapeError(f"{where}: not a /generate output (needs output_ids and meta_info)")
    ids = np.asarray(item["output_ids"], dtype=np.int64)
    meta = item["meta_info"]
    lp = top = top_ids = None
    if meta.get("output_token_logprobs") is not None:
        lp, lp_ids = _entries(meta["output_token_logprobs"], f"{where}: output_token_logprobs")
        if not np.array_equal(lp_ids, ids):
            raise ShapeError(f"{where}: output_token_logprobs name other tokens than output_ids")
    rows = meta.get("output_top_logprobs")
    if rows:
        if len(rows) != len(ids):
            raise ShapeError(f"{where}: {len(rows)} rows of output_top_logprobs for {len(ids)} output tokens")
        ks = {len(r) if r else 0 for r in rows}
        if len(ks) != 1 or 0 in ks:
            missing = next((t for t, r in enumerate(rows) if not r), None)
            detail = f"token {missing} has none" if missing is not None else f"rows hold {sorted(ks)} entries"
            raise ShapeError(f"{where}: output_top_logprobs must hold k entries per token; {detail}")
        pairs = [_entries(r, f"{where}: output_top_logprobs[{t}]") for t, r in enumerate(rows)]
        top = np.stack([p[0] for p in pairs])
        top_ids = np.stack([p[1] for p in pairs])
    return ids, lp, top, top_ids


def parse_generate(response: dict[str, Any] | Sequence[dict[str, Any]], n: int = 1) -> GeneratedRollouts:
    """The rollouts of a ``/generate`` response: one output (a dict) or a list of them, in
    SGLang's order (prompt-major, ``n`` = ``sampling_params.n`` samples per prompt)."""
    items = [response] if isinstance(response, dict) else list(response)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not items or len(items) % n:
        raise ShapeError(f"{len(items)} outputs do not split into groups of n={n}")
    parsed = [_rollout(item, i) for i, item in enumerate(items)]
    # An output with no tokens has no top-k rows to tell k by: it takes the others' k.
    ks = {p[2].shape[1] for p in parsed if p[2] is not None}
    if len(ks) == 1:
        k = ks.pop()
        parsed = [
            (ids, lp, np.empty((0, k)), np.empty((0, k), np.int64)) if top is None and not len(ids) else (ids, lp, top, top_ids)
            for ids, lp, top, top_ids in parsed
        ]
    stats = [_plugin_stats(item["meta_info"], len(p[0]), f"rollout {i}") for i, (item, p) in enumerate(zip(items, parsed))]
    has_lp = [p[1] is not None for p in parsed]
    has_top = [p[2] is not None for p in parsed]
    if len(set(has_lp)) > 1 or len(set(has_top)) > 1:
        raise ShapeError("some outputs carry logprobs and others do not: one request's outputs must agree")
    if len({s is None for s in stats}) > 1:
        raise ShapeError("some outputs carry corrpo statistics and others do not: one server's outputs must agree")
    has_stats = stats[0] is not None
    return GeneratedRollouts(
        output_ids=[p[0] for p in parsed],
        logprob=[p[1] for p in parsed] if has_lp[0] else None,
        top_logprobs=[p[2] for p in parsed] if has_top[0] else None,
        top_token_ids=[p[3] for p in parsed] if has_top[0] else None,
        group_sizes=[n] * (len(items) // n),
        finish_reasons=[item["meta_info"].get("finish_reason") for item in items],
        weight_versions=[item["meta_info"].get("weight_version") for item in items],
        entropy=[s[0] for s in stats] if has_stats else None,
        grad_norm=[s[1] for s in stats] if has_stats else None,
        policy_logprob=[s[2] for s in stats] if has_stats else None,
    )
