"""A small Transformer decoder, the reference the embedded Falcon Mamba is compared with (benchmark
only, not part of the package's API).

A Llama-style decoder: RMSNorm before attention and MLP, rotary positions, SwiGLU MLP, no biases,
untied lm_head (as Falcon Mamba). ``match_mamba`` sizes it to a FalconMamba's parameter count at the
same width and vocabulary. Packed sequences behave as in the Mamba: ``reset_BL`` starts a new
document, which may attend only to itself, and whose positions restart at 0.

Legend: B batch, L length, H hidden, h heads, d head dim, F MLP width, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from falcon_mamba.config import ModelConfig


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def num_parameters(self) -> int:
        H, F_ = self.hidden_size, self.mlp_size
        layer = 4 * H * H + 3 * H * F_ + 2 * H
        return 2 * self.vocab_size * H + H + self.num_layers * layer


def match_mamba(mc: ModelConfig, head_dim: int = 64) -> TransformerConfig:
    """The Transformer with the Mamba's width and vocabulary and (to within a few hundred) its
    parameter count: the layer count nearest to a standard 8/3 H SwiGLU MLP, then the MLP width
    solved for the exact count."""
    H = mc.hidden_size
    target = mc.num_parameters - 2 * mc.vocab_size * H - H
    std_layer = 4 * H * H + 3 * H * (8 * H // 3) + 2 * H
    n = max(1, round(target / std_layer))
    mlp = max(8, round((target / n - 4 * H * H - 2 * H) / (3 * H)))
    return TransformerConfig(vocab_size=mc.vocab_size, hidden_size=H, num_layers=n,
                             num_heads=max(1, H // head_dim), mlp_size=mlp)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _rope(x_BhLd: torch.Tensor, pos_BL: torch.Tensor, theta: float) -> torch.Tensor:
    d = x_BhLd.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, device=x_BhLd.device, dtype=torch.float32) / d)
    ang = pos_BL.float()[:, None, :, None] * inv  # (B, 1, L, d/2)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x_BhLd.float()[..., 0::2], x_BhLd.float()[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.to(x_BhLd.dtype)


class Block(nn.Module):
    def __init__(self, c: TransformerConfig):
        super().__init__()
        self.c = c
        H = c.hidden_size
        self.attn_norm = RMSNorm(H, c.norm_eps)
        self.qkv = nn.Linear(H, 3 * H, bias=False)
        self.o = nn.Linear(H, H, bias=False)
        self.mlp_norm = RMSNorm(H, c.norm_eps)
        self.gate = nn.Linear(H, c.mlp_size, bias=False)
        self.up = nn.Linear(H, c.mlp_size, bias=False)
        self.down = nn.Linear(c.mlp_size, H, bias=False)

    def forward(self, x_BLH, pos_BL, mask_B1LL):
        B, L, H = x_BLH.shape
        h = self.c.num_heads
        q, k, v = self.qkv(self.attn_norm(x_BLH)).view(B, L, 3, h, H // h).permute(2, 0, 3, 1, 4)
        q, k = _rope(q, pos_BL, self.c.rope_theta), _rope(k, pos_BL, self.c.rope_theta)
        if mask_B1LL is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1LL)
        x_BLH = x_BLH + self.o(a.transpose(1, 2).reshape(B, L, H))
        u = self.mlp_norm(x_BLH)
        return x_BLH + self.down(F.silu(self.gate(u)) * self.up(u))


class TransformerLM(nn.Module):
    def __init__(self, c: TransformerConfig):
        super().__init__()
        self.c = c
        self.embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.norm_f = RMSNorm(c.hidden_size, c.norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.ndim == 2:  # GPT-2 init: residual-branch outputs scaled by 1/sqrt(2 n_layers)
                residual_out = name.endswith(("o.weight", "down.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * c.num_layers) if residual_out else 0.02)

    def shard_units(self) -> list[nn.Module]:
        return list(self.layers)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per matmul weight plus causal attention (QK^T and AV over
        L/2 keys on average, forward and backward)."""
        c = self.c
        matmul = c.num_layers * (4 * c.hidden_size ** 2 + 3 * c.hidden_size * c.mlp_size)
        matmul += c.vocab_size * c.hidden_size
        attn = c.num_layers * 2 * 2 * (seq_len / 2) * c.hidden_size
        return 3.0 * (2 * matmul + attn)

    def forward(self, input_ids: torch.Tensor, reset_BL: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, L) -> logits (B, L, V) fp32."""
        return self.lm_head(self.hidden(input_ids, reset_BL)).float()

    def hidden(self, input_ids: torch.Tensor, reset_BL: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, L) -> lm_head's input (B, L, H), for the fused loss (as FalconMamba.hidden)."""
        B, L = input_ids.shape
        idx = torch.arange(L, device=input_ids.device).expand(B, L)
        if reset_BL is None:
            pos, mask = idx, None
        else:
            doc = torch.cumsum(reset_BL.long(), dim=1)  # document number of each position
            start = torch.cummax(torch.where(reset_BL, idx, torch.zeros_like(idx)), dim=1).values
            pos = idx - start
            causal = torch.ones(L, L, dtype=torch.bool, device=input_ids.device).tril()
            mask = (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]
        x = self.embeddings(input_ids)
        for blk in self.layers:
            x = blk(x, pos, mask)
        return self.norm_f(x)
