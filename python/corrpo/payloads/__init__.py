"""The payload kinds of a Score request, one module each (stats, logits, top_k, tokens):
each names the fields it takes, checks them (naming the one that is missing or does not
fit) and packs them into the request's protos. ``corrpo.client.prepare`` picks the module
with ``kind_of`` and leaves the rest to it."""

from __future__ import annotations

from collections.abc import Collection
from types import ModuleType

from ..errors import ConfigError
from . import logits, stats, tokens, top_k

KINDS = (logits, stats, top_k, tokens)


def kind_of(given: Collection[str]) -> ModuleType:
    """The module of the payload kind that the ``given`` fields (those not None) belong to:
    the kind whose main field is given, else the one kind whose own fields are, so that its
    ``check`` names what is missing."""
    named = [kind for kind in KINDS if kind.KEY in given] or [kind for kind in KINDS if kind.OWN & set(given)]
    if len(named) > 1:
        parts = [f"{', '.join(sorted(kind.OWN & set(given)))} of a {kind.NAME} payload" for kind in named]
        raise ConfigError(f"one payload kind per call: got {' and '.join(parts)}", field="payload")
    if named:
        return named[0]
    if set(given) == {"token_ids"}:
        # Ids alone: the one kind made only of ids is tokens, missing its prompts.
        return tokens
    got = f"; got only {', '.join(sorted(given))}" if given else ""
    raise ConfigError(
        "no payload given: give one array per rollout of logits (with token_ids), entropy (with grad_norm or "
        "strength), top_logprobs (with top_token_ids, logprob, token_ids and vocab_size), or prompt_ids (with "
        f"token_ids, for a server started with --model){got}",
        field="payload",
    )
