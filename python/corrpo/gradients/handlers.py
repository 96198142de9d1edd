"""Per-seed norms of one module's parameter gradient, from what its forward saw and what
its output received in a batched backward (one handler per layer type, as Opacus does).

A seed s's gradient of a linear layer's weight is ``G_s^T A``: A [P, d_in] the layer's
input over the prefix (the same for every seed of a chunk), G_s [P, d_out] the seed's
backprop at its output. Norms are taken without ever forming more than a bounded slab of
those [S, d_out, d_in] products:

- L1 (no factorized form exists) materializes them, a memory-bounded slab at a time;
- the squared Frobenius norm comes from the slab when it is formed, else from the two
  P x P Grams, ``<G G^T, A A^T>`` (ghost norm);
- the nuclear norm of a q/k/v/o part goes through a thin QR of A: ``A^T = Q R`` gives
  ``sigma(G^T A) = sigma(R G)``, a [min(P, d_in), d_part] matrix per seed.

Anything else with parameters (norm weights, biases of exotic layers) goes through
``torch.func.vjp`` of the module replayed on its recorded input: exact for any layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from .architecture import is_conv1d

#: Largest slab of materialized per-seed weight gradients, in elements (256 MiB of f32).
SLAB_ELEMENTS = 64 * 2**20


@dataclass
class Call:
    """One forward call of a module: its inputs (detached) and its output (in the graph)."""

    args: tuple
    kwargs: dict
    output: torch.Tensor


@dataclass
class Norms:
    """Per-seed sums for one block: L1, squared Frobenius, nuclear norms of q/k/v/o."""

    l1: torch.Tensor
    sq: torch.Tensor
    nuclear: torch.Tensor

    @classmethod
    def zeros(cls, seeds: int, device: torch.device) -> Norms:
        z = torch.zeros(seeds, dtype=torch.float64, device=device)
        return cls(z.clone(), z.clone(), z.clone())


def per_block(norms: list[Norms]) -> dict[str, torch.Tensor]:
    """Per-block sums as the estimators return them: [S, blocks] per kind of norm."""
    return {key: torch.stack([getattr(n, key) for n in norms], dim=1) for key in ("l1", "sq", "nuclear")}


@dataclass
class Needs:
    l1: bool
    sq: bool
    nuclear: bool


@dataclass
class Handler:
    """A module of a block with parameters of its own, and the calls recorded for it."""

    module: nn.Module
    block: int
    parts: list[torch.Tensor | None] = field(default_factory=list)  # q/k/v/o row sets
    calls: list[Call] = field(default_factory=list)

    def accumulate(self, grads: list[torch.Tensor], needs: Needs, into: Norms) -> None:
        raise NotImplementedError


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class LinearHandler(Handler):
    """``nn.Linear`` (weight [out, in]) and GPT-2's ``Conv1D`` (weight [in, out]): the norms
    are the same for a matrix and its transpose, so both are G^T A."""

    def accumulate(self, grads: list[torch.Tensor], needs: Needs, into: Norms) -> None:
        if len(self.calls) != 1:
            # A projection called twice per forward sums two products: form them.
            return _generic(self, grads, needs, into, parts=self.parts)
        a = self.calls[0].args[0]
        dtype = _work_dtype(a)
        a = a.reshape(-1, a.shape[-1]).to(dtype)  # [P, d_in]
        g = grads[0].reshape(grads[0].shape[0], -1, grads[0].shape[-1]).to(dtype)  # [S, P, d_out]
        seeds, _, d_out = g.shape
        d_in = a.shape[1]
        bias = getattr(self.module, "bias", None)
        if bias is not None:
            gb = g.sum(dim=1)
            if needs.l1:
                into.l1 += gb.abs().sum(dim=1).double()
            if needs.sq:
                into.sq += gb.square().sum(dim=1).double()
        if needs.l1:
            rows = max(1, min(d_out, SLAB_ELEMENTS // max(1, d_in)))
            per = max(1, SLAB_ELEMENTS // (rows * d_in))
            for s0 in range(0, seeds, per):
                for r0 in range(0, d_out, rows):
                    slab = torch.matmul(g[s0 : s0 + per, :, r0 : r0 + rows].transpose(1, 2), a)
                    into.l1[s0 : s0 + per] += torch.linalg.vector_norm(slab, 1, dim=(1, 2)).double()
                    if needs.sq:
                        into.sq[s0 : s0 + per] += slab.square().sum(dim=(1, 2)).double()
        elif needs.sq:
            into.sq += (torch.matmul(g, g.transpose(1, 2)) * (a @ a.T)).sum(dim=(1, 2)).double()
        if needs.nuclear and self.parts:
            # A^T = Q R: sigma(G^T A) = sigma(G^T R^T Q^T) = sigma(R G).
            r = torch.linalg.qr(a.T, mode="r").R  # [min(P, d_in), P]
            rg = torch.matmul(r, g)  # [S, min(P, d_in), d_out]
            for rows in self.parts:
                into.nuclear += nuclear(rg if rows is None else rg[:, :, rows.to(rg.device)])


    def row_terms(self, a: torch.Tensor, g: torch.Tensor, needs: Needs, into: Norms) -> None:
        """Adds the norms of rank-one gradients, each seed s's formed at its own row: ``g_s
        a_s^T`` for the weight (L1 ``|g_s|_1 |a_s|_1``, Frobenius and the nuclear norm of
        each q/k/v/o part ``|g_s[part]|_2 |a_s|_2``) and ``g_s`` for the bias. ``a`` [S, d_in]:
        the layer's input rows, ``g`` [S, d_out]: the backprops at its output rows."""
        a = a.to(torch.float64)
        g = g.to(torch.float64)
        a2 = a.norm(dim=1)
        if needs.l1:
            into.l1 += g.abs().sum(dim=1) * a.abs().sum(dim=1)
        if needs.sq:
            into.sq += g.square().sum(dim=1) * a2.square()
        if getattr(self.module, "bias", None) is not None:
            if needs.l1:
                into.l1 += g.abs().sum(dim=1)
            if needs.sq:
                into.sq += g.square().sum(dim=1)
        if needs.nuclear:
            for rows in self.parts:
                into.nuclear += (g if rows is None else g[:, rows.to(g.device)]).norm(dim=1) * a2


class GenericHandler(Handler):
    """Any other module with parameters: the vjp of its replayed forward with respect to
    its own parameters, batched over seeds."""

    def accumulate(self, grads: list[torch.Tensor], needs: Needs, into: Norms) -> None:
        _generic(self, grads, needs, into, parts=self.parts)


def nuclear(m: torch.Tensor) -> torch.Tensor:
    """Nuclear norms of a batch of matrices [S, r, c], by an SVD in float64. (The square
    roots of a Gram's eigenvalues would be cheaper, but turn the rounding noise of its zero
    eigenvalues into sqrt(eps) * sigma_max per missing rank: per-token gradients are low-rank.)"""
    return torch.linalg.svdvals(m.double()).sum(dim=1)


def _generic(handler: Handler, grads: list[torch.Tensor], needs: Needs, into: Norms, parts: list) -> None:
    module = handler.module
    params = dict(module.named_parameters(recurse=False))
    total: dict[str, torch.Tensor] | None = None
    for call, g in zip(handler.calls, grads):

        def replay(p: dict[str, torch.Tensor], call: Call = call) -> torch.Tensor:
            return functional_call(module, p, call.args, call.kwargs)

        _, pullback = vjp(replay, params)
        (per_seed,) = vmap(pullback)(g)
        total = per_seed if total is None else {k: total[k] + per_seed[k] for k in total}
    if total is None:
        return
    for name, value in total.items():
        value = value.to(_work_dtype(value))
        flat = value.reshape(value.shape[0], -1)
        if needs.l1:
            into.l1 += flat.abs().sum(dim=1).double()
        if needs.sq:
            into.sq += flat.square().sum(dim=1).double()
    if needs.nuclear and parts:
        weight = total["weight"].to(_work_dtype(total["weight"]))
        if is_conv1d(module):
            weight = weight.transpose(1, 2)
        for rows in parts:
            into.nuclear += nuclear(weight if rows is None else weight[:, rows.to(weight.device)])
