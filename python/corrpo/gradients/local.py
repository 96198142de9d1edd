"""The ``local`` estimator (SPEC 3): every token keeps its own path through the network and
the keys and values of the other positions are detached.

Token t's seed is read at row j = t - 1 of the head's input. Everything in a decoder block
acts row by row except attention, so once attention stops the gradient from flowing into
the keys and values of positions other than the query's own, the seed's gradient reaches
row j of every module and no other row. Each weight matrix then gets the rank-one gradient
``g_j a_j^T`` (g_j the backprop at the module's output row j, a_j its input row j): its L1
norm is ``|g_j|_1 |a_j|_1``, its Frobenius and nuclear norms ``|g_j|_2 |a_j|_2`` (per q, k,
v, o part of a fused projection: the part's rows of g_j). A bias gets g_j. Other modules
with parameters (norm weights) act row by row, so their per-token gradient is the vjp of
the module replayed on row j alone.

All tokens come from ONE forward and ONE backward of the summed seeds: attention is swapped
(through transformers' ``AttentionInterface``) for a straight-through form whose values are
the model's and whose derivatives keep rows apart. For query i,

    s_ij  = q_i . kd_j  +  [i == j] q_i . (k_i - kd_i)          (kd, vd: detached k, v)
    out_i = sum_j p_ij vd_j  +  p_ii (v_i - vd_i)

so out_i depends on k and v only through row i, and the summed backward gives every row
its own token's gradient. The same form under forward-mode AD gives ``L_t v``, the local
Jacobian's product with a direction, which ``jvp_cv`` uses as a control variate; the plain
form (no detaching) is the attention the forward-mode passes of ``jvp`` run with. Both are
taken in query chunks over the keys up to each chunk's last query, so the scores held at
once are bounded (SCORE_ELEMENTS) and the masked half of a causal square is mostly skipped.

Architectures: what dispatches attention through transformers' ``AttentionInterface``
(Llama, Mistral, Qwen2, Gemma 1-3, GPT-2, GPT-NeoX, Phi-3 in transformers 5), causal,
with grouped-query heads, sliding windows and logit softcapping; attention sinks are a
clear error, as is a model with any block whose attention does not dispatch there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from ..errors import CorrpoError
from .architecture import ArchitectureError, is_conv1d
from .capture import Capture
from .handlers import LinearHandler, Needs, Norms, nuclear, per_block
from .seeds import row_stats

#: The names the attention functions below are registered under in transformers: the
#: straight-through one of ``local``, and the plain one the forward-mode passes of ``jvp``
#: and ``jvp_cv`` use (forward-mode AD has no rule for the fused SDPA kernels, and SDPA's
#: math backend forms every query's scores over every key, the masked half included).
LOCAL = "corrpo_local"
CHUNKED = "corrpo_chunked"

#: Attention scores formed at once per layer, in elements (128 MiB of f32): queries are taken
#: in chunks of that size over the keys up to the chunk's last query, and each chunk is
#: recomputed in the backward instead of kept, so memory does not grow with the square of
#: the trace length.
SCORE_ELEMENTS = 32 * 2**20

#: Per-row parameter gradients of a non-linear module formed at once, in elements.
ROW_ELEMENTS = 64 * 2**20

#: Attention arguments that change the attention's math in a way this form does not follow.
_UNSUPPORTED = ("s_aux", "sinks")

#: Attention modules called during the current swapped forward (None: no swap is open).
_called: set[int] | None = None


def _chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
    """Attention of queries i0 .. i0+c-1 ([B, H, c, d]) over keys 0 .. i1-1 ([B, H, i1, d],
    i1 = i0 + c), with the additive ``bias`` [B or 1, 1 or H, c, i1]."""
    raw = torch.matmul(q, k.transpose(2, 3)) * scaling
    if softcap:
        raw = torch.tanh(raw / softcap) * softcap
    work = torch.promote_types(raw.dtype, torch.float32)
    return torch.matmul(torch.softmax(raw.to(work) + bias, dim=-1).to(v.dtype), v)


def _bias(mask: torch.Tensor | None, i0: int, i1: int, window: int | None, like: torch.Tensor) -> torch.Tensor:
    """The additive mask of queries i0 .. i1-1 over keys 0 .. i1-1 (causal LMs: later keys are
    masked for every query of the chunk)."""
    work = torch.promote_types(like.dtype, torch.float32)
    if mask is None:
        qi = torch.arange(i0, i1, device=like.device)[:, None]
        kj = torch.arange(i1, device=like.device)[None, :]
        keep = kj <= qi
        if window:
            keep &= kj > qi - window
        mask = keep[None, None]
    else:
        mask = mask[:, :, i0:i1, :i1]
    if mask.dtype == torch.bool:
        return torch.zeros((), dtype=work, device=like.device).masked_fill(~mask, float("-inf"))
    return mask.to(work)


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
    *,
    local: bool,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """An attention function with the signature of transformers' eager ones: query [B, H, L,
    d], key and value [B, H_kv, L, d] (grouped-query heads repeated here), the mask as
    ``sdpa_mask`` builds it (bool, or None for plain causal with ``sliding_window``).

    It is ``_Attend``, whose reverse- and forward-mode rules are written out: autograd
    through the straight-through form would keep every chunk's scores (or recompute them
    and pay for the zeros its slicing backward fills), and torch's forward-mode rules,
    batched by vmap over directions, copy the scores once per direction."""
    unsupported = [name for name in _UNSUPPORTED if kwargs.get(name) is not None]
    if unsupported:
        raise ArchitectureError(f"{type(module).__name__}: corrpo's attention does not support {unsupported}")
    if dropout:
        raise CorrpoError(f"{type(module).__name__}: attention dropout {dropout} is on; corrpo runs the model in eval mode")
    if _called is not None:
        _called.add(id(module))
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = _Attend.apply(query, key, value, attention_mask, sliding_window, scaling, softcap, local)
    return out.transpose(1, 2).contiguous(), None


def _spans(query: torch.Tensor, directions: int = 1) -> list[tuple[int, int]]:
    """Query chunks [i0, i1) whose scores (times the directions carried) stay under
    SCORE_ELEMENTS."""
    batch, heads, length, _ = query.shape
    size = max(1, SCORE_ELEMENTS // (directions * batch * heads * length))
    return [(i0, min(length, i0 + size)) for i0 in range(0, length, size)]


class _Attend(torch.autograd.Function):
    """Attention [B, H, L, d] in query chunks, with its reverse- and forward-mode rules
    written out (``_vjp``, ``_tangents``), for the plain form or (``local``) the
    straight-through one. The values are the same for both."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, mask, window, scaling, softcap, local):
        spans = _spans(q)
        return torch.cat([_chunk(q[:, :, i0:i1], k[:, :, :i1], v[:, :, :i1], _bias(mask, i0, i1, window, q), scaling, softcap)
                          for i0, i1 in spans], dim=2)  # fmt: skip

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, *settings = inputs
        ctx.save_for_forward(q, k, v)
        ctx.save_for_backward(q, k, v, output)
        ctx.settings = settings

    @staticmethod
    def jvp(ctx, dq, dk, dv, *_):
        return _Tangents.apply(*ctx.saved_tensors, dq, dk, dv, *ctx.settings)

    @staticmethod
    def backward(ctx, dout):
        return (*_vjp(*ctx.saved_tensors, dout, *ctx.settings), None, None, None, None, None)


def _vjp(q, k, v, out, dout, mask, window, scaling, softcap, local) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reverse-mode derivative of attention: the cotangents of q, k, v from that of its
    output, per query chunk (scores recomputed, never kept), with P = softmax(S):

        dP = dO V^T;  dS = P (dP - rowsum(dO * O)) (1 - tanh^2(S / softcap)) scaling
        dQ = dS K;    dK = dS^T Q;  dV = P^T dO
        (local: dK and dV on the diagonal only, dk_i = dS_ii q_i and dv_i = p_ii do_i)"""
    work = torch.promote_types(q.dtype, torch.float32)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i0, i1 in _spans(q):
        qc, kc, vc, g = q[:, :, i0:i1], k[:, :, :i1], v[:, :, :i1], dout[:, :, i0:i1]
        raw = torch.matmul(qc, kc.transpose(2, 3)) * scaling
        if softcap:
            cap = torch.tanh(raw / softcap)
            raw = cap * softcap
        p = torch.softmax(raw.to(work) + _bias(mask, i0, i1, window, q), dim=-1)
        dp = torch.matmul(g, vc.transpose(2, 3)).to(work)
        ds = p * (dp - (g * out[:, :, i0:i1]).sum(dim=-1, keepdim=True).to(work))
        if softcap:
            ds = ds * (1 - cap.square()).to(work)
        ds = (ds * scaling).to(q.dtype)
        dq[:, :, i0:i1] = torch.matmul(ds, kc)
        if local:
            dk[:, :, i0:i1] = ds[..., i0:].diagonal(dim1=-2, dim2=-1)[..., None] * qc
            dv[:, :, i0:i1] = p.diagonal(offset=i0, dim1=-2, dim2=-1)[..., None].to(v.dtype) * g
        else:
            dk[:, :, :i1] += torch.matmul(ds.transpose(2, 3), qc)
            dv[:, :, :i1] += torch.matmul(p.to(v.dtype).transpose(2, 3), g)
    return dq, dk, dv


class _Tangents(torch.autograd.Function):
    """The output tangents of ``_Attend`` from its input tangents; under vmap (directions),
    with the directions folded into the matmuls instead of the scores copied per direction."""

    @staticmethod
    def forward(q, k, v, dq, dk, dv, mask, window, scaling, softcap, local):
        one = [None if t is None else t[None] for t in (dq, dk, dv)]
        return _tangents(q, k, v, *one, mask, window, scaling, softcap, local)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, q, k, v, dq, dk, dv, mask, window, scaling, softcap, local):
        if any(d is not None for d in in_dims[:3]) or in_dims[6] is not None:
            raise CorrpoError("corrpo's attention: forward-mode directions must be the only batched dimension")

        def batched(t, dim):
            if t is None:
                return None
            return t.unsqueeze(0).expand(info.batch_size, *t.shape) if dim is None else t.movedim(dim, 0)

        tangents = [batched(t, d) for t, d in zip((dq, dk, dv), in_dims[3:6])]
        return _tangents(q, k, v, *tangents, mask, window, scaling, softcap, local), 0


def _tangents(q, k, v, dq, dk, dv, mask, window, scaling, softcap, local) -> torch.Tensor:
    """Forward-mode derivative of attention, for n directions at once: q, k, v [B, H, L, d]
    (heads repeated), their tangents [n, B, H, L, d] (None: zero); returns [n, B, H, L, d].
    Per query chunk (scores recomputed), with P = softmax(S) and O = P V:

        dS = scaling (dQ K^T + Q dK^T)   (local: Q dK^T on the diagonal only, q_i . dk_i)
        dS <- dS (1 - tanh^2(S / softcap))   with softcapping
        dP = P (dS - rowsum(P dS))
        dO = dP V + P dV                  (local: P dV is p_ii dv_i)

    The directions are folded into the rows or columns of each matmul, so P is never
    copied per direction."""
    n = next(t.shape[0] for t in (dq, dk, dv) if t is not None)
    batch, heads, _, d = q.shape
    work = torch.promote_types(q.dtype, torch.float32)
    pieces = []
    for i0, i1 in _spans(q, n):
        c = i1 - i0
        qc, kc, vc = q[:, :, i0:i1], k[:, :, :i1], v[:, :, :i1]
        raw = torch.matmul(qc, kc.transpose(2, 3)) * scaling
        if softcap:
            cap = torch.tanh(raw / softcap)
            raw = cap * softcap
        p = torch.softmax(raw.to(work) + _bias(mask, i0, i1, window, q), dim=-1)
        ds = torch.zeros((batch, heads, n, c, i1), dtype=q.dtype, device=q.device)
        if dq is not None:
            folded = dq[:, :, :, i0:i1].permute(1, 2, 0, 3, 4).reshape(batch, heads, n * c, d)
            ds += torch.matmul(folded, kc.transpose(2, 3)).view(batch, heads, n, c, i1)
        if dk is not None and local:
            own = (dk[:, :, :, i0:i1] * qc).sum(dim=-1).permute(1, 2, 0, 3)  # [B, H, n, c]
            ds[..., i0:].diagonal(dim1=-2, dim2=-1).add_(own)
        elif dk is not None:
            folded = dk[:, :, :, :i1].permute(1, 2, 4, 0, 3).reshape(batch, heads, d, n * i1)
            ds += torch.matmul(qc, folded).view(batch, heads, c, n, i1).transpose(2, 3)
        ds = ds.to(work) * scaling
        if softcap:
            ds *= (1 - cap.square()).to(work).unsqueeze(2)
        pn = p.unsqueeze(2)
        dp = (pn * (ds - (pn * ds).sum(dim=-1, keepdim=True))).to(v.dtype)
        do = torch.matmul(dp.reshape(batch, heads, n * c, i1), vc).view(batch, heads, n, c, d)
        pv = p.to(v.dtype)
        if dv is not None and local:
            own = dv[:, :, :, i0:i1].permute(1, 2, 0, 3, 4)  # [B, H, n, c, d]
            do += pv.diagonal(offset=i0, dim1=-2, dim2=-1)[:, :, None, :, None] * own
        elif dv is not None:
            folded = dv[:, :, :, :i1].permute(1, 2, 3, 0, 4).reshape(batch, heads, i1, n * d)
            do += torch.matmul(pv, folded).view(batch, heads, c, n, d).transpose(2, 3)
        pieces.append(do)
    return torch.cat(pieces, dim=3).permute(2, 0, 1, 3, 4)


def _configs(model: nn.Module) -> list:
    """Every distinct transformers config the model's modules read their attention
    implementation from."""
    found = {}
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            found[id(config)] = config
    return list(found.values())


@contextmanager
def swapped(model: nn.Module, blocks: int, local: bool) -> Iterator[None]:
    """The model's attention runs as corrpo's chunked attention inside (``local``: in the
    straight-through form); restored on exit. A forward inside that did not call it once per
    decoder block is an ``ArchitectureError`` (raised on exit): the model does not dispatch
    attention through transformers' interface."""
    global _called
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    name = LOCAL if local else CHUNKED
    AttentionInterface.register(name, partial(_attention, local=local))
    AttentionMaskInterface.register(name, sdpa_mask)
    configs = _configs(model)
    if not configs:
        raise ArchitectureError(
            f"{type(model).__name__}: no transformers config with an attention implementation; corrpo swaps "
            "attention through transformers' AttentionInterface"
        )
    before = [c._attn_implementation_internal for c in configs]
    outer, _called = _called, set()
    try:
        for c in configs:
            c._attn_implementation_internal = name
        yield
        if len(_called) != blocks:
            raise ArchitectureError(
                f"{type(model).__name__}: attention ran through transformers' AttentionInterface in {len(_called)} "
                f"of {blocks} decoder blocks; corrpo needs every block's attention swappable (config._attn_implementation): "
                "the local estimator to detach the other positions' keys and values, the jvp ones for forward-mode AD"
            )
    finally:
        _called = outer
        for c, value in zip(configs, before):
            c._attn_implementation_internal = value


def local_row(capture: Capture, ids: torch.Tensor, positions: torch.Tensor, objective: str, needs: Needs) -> dict[str, torch.Tensor]:
    """Local strengths of the tokens ``ids[positions]`` of one unpadded row ``ids`` [L], per
    block: one forward with the straight-through attention, one backward of the summed
    seeds to every recorded module output, and closed forms per row."""
    _, stats, norms = local_pass(capture, ids, positions, objective, needs)
    return {**stats.values(), **per_block(norms)}


def local_pass(capture: Capture, ids: torch.Tensor, positions: torch.Tensor, objective: str, needs: Needs):
    """``local_row``'s work: the head's input at the seeds' rows [S, d] (detached), the
    seeds' statistics, and the per-block norms."""
    arch = capture.arch
    seeds = len(positions)
    rows = positions - 1
    with torch.enable_grad():
        with swapped(capture.model, len(arch.blocks), local=True):
            h, logits = capture.forward(ids[None, : int(positions[-1])], rows)
        stats = row_stats(arch, h[0], logits, ids[positions], objective, capture.head_autocast)
        cot = torch.zeros_like(h)
        cot[0, torch.arange(seeds)] = stats.cotangent
        grads = iter(torch.autograd.grad(h, capture.outputs(), grad_outputs=cot, allow_unused=True))
    norms = [Norms.zeros(seeds, h.device) for _ in arch.blocks]
    for handler in capture.handlers:
        mine = [next(grads) for _ in handler.calls]
        if all(g is None for g in mine):
            continue  # its output does not reach the head: zero gradient
        mine = [torch.zeros_like(call.output) if g is None else g for call, g in zip(handler.calls, mine)]
        if isinstance(handler, LinearHandler) and len(handler.calls) == 1:
            a = handler.calls[0].args[0][0, rows]
            handler.row_terms(a, mine[0][0, rows], needs, norms[handler.block])
        else:
            _replayed_row_terms(handler, int(positions[-1]), rows, mine, needs, norms[handler.block])
    capture.reset()
    return h[0].detach(), stats, norms


def _position_axis(x: torch.Tensor, length: int, module: nn.Module) -> int:
    """The axis of a recorded input [1, ...] that runs over the ``length`` positions: the one
    of that size, or where several are (as many heads as positions), the outermost in
    memory, as transformers views heads out of [batch, position, width] activations (Gemma
    3's q_norm gets a [1, heads, positions, d] view of [1, positions, heads, d])."""
    sizes = [i for i in range(1, x.dim()) if x.shape[i] == length]
    if not sizes:
        raise ArchitectureError(f"{type(module).__name__}: no axis of its input {tuple(x.shape)} runs over the {length} positions")
    return max(sizes, key=lambda i: x.stride(i))


def _replayed_row_terms(
    handler, length: int, rows: torch.Tensor, grads: list[torch.Tensor], needs: Needs, into: Norms
) -> None:
    """A module that acts row by row (norms; a projection called more than once): each
    row's parameter gradient is the vjp of the module replayed on that row alone, batched
    over rows by vmap, in slabs of rows that bound the memory of the per-row gradients."""
    module = handler.module
    params = dict(module.named_parameters(recurse=False))
    width = sum(p.numel() for p in params.values())
    per = max(1, ROW_ELEMENTS // max(1, width))
    for s0 in range(0, len(rows), per):
        picked = rows[s0 : s0 + per]
        total: dict[str, torch.Tensor] | None = None
        for call, g in zip(handler.calls, grads):

            x = call.args[0]
            axis = _position_axis(x, length, module)

            def one_row(xr: torch.Tensor, gr: torch.Tensor, call=call, axis=axis) -> dict[str, torch.Tensor]:
                def replay(p: dict[str, torch.Tensor]) -> torch.Tensor:
                    return functional_call(module, p, (xr.unsqueeze(axis), *call.args[1:]), call.kwargs)

                _, pullback = vjp(replay, params)
                return pullback(gr.unsqueeze(axis))[0]

            per_row = vmap(one_row)(x.movedim(axis, 0)[picked], g.movedim(axis, 0)[picked])
            total = per_row if total is None else {k: total[k] + per_row[k] for k in total}
        part = Norms.zeros(len(picked), rows.device)
        for value in total.values():
            flat = value.reshape(value.shape[0], -1).to(torch.promote_types(value.dtype, torch.float32))
            if needs.l1:
                part.l1 += flat.abs().sum(dim=1).double()
            if needs.sq:
                part.sq += flat.square().sum(dim=1).double()
        if needs.nuclear and handler.parts:
            weight = total["weight"].transpose(1, 2) if is_conv1d(module) else total["weight"]
            for part_rows in handler.parts:
                part.nuclear += nuclear(weight if part_rows is None else weight[:, part_rows.to(weight.device)])
        into.l1[s0 : s0 + per] += part.l1
        into.sq[s0 : s0 + per] += part.sq
        into.nuclear[s0 : s0 + per] += part.nuclear
