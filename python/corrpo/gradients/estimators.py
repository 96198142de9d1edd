"""Cheaper stand-ins for the exact measure, for online use (SPEC 3, "Estimators").

Every function scores the tokens ``ids[positions]`` of one unpadded row and returns the
same keys as ``exact.exact_row``. (``subsample`` is the exact measure on a seeded subset of
positions and lives in the dispatcher.)

- ``logits_row``: one forward; the logit-space statistics only.
- ``last_block_row``: one forward and one backward of the summed seeds, cut at the top
  block. Each linear weight W of that block gets the rank-1 term of its gradient at the
  token's own row j = t-1, ``g_j a_j^T``: its L1 is ``|g_j|_1 |a_j|_1``, its nuclear and
  Frobenius norms ``|g_j|_2 |a_j|_2``. For the projections only row j feeds (q, o, the MLP)
  that term is the token's exact gradient; k and v also collect later tokens' gradients,
  so for them it is an approximation.
- ``jvp_row``: forward-mode derivatives of every seed of the row at once along k random
  directions v over all block parameters. Gaussian v: ``E[(J_t v)^2] = |J_t|_F^2``, so the
  mean of k squares is an unbiased estimate of ``frobenius^2`` for every token. Cauchy v
  (1-stable): ``J_t v`` is Cauchy with scale ``|J_t|_1``, so the median of k values of
  ``|J_t v|`` estimates the L1 norm (Indyk's stable sketch), and ``l1_mean`` is it over
  the number of blocks.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .capture import Capture
from .handlers import LinearHandler, Needs
from .seeds import row_stats, seed_values

#: Random tangents held at once by the jvp estimator, in elements (1 GiB of f32).
TANGENT_ELEMENTS = 256 * 2**20


def _stats(capture: Capture, ids: torch.Tensor, positions: torch.Tensor, objective: str):
    with torch.enable_grad():
        h, logits = capture.forward(ids[None, : int(positions[-1])], positions - 1)
        return h, row_stats(capture.arch, h[0], logits, ids[positions], objective)


def _base(stats) -> dict[str, torch.Tensor]:
    return {"entropy_bits": stats.entropy_bits, "logit_grad": stats.logit_grad, "hidden_norm": stats.hidden_norm}


def logits_row(capture: Capture, ids: torch.Tensor, positions: torch.Tensor, objective: str) -> dict[str, torch.Tensor]:
    _, stats = _stats(capture, ids, positions, objective)
    capture.reset()
    return _base(stats)


def last_block_row(capture: Capture, ids: torch.Tensor, positions: torch.Tensor, objective: str) -> dict[str, torch.Tensor]:
    h, stats = _stats(capture, ids, positions, objective)
    seeds = len(positions)
    with torch.enable_grad():
        cot = torch.zeros_like(h)
        cot[0, torch.arange(seeds)] = stats.cotangent
        linears = [hd for hd in capture.handlers if isinstance(hd, LinearHandler)]
        outputs = [hd.calls[-1].output for hd in linears]
        grads = torch.autograd.grad(h, outputs, grad_outputs=cot, allow_unused=True)
    rows = positions - 1
    dtype = torch.float64
    l1 = torch.zeros(seeds, dtype=dtype, device=h.device)
    sq = torch.zeros_like(l1)
    nuclear = torch.zeros_like(l1)
    for handler, g in zip(linears, grads):
        if g is None:
            continue
        a = handler.calls[-1].args[0][0, rows].to(dtype)  # [S, d_in]
        g = g[0, rows].to(dtype)  # [S, d_out]
        a1, a2 = a.abs().sum(dim=1), a.norm(dim=1)
        l1 += g.abs().sum(dim=1) * a1
        sq += g.square().sum(dim=1) * a2.square()
        for part in handler.parts:
            gp = g if part is None else g[:, part.to(g.device)]
            nuclear += gp.norm(dim=1) * a2
    capture.reset()
    return {**_base(stats), "l1": l1[:, None], "sq": sq[:, None], "nuclear": nuclear[:, None]}


def jvp_row(
    capture: Capture,
    ids: torch.Tensor,
    positions: torch.Tensor,
    objective: str,
    needs: Needs,
    k: int,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    _, stats = _stats(capture, ids, positions, objective)
    capture.reset()
    model = capture.model
    names = [f"{name}." for name in capture.arch.block_names]
    params = {n: p.detach() for n, p in model.named_parameters() if any(n.startswith(b) for b in names)}
    prefix = ids[None, : int(positions[-1])]
    targets = ids[positions]

    rows = positions - 1
    kwargs = {"use_cache": False, "logits_to_keep": rows} if capture.keeps_logits else {"use_cache": False}

    def seeds(p: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = functional_call(model, p, (prefix,), kwargs, strict=False).logits[0]
        return seed_values(logits if len(logits) == len(rows) else logits[rows], targets, objective)

    # Directions go through vmap in groups: the primal forward is shared by a group, and
    # the tangent work runs as batched matmuls. A group's tangents cost group x (block
    # parameters) floats, held under TANGENT_ELEMENTS.
    size = sum(p.numel() for p in params.values())
    group = max(1, min(k, TANGENT_ELEMENTS // max(1, size)))
    along = vmap(lambda tangents: jvp(seeds, (params,), (tangents,))[1])

    def directions(draw) -> torch.Tensor:
        """[k, tokens]: the seeds' derivatives along k directions drawn by ``draw``."""
        out = []
        for start in range(0, k, group):
            n = min(group, k - start)
            tangents = {name: draw((n, *p.shape)).to(p.device, p.dtype) for name, p in params.items()}
            out.append(along(tangents).double())
        return torch.cat(out)

    result = _base(stats)
    # Forward-mode AD has no rule for the fused SDPA kernels; the math backend has one.
    capture.recording = False
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            if needs.sq:
                gauss = directions(lambda shape: torch.randn(shape, generator=generator))
                result["sq"] = gauss.square().mean(dim=0)[:, None]
            if needs.l1:
                # Cauchy by inversion: tan(pi (u - 1/2)).
                cauchy = directions(lambda shape: torch.tan(torch.pi * (torch.rand(shape, generator=generator) - 0.5)))
                blocks = len(capture.arch.blocks)
                result["l1"] = (cauchy.abs().median(dim=0).values / blocks)[:, None]
    finally:
        capture.recording = True
    return result
