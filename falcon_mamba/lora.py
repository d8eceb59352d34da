"""LoRA: low-rank adapters on the mixer's linear layers, merged into the weights on export.

Each adapted ``nn.Linear`` gets a parametrization of its weight,
    W_eff = W + (alpha / r) * B @ A,        A (r, in), B (out, r), B = 0 at the start,
so every use of ``.weight`` (the model calls ``F.linear(dt, dt_proj.weight)`` directly) sees the
adapted weight, and merging is removing the parametrization while keeping its value. The base W is
frozen; only A and B train. The cost is one (out x in) matrix per adapted layer per forward, small
next to the activations at training batch sizes.

    from falcon_mamba.lora import apply_lora, merge_lora
    apply_lora(model, rank=8, alpha=16)   # freezes everything but the adapters
    ... train ...
    merge_lora(model)                     # plain nn.Linear weights again, ready for save_model
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from falcon_mamba.errors import UserError

DEFAULT_TARGETS = ("in_proj", "x_proj", "dt_proj", "out_proj")


class LoRADelta(nn.Module):
    """The parametrization W -> W + scale * B @ A."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float,
                 device=None, dtype=None):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W + (self.B @ self.A).to(W.dtype) * self.scale


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0,
               targets: tuple[str, ...] | str = DEFAULT_TARGETS) -> list[str]:
    """Add adapters to every nn.Linear whose name ends with one of ``targets``; freeze all other
    parameters. Returns the adapted module names."""
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    if rank < 1:
        raise UserError(f"LoRA rank must be at least 1, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            w = mod.weight
            parametrize.register_parametrization(
                mod, "weight", LoRADelta(w.shape[0], w.shape[1], rank, alpha, w.device, torch.float32))
            adapted.append(name)
    if not adapted:
        raise UserError(f"LoRA found no linear layer named {', '.join(targets)}")
    return adapted


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRADelta) for m in model.modules())


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (in place) and unfreeze the weights."""
    for mod in list(model.modules()):
        if parametrize.is_parametrized(mod, "weight") and any(
                isinstance(p, LoRADelta) for p in mod.parametrizations["weight"]):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
