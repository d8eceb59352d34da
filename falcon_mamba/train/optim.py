"""AdamW with two parameter groups: weight decay on the matrices, none on A_log, D, biases, norms and
embeddings (decaying A_log would pull every channel's decay rate toward exp(0) = 1; decaying norms
and embeddings shrinks scales the model has no other way to set)."""

from __future__ import annotations

import torch
import torch.nn as nn

from falcon_mamba.train.config import TrainConfig


def no_decay(name: str, p: torch.Tensor) -> bool:
    """True for parameters AdamW must not decay."""
    return p.ndim < 2 or name.endswith("A_log") or "embed" in name or "norm" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, keep = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # frozen (LoRA base weights)
        (keep if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": keep, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over param_groups. ``fused`` (None: when every parameter is on a GPU) takes torch's
    fused kernel: one launch per parameter group where the default (foreach) launches several per
    tensor and allocates temporaries as large as the parameters (7B: ~29 GB); same update."""
    groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
    if fused is None:
        fused = all(p.device.type == "cuda" for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                             fused=fused or None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
