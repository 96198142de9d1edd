"""Per-token statistics of the next-token distribution (SPEC 2): the dispatcher.

``token_stats`` (and ``from_hidden.token_stats_from_hidden``) convert and check the user's
input once, pick a backend, and hand it checked arrays: ``_cpu`` (the native core) or
``_triton`` (the kernels of corrpo-kernels). Backends import no dispatcher.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from . import _cpu, _native, _triton
from ._arrays import is_torch, lengths_vector, logits_buffer, real, vector
from .errors import ConfigError

BACKENDS = ("auto", "cpu", "triton")
#: The instruction sets corrpo-core knows (``Isa`` in rust/corrpo-core/src/simd/mod.rs), narrowest first.
ISAS = ("portable", "avx2", "avx512")


def check_simd_env() -> None:
    """Warns when ``CORRPO_SIMD`` names no instruction set or one this CPU lacks: the core
    falls back to the widest supported one in both cases without a word, which would defeat
    the variable's purpose (ruling a SIMD path in or out). A warning, not an error: this runs
    when corrpo is imported, before any command-line tool could turn an error into a message."""
    name = os.environ.get("CORRPO_SIMD")
    if not name or name in _native.supported_isas():  # empty counts as unset, as in the core
        return
    supported = ", ".join(_native.supported_isas())
    if name not in ISAS:
        why = f"names no instruction set (use one of {', '.join(ISAS)}, or unset it for the widest)"
    else:
        why = f"this CPU does not support {name}"
    warnings.warn(f"CORRPO_SIMD={name!r}: {why}; this CPU supports {supported}; corrpo uses {_native.simd_isa()}", RuntimeWarning, stacklevel=2)


@dataclass(frozen=True)
class TokenStats:
    """Per-token statistics of softmax(logits / temperature), float32, one entry per token.

    entropy: H = -sum p log p, in nats (divide by ln 2 for bits).
    logprob: log p of the emitted token.
    collision: sum p^2.
    grad_norm: G = ||p - onehot(y)||, the norm of the gradient of -log p_y w.r.t. the logits.
    head_grad_norm: G * ||h||, the nuclear norm of the token's LM-head weight gradient; only
        when hidden-state norms were given.
    """

    entropy: np.ndarray
    logprob: np.ndarray
    collision: np.ndarray
    grad_norm: np.ndarray
    head_grad_norm: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.entropy)


def token_stats(
    logits: Any,
    token_ids: Any,
    *,
    temperature: float = 1.0,
    hidden_norms: Any = None,
    lengths: Any = None,
    backend: str = "auto",
) -> TokenStats:
    """Entropy, logprob, collision mass and grad_norm of every token, from one read of its
    logits.

    logits: [T, V] float32, float16 or bfloat16 (NumPy, ``ml_dtypes.bfloat16`` or torch);
        read in place when rows are unit-stride (a slice of a larger tensor is not copied).
        -inf entries are masked vocabulary. Row t holds the logits that produced
        ``token_ids[t]``.
    token_ids: [T] integer ids of the emitted tokens.
    temperature: the sampling temperature; statistics are of softmax(logits / temperature).
    hidden_norms: optional [T] norms of the final hidden states, for ``head_grad_norm``.
    lengths: optional rollout lengths summing to T; errors then name the rollout and the
        token inside it, not only the row.
    backend: "auto" reduces CUDA tensors with the Triton kernels on their GPU and everything
        else with the native core (Rust, SIMD, all cores, GIL released); "cpu" or "triton"
        force one (host input to "triton" is copied to the GPU; under TRITON_INTERPRET=1 it
        runs through Triton's CPU interpreter instead).

    Results are NumPy float32 arrays on the host. Raises InvalidLogitsError (NaN, +inf or
    an all -inf row), InvalidTokenError (id out of range, or a -inf logit: logits and ids
    shifted by one), ShapeError, ConfigError, naming the first faulty row as the native
    core does whichever backend ran.
    """
    if uses_triton(logits, backend):
        staged = _triton.stage_logits(logits)
        rows, reduce = staged.rows, partial(_triton.token_stats, staged)
    else:
        array, dtype = logits_buffer(logits)
        rows, reduce = array.shape[0], partial(_cpu.token_stats, array, dtype)
    ids = vector(token_ids, np.int64, "token_ids", rows)
    norms = None if hidden_norms is None else vector(hidden_norms, np.float32, "hidden_norms", rows)
    spans = None if lengths is None else lengths_vector(lengths, rows, "logits")
    return TokenStats(*reduce(ids, real(temperature, "temperature"), norms, spans))


def uses_triton(x: Any, backend: str) -> bool:
    """Whether `backend` sends `x` to the Triton kernels."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return is_torch(x) and x.device.type == "cuda"
    return backend == "triton"
