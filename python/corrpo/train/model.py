"""A small decoder-only transformer (RMSNorm, rotary positions, causal attention, SwiGLU)
with a KV cache for sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_len: int = 128
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def rope_tables(cfg: ModelConfig, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    half = cfg.head_dim // 2
    freqs = cfg.rope_base ** (-torch.arange(half, dtype=torch.float32, device=device) / half)
    angles = torch.arange(cfg.max_len, dtype=torch.float32, device=device)[:, None] * freqs[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates pairs (x[..., :half], x[..., half:]) of [B, H, L, D] by the angles of its positions."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


class KVCache:
    """Keys and values of every layer for a batch, preallocated to ``length`` positions."""

    def __init__(self, cfg: ModelConfig, batch: int, length: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (batch, cfg.n_heads, length, cfg.head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.filled = 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.cfg.n_heads, self.cfg.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            start = cache.filled
            cache.k[layer][:, :, start : start + length] = k
            cache.v[layer][:, :, start : start + length] = v
            keys, values = cache.k[layer][:, :, : start + length], cache.v[layer][:, :, : start + length]
            # A prefill is causal within itself; a one-token step sees everything cached.
            y = F.scaled_dot_product_attention(q, keys, values, is_causal=start == 0 and length > 1)
        return self.out(y.transpose(1, 2).reshape(batch, length, self.cfg.d_model))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model)
        hidden = 4 * cfg.d_model * 2 // 3
        self.gate_up = nn.Linear(cfg.d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Transformer(nn.Module):
    """``forward(tokens)`` gives the final hidden states (after the last norm) and the
    logits; corrpo reads its statistics from the first and ``lm_head.weight``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        # GPT-2's scaled init of the projections that write into the residual stream.
        for block in self.blocks:
            for proj in (block.attn.out, block.down):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        start = 0 if cache is None else cache.filled
        length = tokens.shape[1]
        if start + length > self.cfg.max_len:
            raise ValueError(f"{start + length} positions exceed the model's max_len {self.cfg.max_len}")
        cos, sin = self.rope_cos[start : start + length], self.rope_sin[start : start + length]
        x = self.embed(tokens)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, layer)
        if cache is not None:
            cache.filled += length
        hidden = self.norm(x)
        return hidden, self.lm_head(hidden)


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: torch.Tensor,
    max_new: int,
    *,
    temperature: float,
    uniforms: torch.Tensor | None,
    eos: int,
    pad: int,
) -> torch.Tensor:
    """Continues ``prompts`` [B, P] (all the same length) by up to ``max_new`` tokens each;
    rows stop at ``eos`` and are padded with ``pad`` after it. Returns [B, max_new].

    Sampling draws from softmax(logits / temperature) by inverting its CDF at
    ``uniforms`` [B, max_new] in [0, 1): the caller owns the randomness, so a row's sample
    depends only on its own noise, not on the batch it shares (ranks and resumed runs
    draw the same rollouts). ``uniforms=None`` decodes greedily.
    """
    batch = prompts.shape[0]
    device = prompts.device
    cache = KVCache(model.cfg, batch, prompts.shape[1] + max_new, device, model.lm_head.weight.dtype)
    out = torch.full((batch, max_new), pad, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    _, logits = model(prompts, cache)
    for t in range(max_new):
        last = logits[:, -1].float()
        if uniforms is None:
            token = last.argmax(dim=-1)
        else:
            cdf = torch.softmax(last / temperature, dim=-1).cumsum(dim=-1)
            u = uniforms[:, t : t + 1] * cdf[:, -1:]
            token = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)
        token = torch.where(done, torch.full_like(token, pad), token)
        out[:, t] = token
        done |= token == eos
        if bool(done.all()):
            break
        _, logits = model(token[:, None], cache)
    return out
