"""Where a causal LM keeps its decoder blocks and their attention projections.

The measures of SPEC 3 are sums over decoder blocks; ``nuclear_qkvo`` also needs the q, k,
v and o weight matrices of each block, split out of fused projections. Layouts are found
by module name, one small entry per family, so an unknown architecture is a clear error
rather than a silently different measure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CorrpoError


class ArchitectureError(CorrpoError):
    """A model whose decoder blocks, attention projections or LM head cannot be found."""


@dataclass(frozen=True)
class Part:
    """One of q, k, v, o: the output rows of a projection's weight that belong to it
    (``rows=None``: all of them). Weights are [out, in] (``nn.Linear``) or [in, out]
    (GPT-2's ``Conv1D``, ``transposed``)."""

    name: str
    module: str
    rows: torch.Tensor | None = None


@dataclass(frozen=True)
class Layout:
    family: str
    parts: tuple[Part, ...]


def _separate(block: nn.Module) -> tuple[Part, ...] | None:
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    for prefix in ("self_attn", "attn", "attention"):
        found = [f"{prefix}.{n}" for n in names]
        if all(_get(block, path) is not None for path in found):
            return tuple(Part(n[0], path) for n, path in zip(names, found))
    return None


def _gpt2(block: nn.Module) -> tuple[Part, ...] | None:
    fused, out = _get(block, "attn.c_attn"), _get(block, "attn.c_proj")
    if fused is None or out is None:
        return None
    width = _out_features(fused)
    if width % 3:
        raise ArchitectureError(f"attn.c_attn has {width} outputs, not three equal q, k, v parts")
    third = width // 3
    rows = torch.arange(width)
    return (
        Part("q", "attn.c_attn", rows[:third]),
        Part("k", "attn.c_attn", rows[third : 2 * third]),
        Part("v", "attn.c_attn", rows[2 * third :]),
        Part("o", "attn.c_proj"),
    )


def _neox(block: nn.Module) -> tuple[Part, ...] | None:
    fused, out = _get(block, "attention.query_key_value"), _get(block, "attention.dense")
    if fused is None or out is None:
        return None
    heads = getattr(_get(block, "attention"), "config", None)
    heads = getattr(heads, "num_attention_heads", None)
    width = _out_features(fused)
    if not heads or width % (3 * heads):
        raise ArchitectureError("attention.query_key_value: cannot read num_attention_heads to split q, k, v")
    size = width // (3 * heads)
    # Output rows are [heads, 3, head_size]: each head's q, then its k, then its v.
    grid = torch.arange(width).view(heads, 3, size)
    return (
        Part("q", "attention.query_key_value", grid[:, 0].reshape(-1)),
        Part("k", "attention.query_key_value", grid[:, 1].reshape(-1)),
        Part("v", "attention.query_key_value", grid[:, 2].reshape(-1)),
        Part("o", "attention.dense"),
    )


def _phi3(block: nn.Module) -> tuple[Part, ...] | None:
    fused, out = _get(block, "self_attn.qkv_proj"), _get(block, "self_attn.o_proj")
    if fused is None or out is None:
        return None
    config = getattr(_get(block, "self_attn"), "config", None)
    head_dim = getattr(_get(block, "self_attn"), "head_dim", None)
    if config is None or head_dim is None:
        raise ArchitectureError("self_attn.qkv_proj: cannot read the head counts to split q, k, v")
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    rows = torch.arange(_out_features(fused))
    return (
        Part("q", "self_attn.qkv_proj", rows[:q]),
        Part("k", "self_attn.qkv_proj", rows[q : q + kv]),
        Part("v", "self_attn.qkv_proj", rows[q + kv :]),
        Part("o", "self_attn.o_proj"),
    )


#: (family, what it looks for, finder), tried in order.
FAMILIES = (
    ("llama-style", "{self_attn,attn,attention}.{q_proj,k_proj,v_proj,o_proj}", _separate),
    ("gpt2", "attn.c_attn + attn.c_proj", _gpt2),
    ("gpt-neox", "attention.query_key_value + attention.dense", _neox),
    ("phi3", "self_attn.qkv_proj + self_attn.o_proj", _phi3),
)


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _out_features(module: nn.Module) -> int:
    shape = getattr(module.weight, "ds_shape", module.weight.shape)  # ZeRO-3: see find_blocks
    return shape[1] if is_conv1d(module) else shape[0]


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: ``y = x W + b`` with W [in, out] (matched by name, so transformers
    need not be imported here)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


@dataclass(frozen=True)
class Architecture:
    """The pieces of a causal LM that the measures need."""

    blocks: tuple[nn.Module, ...]
    block_names: tuple[str, ...]
    layout: Layout
    head: nn.Module
    softcap: float | None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ModuleList of identical blocks holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        # ZeRO-3 parameters hold only their partition; ds_numel counts the whole one.
        size = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
        if size and (best is None or size > best[0]):
            best = (size, name, module)
    if best is None:
        raise ArchitectureError(
            f"{type(model).__name__}: no list of decoder blocks found (looked for an nn.ModuleList of identical blocks with parameters)"
        )
    return best[1], best[2]


def describe(model: nn.Module) -> Architecture:
    list_name, blocks = find_blocks(model)
    first = blocks[0]
    layout = None
    for family, _, finder in FAMILIES:
        parts = finder(first)
        if parts is not None:
            layout = Layout(family, parts)
            break
    if layout is None:
        looked = "; ".join(f"{family}: {what}" for family, what, _ in FAMILIES)
        raise ArchitectureError(
            f"{type(model).__name__}: no attention projections found in {list_name}.0 ({type(first).__name__}); looked for {looked}"
        )
    for i, block in enumerate(blocks):
        for part in layout.parts:
            module = _get(block, part.module)
            if not isinstance(module, nn.Linear) and not is_conv1d(module):
                raise ArchitectureError(
                    f"{list_name}.{i}.{part.module} is a {type(module).__name__}, not a linear projection"
                )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise ArchitectureError(f"{type(model).__name__}: its LM head (get_output_embeddings) is not an nn.Linear")
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None) or None
    names = tuple(f"{list_name}.{i}" for i in range(len(blocks)))
    return Architecture(tuple(blocks), names, layout, head, softcap)
