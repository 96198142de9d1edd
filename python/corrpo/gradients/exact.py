"""The exact measure: one backward seed per token, batched.

Seeds are taken in chunks, in position order. A chunk runs one forward over the prefix
its last token needs (causal: the prefix's activations are the full sequence's), then ONE
batched backward (``is_grads_batched``: vmap over the autograd graph) from the seeds'
cotangents on the LM head's input to every recorded module output of the blocks. Each
handler turns its [S, P, d_out] backprops and recorded [P, d_in] input into per-seed
norms. Memory is bounded by the chunk: S x P x (module widths), never by the number of
tokens scored.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .architecture import is_conv1d
from .capture import Capture
from .handlers import Needs, Norms
from .seeds import row_stats

#: Backprops kept per chunk when ``chunk_size`` is not given: about 1 GiB of f32.
CHUNK_ELEMENTS = 256 * 2**20


def auto_chunk(capture: Capture, length: int) -> int:
    """Seeds per chunk so that the backprops of one chunk stay near CHUNK_ELEMENTS."""
    width = sum(_out_width(h.module) for h in capture.handlers) or 1
    return int(max(1, min(64, CHUNK_ELEMENTS // (width * max(1, length)))))


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
    size = chunk_size or auto_chunk(capture, int(positions.max()) if len(positions) else 1)
    # As many chunks as the size needs, evened out: each chunk pays one forward.
    size = -(-len(positions) // -(-len(positions) // size))
    pieces: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(positions), size):
        chunk = positions[start : start + size]
        seeds = len(chunk)
        with torch.enable_grad():
            h, logits = capture.forward(ids[None, : int(chunk[-1])], chunk - 1)
            targets = ids[chunk]
            stats = row_stats(arch, h[0], logits, targets, objective)
            cot = torch.zeros((seeds, *h.shape), dtype=h.dtype, device=h.device)
            cot[torch.arange(seeds), 0, torch.arange(seeds)] = stats.cotangent
            outputs = capture.outputs()
            grads = torch.autograd.grad(h, outputs, grad_outputs=cot, is_grads_batched=True, allow_unused=True)
        norms = [Norms.zeros(seeds, h.device) for _ in range(n_blocks)]
        given = iter(grads)
        for handler in capture.handlers:
            # A module whose output does not reach the head (unused) has zero gradient.
            mine = [_or_zeros(next(given), call.output, seeds) for call in handler.calls]
            handler.accumulate(mine, needs, norms[handler.block])
        del grads, outputs
        capture.reset()
        pieces.append(
            {
                "entropy_bits": stats.entropy_bits,
                "logit_grad": stats.logit_grad,
                "hidden_norm": stats.hidden_norm,
                "l1": torch.stack([n.l1 for n in norms], dim=1),
                "sq": torch.stack([n.sq for n in norms], dim=1),
                "nuclear": torch.stack([n.nuclear for n in norms], dim=1),
            }
        )
        if progress is not None:
            progress(seeds)
    return {key: torch.cat([p[key] for p in pieces]) for key in pieces[0]}
