"""Token statistics straight from final hidden states and the LM-head weight, without the
[T, V] logits (forward only).

Programs own a tile of rows and a slice of the vocabulary. For each [BLOCK_T, BLOCK_V]
tile they form the logits h W^T in registers (float32 accumulation over the hidden
dimension), fold them into per-row online moments, and pick out the emitted token's logit.
The partial moments of the vocabulary slices ([splits, T] each) are merged by a second
kernel, so memory is O(splits x T) whatever V is.

The vocabulary slice is the fastest grid dimension, so the programs running at one time
cover every slice of a few row tiles: their hidden states stay in L2 while they are
re-read for each vocabulary tile, and each weight tile is fetched once for all of them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

from . import online
from .launch import LOGITS_DTYPES, KernelStats, check_ids, empty_results, inverse_temperature

# The partial kernel's [rows x vocabulary x hidden] tile and launch parameters: the largest
# tiles that spill no registers on sm_80 and sm_90 (tests/compile_kernels.py checks), not
# yet timed on a GPU; bench/bench_gpu.py --sweep times the alternatives on the device.
_HALF_CONFIG = {"BLOCK_T": 64, "BLOCK_V": 128, "BLOCK_D": 32, "num_warps": 8, "num_stages": 3}
_FLOAT32_CONFIG = {"BLOCK_T": 32, "BLOCK_V": 128, "BLOCK_D": 32, "num_warps": 8, "num_stages": 2}
# Row tiles whose hidden states share L2 at one time (see the module's docstring).
_ROW_TILES_IN_FLIGHT = 8
MERGE_ROWS = 128

# Partial results per split: the planes of the [_PARTS, splits, T] float32 buffer.
_PARTS = 6
_M, _S0, _S1, _S2, _BAD, _ZY = (tl.constexpr(plane) for plane in range(_PARTS))


@triton.jit
def _partial_kernel(
    h_ptr,
    h_stride_t,
    h_stride_d,
    w_ptr,
    w_stride_v,
    w_stride_d,
    ids_ptr,
    part_ptr,
    n_rows,
    vocab,
    dim,
    inv_tau,
    v_per_split,
    splits,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
):
    split = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_rows
    y = tl.load(ids_ptr + rows, mask=row_ok, other=-1)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * h_stride_t
    v_lo = split * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, vocab)

    m, s0, s1, s2, bad = online.start(BLOCK_T)
    z_y = tl.zeros([BLOCK_T], tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * w_stride_v
        z = tl.zeros([BLOCK_T, BLOCK_V], tl.float32)
        for k0 in range(0, dim, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            k_ok = ks < dim
            h = tl.load(h_rows + ks[None, :] * h_stride_d, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_rows + ks[None, :] * w_stride_d, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if WIDEN:
                h, w = h.to(tl.float32), w.to(tl.float32)
            z = tl.dot(h, tl.trans(w), z, input_precision=PRECISION)
        inside = row_ok[:, None] & col_ok[None, :]
        is_y = cols[None, :] == y[:, None]
        m, s0, s1, s2, bad = online.fold(m, s0, s1, s2, bad, z, inside, inside & ~is_y, inv_tau)
        z_y += tl.sum(tl.where(inside & is_y, z, 0.0), axis=1)

    at = part_ptr + split * n_rows + rows
    plane = splits * n_rows
    tl.store(at + _M * plane, m, mask=row_ok)
    tl.store(at + _S0 * plane, s0, mask=row_ok)
    tl.store(at + _S1 * plane, s1, mask=row_ok)
    tl.store(at + _S2 * plane, s2, mask=row_ok)
    tl.store(at + _BAD * plane, bad.to(tl.float32), mask=row_ok)
    tl.store(at + _ZY * plane, z_y, mask=row_ok)


@triton.jit
def _merge_kernel(part_ptr, ids_ptr, stats_ptr, fault_ptr, n_rows, vocab, inv_tau, splits, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_rows
    y = tl.load(ids_ptr + rows, mask=row_ok, other=0)
    plane = splits * n_rows
    m, s0, s1, s2, bad = online.start(BLOCK_T)
    z_y = tl.zeros([BLOCK_T], tl.float32)
    for split in range(0, splits):
        at = part_ptr + split * n_rows + rows
        m, s0, s1, s2 = online.merge(
            m, s0, s1, s2,
            tl.load(at + _M * plane, mask=row_ok, other=online.LOWEST),
            tl.load(at + _S0 * plane, mask=row_ok, other=0.0),
            tl.load(at + _S1 * plane, mask=row_ok, other=0.0),
            tl.load(at + _S2 * plane, mask=row_ok, other=0.0),
            inv_tau,
        )
        bad = bad | tl.load(at + _BAD * plane, mask=row_ok, other=0.0).to(tl.int32)
        z_y += tl.load(at + _ZY * plane, mask=row_ok, other=0.0)
    entropy, logprob, collision, grad_norm = online.finish(m, s0, s1, s2, z_y, inv_tau)
    code = online.fault(y, vocab, bad, s0, z_y)
    online.store(stats_ptr, fault_ptr, rows, n_rows, entropy, logprob, collision, grad_norm, code)


def default_config(dtype: torch.dtype) -> dict[str, int]:
    return dict(_FLOAT32_CONFIG if dtype == torch.float32 else _HALF_CONFIG)


def _splits(row_tiles: int, vocab_tiles: int, device: torch.device) -> int:
    """Vocabulary slices: enough that a few row tiles fill every SM, and that small batches
    still give each SM about two programs."""
    if device.type != "cuda":
        return min(vocab_tiles, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = max(triton.cdiv(sms, _ROW_TILES_IN_FLIGHT), triton.cdiv(2 * sms, row_tiles))
    return max(1, min(vocab_tiles, wanted))


def token_stats_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    splits: int | None = None,
    config: dict[str, int] | None = None,
) -> KernelStats:
    """Statistics of softmax(hidden @ lm_head_weight.T / temperature) per row, never holding
    the logits. hidden: [T, d], lm_head_weight: [V, d], both float32, float16 or bfloat16
    (any strides), on one device. splits: vocabulary slices (default: fill the device).
    config: Triton launch parameters replacing default_config(dtype), for tuning.
    Returns device tensors without synchronizing; rows with a fault code hold NaN.
    """
    if hidden.dim() != 2 or lm_head_weight.dim() != 2 or hidden.shape[1] != lm_head_weight.shape[1]:
        raise ValueError(
            f"hidden [T, d] and lm_head_weight [V, d] must share d, got {tuple(hidden.shape)} "
            f"and {tuple(lm_head_weight.shape)}"
        )
    if hidden.dtype not in LOGITS_DTYPES or lm_head_weight.dtype != hidden.dtype:
        raise TypeError(
            f"hidden and lm_head_weight must share one of float32, float16, bfloat16, got {hidden.dtype} "
            f"and {lm_head_weight.dtype}"
        )
    if lm_head_weight.device != hidden.device:
        raise ValueError(f"hidden is on {hidden.device}, but lm_head_weight is on {lm_head_weight.device}")
    if lm_head_weight.shape[0] == 0:
        raise ValueError("lm_head_weight has a vocabulary of size 0")
    ids = check_ids(token_ids, hidden)
    inv_tau = inverse_temperature(temperature)
    (rows, dim), vocab = hidden.shape, lm_head_weight.shape[0]
    out = empty_results(rows, hidden.device)
    if not rows:
        return out
    config = config or default_config(hidden.dtype)
    block_t, block_v = config["BLOCK_T"], config["BLOCK_V"]
    row_tiles, vocab_tiles = triton.cdiv(rows, block_t), triton.cdiv(vocab, block_v)
    splits = min(splits or _splits(row_tiles, vocab_tiles, hidden.device), vocab_tiles)
    v_per_split = triton.cdiv(vocab_tiles, splits) * block_v
    splits = triton.cdiv(vocab, v_per_split)
    parts = torch.empty((_PARTS, splits, rows), dtype=torch.float32, device=hidden.device)
    # float32 inputs stay float32 products; TF32 would cost ~1e-3 relative in the logits.
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"
    # Triton's interpreter multiplies bfloat16 tiles as their bit patterns: widen them there.
    widen = knobs.runtime.interpret and hidden.dtype == torch.bfloat16
    _partial_kernel[(splits, row_tiles)](
        hidden, hidden.stride(0), hidden.stride(1),
        lm_head_weight, lm_head_weight.stride(0), lm_head_weight.stride(1),
        ids, parts, rows, vocab, dim, inv_tau, v_per_split, splits,
        **config, PRECISION=precision, WIDEN=widen,
    )
    _merge_kernel[(triton.cdiv(rows, MERGE_ROWS),)](
        parts, ids, out.stats, out.fault, rows, vocab, inv_tau, splits, BLOCK_T=MERGE_ROWS, num_warps=4
    )
    return out
