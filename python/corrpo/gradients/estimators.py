"""Cheaper stand-ins for the exact measure, for online use (SPEC 3, "Estimators").

Every function scores the tokens ``ids[positions]`` of one unpadded row and returns the
same keys as ``exact.exact_row``. (``subsample`` is the exact measure on a seeded subset of
positions and lives in the dispatcher.)

- ``logits_row``: one forward; the logit-space statistics only.
- ``last_block_row``: one forward and one backward of the summed seeds, cut at the top
  block. Each linear weight W of that block gets the rank-1 term of its gradient at the
  token's own row j = t-1, ``g_j a_j^T``: its L1 is ``|g_j|_1 |a_j|_1``, its nuclear and
  Frobenius norms ``|g_j|_2 |a_j|_2``; a bias gets its row term g_j. For the projections
  only row j feeds (q, o, the MLP) that term is the token's exact gradient; k and v also
  collect later tokens' gradients, so for them it is an approximation. (``local`` takes
  the same terms in every block, with attention made row-local: ``gradients.local``.)
- ``jvp_row``: forward-mode derivatives of every seed of the row at once along k random
  directions v over all block parameters. Gaussian v: ``E[(J_t v)^2] = |J_t|_F^2``, so the
  mean of k squares is an unbiased estimate of ``frobenius^2`` for every token. Cauchy v
  (1-stable): ``J_t v`` is Cauchy with scale ``|J_t|_1``, so the median of k values of
  ``|J_t v|`` estimates the L1 norm (Indyk's stable sketch), and ``l1_mean`` is it over
  the number of blocks. The passes run the model's body only (a seed's derivative is its
  cotangent on the head's input dotted with that input's tangent) with corrpo's chunked
  causal attention, whose forward-mode rule folds the directions into its matmuls
  (``gradients.local``): a direction costs about two forwards (the tangents of x W^T are
  dx W^T and x dW^T), plus the primal forward shared by a group of directions.
- ``jvp_cv_row``: ``frobenius^2`` as the local estimate's (exact for the local Jacobian L_t)
  plus the mean over k orthogonal Gaussian directions of ``(J_t v)^2 - (L_t v)^2``:
  unbiased, with the variance of the difference; two forward-mode passes per direction.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, jvp, vmap

from .architecture import ArchitectureError
from .capture import Capture
from .handlers import LinearHandler, Needs, Norms
from .local import local_pass, swapped
from .seeds import row_stats

#: Random tangents held at once by the jvp estimator, in elements (1 GiB of f32).
TANGENT_ELEMENTS = 256 * 2**20


def _stats(capture: Capture, ids: torch.Tensor, positions: torch.Tensor, objective: str, graph: bool = True):
    """One forward of the row's prefix: the head's input at the seeds' rows [1, S, d] (in
    the autograd graph when ``graph``) and the seeds' statistics."""
    with torch.set_grad_enabled(graph):
        h, logits = capture.forward(ids[None, : int(positions[-1])], positions - 1)
        return h, row_stats(capture.arch, h[0], logits, ids[positions], objective, capture.head_autocast)


def logits_row(capture: Capture, ids: torch.Tensor, positions: torch.Tensor, objective: str) -> dict[str, torch.Tensor]:
    _, stats = _stats(capture, ids, positions, objective)
    capture.reset()
    return stats.values()


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
    norms = Norms.zeros(seeds, h.device)
    for handler, g in zip(linears, grads):
        if g is not None:
            handler.row_terms(handler.calls[-1].args[0][0, rows], g[0, rows], Needs(True, True, True), norms)
    capture.reset()
    return {**stats.values(), "l1": norms.l1[:, None], "sq": norms.sq[:, None], "nuclear": norms.nuclear[:, None]}


def _seeds_along(capture: Capture, ids: torch.Tensor, positions: torch.Tensor, head_input: torch.Tensor, cotangent: torch.Tensor):
    """The decoder blocks' parameters (detached), and a function of tangents (name -> [n,
    *shape]) giving the derivatives [n, tokens] of every seed of the row along those n
    directions, batched by vmap: the primal forward is shared by the n directions, and the
    tangent work runs as batched matmuls.

    A seed is a function of its row of the head's input h alone, so its derivative along v
    is ``cotangent . (dh along v)``: the passes stop at the model's body (``base_model``)
    and never form the vocabulary-wide logits or their tangents. ``head_input`` [S, d]: h
    at the seeds' rows in the model's own forward, which the body's output must reproduce."""
    model = capture.model
    body = getattr(model, "base_model", None)
    if not isinstance(body, torch.nn.Module) or body is model:
        raise ArchitectureError(f"{type(model).__name__}: no base_model (the body under the LM head) to run forward-mode passes on")
    block_ids = {id(p) for block in capture.arch.blocks for p in block.parameters()}
    params = {n: p.detach() for n, p in body.named_parameters() if id(p) in block_ids}
    prefix = ids[None, : int(positions[-1])]
    rows = positions - 1
    checked = False
    # The passes run the body without the forward's autocast and with another attention
    # kernel: in reduced precision h differs by rounding that grows through the blocks
    # (bf16 on a tiny Llama: 1.4% of its largest entry). A body whose output is not the
    # head's input (a final norm outside it) differs by about the entries' own size.
    reduced = [d for d in (capture.head_autocast, head_input.dtype, next(iter(params.values())).dtype) if d in (torch.float16, torch.bfloat16)]
    tolerance = max([1e-2] + [8 * torch.finfo(d).eps for d in reduced])

    def hidden(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(body, p, (prefix,), {"use_cache": False}, strict=False)[0][0, rows]

    def along(tangents: dict[str, torch.Tensor]) -> torch.Tensor:
        nonlocal checked
        h, dh = vmap(lambda t: jvp(hidden, (params,), (t,)), out_dims=(None, 0))(tangents)
        if not checked:
            scale = head_input.abs().amax().float().clamp(min=1.0)
            if h.shape != head_input.shape or (h.float() - head_input.float()).abs().amax() > tolerance * scale:
                raise ArchitectureError(
                    f"{type(model).__name__}: the output of its base_model is not the LM head's input; "
                    "the forward-mode estimators cannot seed from it"
                )
            checked = True
        return (dh.to(cotangent.dtype) * cotangent).sum(dim=-1).double()

    return params, along


def _group(k: int, params: dict[str, torch.Tensor]) -> int:
    """Directions per vmap group: a group's tangents cost group x (block parameters)
    floats, held under TANGENT_ELEMENTS."""
    size = sum(p.numel() for p in params.values())
    return max(1, min(k, TANGENT_ELEMENTS // max(1, size)))


def orthogonal_gaussian(n: int, params: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """n directions over the parameters, each exactly N(0, I), orthogonal to one another
    within every parameter tensor (so over all of them): per tensor, n Gaussian rows G are
    orthonormalized by a QR, in blocks of at most the tensor's size, and each row gets back
    its own length |G_i|. The orthonormal rows are uniform on the sphere whatever the
    lengths (G's R factor, which holds the lengths, is unchanged by rotating G), so each
    direction is a uniform unit vector times an independent chi length: Gaussian, and
    E[(a.v)^2] = |a|^2 stays exact for every a."""
    out = {}
    for name, p in params.items():
        g = torch.randn((n, p.numel()), generator=generator)
        for r0 in range(0, n, p.numel()):
            block = g[r0 : r0 + p.numel()]
            q = torch.linalg.qr(block.T).Q.T  # [rows, numel], orthonormal rows
            g[r0 : r0 + p.numel()] = q * block.norm(dim=1, keepdim=True)
        out[name] = g.reshape(n, *p.shape).to(p.device, p.dtype)
    return out


def jvp_row(
    capture: Capture,
    ids: torch.Tensor,
    positions: torch.Tensor,
    objective: str,
    needs: Needs,
    k: int,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    h, stats = _stats(capture, ids, positions, objective, graph=False)
    capture.reset()
    params, along = _seeds_along(capture, ids, positions, h[0], stats.cotangent)
    group = _group(k, params)
    blocks = len(capture.arch.blocks)

    def directions(draw) -> torch.Tensor:
        """[k, tokens]: the seeds' derivatives along k directions drawn by ``draw``."""
        out = []
        for start in range(0, k, group):
            n = min(group, k - start)
            tangents = {name: draw((n, *p.shape)).to(p.device, p.dtype) for name, p in params.items()}
            out.append(along(tangents))
        return torch.cat(out)

    result = stats.values()
    capture.recording = False
    try:
        with torch.no_grad(), swapped(capture.model, blocks, local=False):
            if needs.sq:
                gauss = directions(lambda shape: torch.randn(shape, generator=generator))
                result["sq"] = gauss.square().mean(dim=0)[:, None]
            if needs.l1:
                # Cauchy by inversion: tan(pi (u - 1/2)).
                cauchy = directions(lambda shape: torch.tan(torch.pi * (torch.rand(shape, generator=generator) - 0.5)))
                result["l1"] = (cauchy.abs().median(dim=0).values / blocks)[:, None]
    finally:
        capture.recording = True
    return result


def jvp_cv_row(
    capture: Capture,
    ids: torch.Tensor,
    positions: torch.Tensor,
    objective: str,
    k: int,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """frobenius^2 of every token as ``|L_t|_F^2 + mean_k [(J_t v)^2 - (L_t v)^2]``: L_t the
    local Jacobian (``gradients.local``; its square known exactly from one forward and one
    backward), J_t the full one, v orthogonal Gaussian directions. Unbiased, as
    E[(J v)^2 - (L v)^2] = |J|^2 - |L|^2; the variance is that of the difference, small
    where the local gradient is close to the full one. A negative estimate (possible when
    k is small and L is far from J) is reported as 0."""
    h, stats, norms = local_pass(capture, ids, positions, objective, Needs(l1=False, sq=True, nuclear=False))
    params, along = _seeds_along(capture, ids, positions, h, stats.cotangent)
    group = _group(k, params)
    blocks = len(capture.arch.blocks)
    excess = torch.zeros(len(positions), dtype=torch.float64, device=ids.device)
    capture.recording = False
    try:
        with torch.no_grad():
            for start in range(0, k, group):
                tangents = orthogonal_gaussian(min(group, k - start), params, generator)
                with swapped(capture.model, blocks, local=False):
                    full = along(tangents)
                with swapped(capture.model, blocks, local=True):
                    own = along(tangents)
                excess += (full.square() - own.square()).sum(dim=0)
    finally:
        capture.recording = True
    sq = (sum(n.sq for n in norms) + excess / k).clamp(min=0)
    return {**stats.values(), "sq": sq[:, None]}
