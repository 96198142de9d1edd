"""Token statistics of [T, V] logits in one read (SPEC 2).

Each program owns a tile of rows and sweeps the vocabulary in blocks, folding each block
into per-row online moments in float32; -inf entries weigh nothing, and NaN, +inf, ids out
of range and impossible (-inf) targets become per-row fault codes, so invalid input costs
no host sync beyond the one that reads the results.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import online
from .launch import KernelStats, check_ids, check_logits, empty_results, inverse_temperature


@triton.jit
def _token_stats_kernel(
    logits_ptr,
    row_stride,
    ids_ptr,
    stats_ptr,
    fault_ptr,
    n_rows,
    vocab,
    inv_tau,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_rows
    # 64-bit offsets: T x V passes 2^31 elements at T = 16k for a 152k vocabulary.
    row_base = logits_ptr + rows.to(tl.int64) * row_stride
    y = tl.load(ids_ptr + rows, mask=row_ok, other=0)

    m, s0, s1, s2, bad = online.start(BLOCK_T)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inside = row_ok[:, None] & (cols[None, :] < vocab)
        z = tl.load(row_base[:, None] + cols[None, :], mask=inside, other=float("-inf")).to(tl.float32)
        keep = inside & (cols[None, :] != y[:, None])
        m, s0, s1, s2, bad = online.fold(m, s0, s1, s2, bad, z, inside, keep, inv_tau)

    in_range = (y >= 0) & (y < vocab)
    z_y = tl.load(row_base + y, mask=row_ok & in_range, other=0.0).to(tl.float32)
    entropy, logprob, collision, grad_norm = online.finish(m, s0, s1, s2, z_y, inv_tau)
    code = online.fault(y, vocab, bad, s0, z_y)
    online.store(stats_ptr, fault_ptr, rows, n_rows, entropy, logprob, collision, grad_norm, code)


def default_config(vocab: int) -> dict[str, int]:
    """Launch parameters: blocks of ~4k elements; several rows per program for small V.
    Untuned (no GPU was at hand when this was written): bench/bench_gpu.py --sweep times
    the alternatives on the device."""
    block_v = min(triton.next_power_of_2(vocab), 4096)
    block_t = max(1, min(64, 4096 // block_v))
    return {"BLOCK_T": block_t, "BLOCK_V": block_v, "num_warps": 8 if block_v >= 2048 else 4}


def token_stats(
    logits: torch.Tensor, token_ids: torch.Tensor, *, temperature: float = 1.0, config: dict[str, int] | None = None
) -> KernelStats:
    """Statistics of softmax(logits / temperature) for each row and its emitted token.

    logits: [T, V] float32, float16 or bfloat16 with unit column stride (any row stride: a
    slice of a larger tensor is read in place). token_ids: [T] integers on the same device.
    config: Triton launch parameters replacing default_config(V), for tuning.
    Returns device tensors without synchronizing; rows with a fault code hold NaN.
    """
    check_logits(logits)
    ids = check_ids(token_ids, logits)
    inv_tau = inverse_temperature(temperature)
    rows, vocab = logits.shape
    out = empty_results(rows, logits.device)
    if rows:
        config = config or default_config(vocab)
        _token_stats_kernel[(triton.cdiv(rows, config["BLOCK_T"]),)](
            logits, logits.stride(0), ids, out.stats, out.fault, rows, vocab, inv_tau, **config
        )
    return out
