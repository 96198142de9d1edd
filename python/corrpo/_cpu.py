"""The native CPU backend of ``corrpo.token_stats`` and ``corrpo.token_stats_from_hidden``:
corrpo-core (Rust, SIMD, all cores, GIL released) on inputs the dispatchers (``stats.py``,
``from_hidden.py``) have already converted and checked.

Backends return the columns of ``TokenStats`` as a tuple (entropy, logprob, collision,
grad_norm, head_grad_norm or None) and import no dispatcher: data flows down once, results
come back up once. The native core is also the judge of faulty rows for the Triton backend,
so that every backend raises the same error for the same input.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _native

#: entropy, logprob, collision, grad_norm (float32, one entry per token), head_grad_norm or None.
Columns = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None"]


def token_stats(
    array: np.ndarray,
    dtype: str,
    ids: np.ndarray,
    temperature: float,
    norms: np.ndarray | None,
    spans: np.ndarray | None,
    first_row: int = 0,
) -> Columns:
    """The native core on a logits buffer of ``_arrays.logits_buffer``; `first_row` is the
    batch row of ``array[0]``, so that errors name the row (and, with `spans`, the rollout)
    of the whole batch."""
    return _native.token_stats(array, dtype, ids, temperature, norms, spans, None, first_row)


def token_stats_from_hidden(
    hidden: Any, weight: Any, ids: np.ndarray, temperature: float, spans: np.ndarray | None, chunk_bytes: int
) -> Columns:
    """Checked CPU torch tensors of one dtype: the logits ``hidden @ weight.T`` are formed in
    float32 in row chunks of at most `chunk_bytes` and reduced chunk by chunk."""
    import torch  # the caller's tensors are torch's

    rows, vocab = hidden.shape[0], weight.shape[0]
    w = weight.float()  # a copy for a half-precision weight, the same tensor for float32
    norms = torch.linalg.vector_norm(hidden, dim=1, dtype=torch.float32).numpy()
    step = max(1, chunk_bytes // (4 * vocab))
    parts = []
    # One pass even for T = 0, so that the settings are still checked.
    for start in range(0, max(rows, 1), step):
        logits = (hidden[start : start + step].float() @ w.T).numpy()
        chunk = slice(start, start + step)
        parts.append(token_stats(logits, "float32", ids[chunk], temperature, None, spans, first_row=start))
    entropy, logprob, collision, grad_norm = (np.concatenate([p[k] for p in parts]) for k in range(4))
    return entropy, logprob, collision, grad_norm, head_grad_norm(grad_norm, norms)


def head_grad_norm(grad_norm: np.ndarray, hidden_norms: np.ndarray) -> np.ndarray:
    """G * ||h|| in float64, rounded once, as the native core forms it."""
    return (grad_norm.astype(np.float64) * hidden_norms).astype(np.float32)
