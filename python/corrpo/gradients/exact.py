"""The exact measure: one backward seed per token, batched.

Seeds are taken in chunks, in position order. A chunk runs one forward over the prefix
its last token needs (causal: the prefix's activations are the full sequence's), then ONE
batched backward (``is_grads_batched``: vmap over the autograd graph) from the seeds'
cotangents on the LM head's input to every recorded module output of the blocks. Each
handler turns its [S, P, d_out] backprops and recorded [P, d_in] input into per-seed
norms. Memory is bounded by the chunk: S x P x (module widths), never by the number of
tokens scored.

On long prefixes (thousands of tokens) even one seed's backprops at every module of every
block outgrow that bound (SmolLM2 at 8k tokens: 5.6 GB). The backward then goes block by
block, top down: from the cotangent on the head's input to the top block's module outputs
and its input hidden states, then from those to the next block's, and so on; only one
block's backprops are held at a time. This relies on the blocks talking to each other only
through their hidden states, as the decoder stacks corrpo supports do; tests hold the two
paths to each other.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .architecture import ArchitectureError, is_conv1d
from .capture import Capture
from .handlers import Needs, Norms, per_block
from .seeds import row_stats

#: Backprops kept per chunk when ``chunk_size`` is not given: about 1 GiB of f32.
CHUNK_ELEMENTS = 256 * 2**20


def plan(capture: Capture, length: int, chunk_size: int | None) -> tuple[int, bool]:
    """Seeds per chunk, and whether the backward goes block by block: whole when one chunk's
    backprops at every block stay near CHUNK_ELEMENTS, else block by block, with the chunk
    sized to the widest block."""
    widths: dict[int, int] = {}
    for h in capture.handlers:
        widths[h.block] = widths.get(h.block, 0) + _out_width(h.module)
    length = max(1, length)
    whole = sum(widths.values()) or 1
    staged = whole * length > CHUNK_ELEMENTS
    width = max(widths.values(), default=1) if staged else whole
    return chunk_size or int(max(1, min(64, CHUNK_ELEMENTS // (width * length)))), staged


def _out_width(module: torch.nn.Module) -> int:
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() < 2:
        return sum(p.numel() for p in module.parameters(recurse=False))
    return weight.shape[1] if is_conv1d(module) else weight.shape[0]


def _or_zeros(grad: torch.Tensor | None, output: torch.Tensor, seeds: int) -> torch.Tensor:
    if grad is not None:
        return grad
    return torch.zeros((seeds, *output.shape), dtype=output.dtype, device=output.device)


def exact_row(
    capture: Capture,
    ids: torch.Tensor,
    positions: torch.Tensor,
    objective: str,
    needs: Needs,
    n_blocks: int,
    chunk_size: int | None,
    progress: Callable[[int], None] | None,
) -> dict[str, torch.Tensor]:
    """Exact strengths of the tokens ``ids[positions]`` of one unpadded row ``ids`` [L]."""
    arch = capture.arch
    size, staged = plan(capture, int(positions.max()) if len(positions) else 1, chunk_size)
    # As many chunks as the size needs, evened out: each chunk pays one forward.
    size = -(-len(positions) // -(-len(positions) // size))
    pieces: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(positions), size):
        chunk = positions[start : start + size]
        seeds = len(chunk)
        with torch.enable_grad():
            h, logits = capture.forward(ids[None, : int(chunk[-1])], chunk - 1)
            targets = ids[chunk]
            stats = row_stats(arch, h[0], logits, targets, objective, capture.head_autocast)
            cot = torch.zeros((seeds, *h.shape), dtype=h.dtype, device=h.device)
            cot[torch.arange(seeds), 0, torch.arange(seeds)] = stats.cotangent
            norms = [Norms.zeros(seeds, h.device) for _ in range(n_blocks)]
            if staged:
                _backward_by_block(capture, h, cot, needs, norms)
            else:
                _backward(capture.handlers, h, cot, [], needs, norms)
        capture.reset()
        pieces.append({**stats.values(), **per_block(norms)})
        if progress is not None:
            progress(seeds)
    return {key: torch.cat([p[key] for p in pieces]) for key in pieces[0]}


def _backward(
    handlers: list,
    top: torch.Tensor,
    cot: torch.Tensor,
    also: list[torch.Tensor],
    needs: Needs,
    norms: list[Norms],
) -> list[torch.Tensor | None]:
    """One batched backward from ``top`` (cotangents ``cot`` [S, *top.shape]) to the outputs
    of ``handlers``' recorded calls and to the tensors ``also``; accumulates the handlers'
    norms and returns the backprops at ``also``."""
    seeds = cot.shape[0]
    outputs = [call.output for handler in handlers for call in handler.calls]
    grads = torch.autograd.grad(
        top, outputs + also, grad_outputs=cot, is_grads_batched=True, allow_unused=True, retain_graph=bool(also)
    )
    given = iter(grads[: len(outputs)])
    for handler in handlers:
        # A module whose output does not reach the head (unused) has zero gradient.
        mine = [_or_zeros(next(given), call.output, seeds) for call in handler.calls]
        handler.accumulate(mine, needs, norms[handler.block])
    return list(grads[len(outputs) :])


def _backward_by_block(capture: Capture, h: torch.Tensor, cot: torch.Tensor, needs: Needs, norms: list[Norms]) -> None:
    top, upper = h, cot
    order = sorted(capture.blocks, reverse=True)
    for i, b in enumerate(order):
        below = capture.block_inputs.get(b)
        last = i == len(order) - 1
        if not last and (below is None or not below.requires_grad):
            raise ArchitectureError(f"{capture.arch.block_names[b]}: its input hidden states were not seen in the forward")
        handlers = [hd for hd in capture.handlers if hd.block == b]
        grads = _backward(handlers, top, upper, [] if last else [below], needs, norms)
        if last:
            break
        top, upper = below, _or_zeros(grads[0], below, cot.shape[0])
