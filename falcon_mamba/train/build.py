"""Building the model a run trains (fresh, or from a checkpoint folder; with LoRA and activation
checkpointing) and exporting what it trained as an HF-format folder."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from falcon_mamba.data.shards import ShardSet
from falcon_mamba.errors import UserError
from falcon_mamba.model import FalconMamba
from falcon_mamba.train.config import TrainConfig


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


def resolve_config(cfg: TrainConfig, data: ShardSet) -> TrainConfig:
    """Fit the model config to the data: a fresh model takes the data's vocabulary (rounded up to
    a multiple of 8) and eos id; a fine-tuned one keeps its own and must cover the data's ids."""
    from falcon_mamba.tokenizer import load_tokenizer

    if cfg.init_from:
        from falcon_mamba.config import ModelConfig
        from falcon_mamba.hub import resolve_model_dir

        model_cfg = ModelConfig.from_json_file(resolve_model_dir(cfg.init_from) / "config.json")
        if data.vocab_size > model_cfg.vocab_size:
            raise UserError(f"the data was tokenized with {data.vocab_size} tokens but {cfg.init_from} "
                            f"has a vocabulary of {model_cfg.vocab_size}; prepare the data with the "
                            f"model's tokenizer (--tokenizer {cfg.init_from})")
        return cfg.replace(model=model_cfg)
    tok = load_tokenizer(data.tokenizer_path)
    model = cfg.model.replace(vocab_size=_round_up(data.vocab_size, 8), eos_token_id=data.eos_token_id,
                              pad_token_id=data.eos_token_id, bos_token_id=tok.bos_token_id)
    return cfg.replace(model=model)


def enable_activation_checkpointing(units: list[nn.Module]) -> None:
    """Recompute each unit's activations in the backward pass instead of storing them."""
    from torch.utils.checkpoint import checkpoint

    for unit in units:
        inner = unit.forward
        unit.forward = functools.partial(checkpoint, inner, use_reentrant=False)


def build_model(cfg: TrainConfig, model_fn: Callable | None = None) -> nn.Module:
    """The model to train, on the CPU in fp32 (master weights), seeded by cfg.seed so every
    process builds the same one."""
    from falcon_mamba.train.distributed import shard_modules

    torch.manual_seed(cfg.seed)
    if model_fn is not None:
        model = model_fn(cfg.model)
    elif cfg.init_from:
        from falcon_mamba.checkpoint import load_model

        model = load_model(cfg.init_from, dtype=torch.float32, device="cpu")
        model.train()
    else:
        model = FalconMamba(cfg.model)
    if cfg.lora_rank:
        from falcon_mamba.lora import apply_lora

        if cfg.parallel == "fsdp":
            raise UserError("LoRA with FSDP is not supported; use parallel=ddp (the adapters are small)")
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(shard_modules(model))
    return model


def export_model(cfg: TrainConfig, model_state: dict, out: str | Path, tokenizer_dir: str | Path,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write a full state dict of the trained FalconMamba (LoRA merged) as an HF folder with the
    data's tokenizer beside it. ``dtype`` applies to the weights (A_log, D, dt bias stay fp32)."""
    from falcon_mamba.checkpoint import save_model
    from falcon_mamba.lora import apply_lora, merge_lora

    with torch.device("meta"):  # no random init: every tensor comes from model_state
        model = FalconMamba(cfg.model)
        if cfg.lora_rank:
            apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    model.load_state_dict(model_state, strict=True, assign=True)
    if cfg.model.tie_word_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    if cfg.lora_rank:
        merge_lora(model)
    model.to_dtype(dtype)
    return save_model(model, out, tokenizer_dir=tokenizer_dir)


def base_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype a run's export keeps: the one its init_from checkpoint stores (a bf16 base gives
    a bf16 fine-tune), float32 for a model trained from scratch."""
    if not cfg.init_from:
        return torch.float32
    from falcon_mamba.checkpoint import stored_dtype
    from falcon_mamba.hub import resolve_model_dir

    return stored_dtype(resolve_model_dir(cfg.init_from)) or torch.float32


def check_adapter_export(cfg: TrainConfig) -> None:
    """UserError unless the run's LoRA can be written as a PEFT adapter."""
    from falcon_mamba.hf.adapter import check_peft_targets

    if not cfg.lora_rank:
        raise UserError("an adapter-only export needs LoRA (--lora-rank R)")
    check_peft_targets(cfg.lora_targets)


def export_adapter(cfg: TrainConfig, model_state: dict, out: str | Path) -> Path:
    """Write the run's LoRA weights as a PEFT adapter folder for its init_from base."""
    from falcon_mamba.hf.adapter import lora_state_from, save_adapter

    return save_adapter(lora_state_from(model_state), out, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                        base_model_name_or_path=cfg.init_from or None)
