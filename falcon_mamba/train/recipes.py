"""Training recipes: named Python functions that return a TrainConfig (``--preset NAME``).

A fresh model's ``vocab_size`` and eos id come from the data folder (see build.resolve_config), so
the vocabulary written here is only a placeholder.
"""

from __future__ import annotations

from collections.abc import Callable

from falcon_mamba.config import PRESETS, ModelConfig
from falcon_mamba.errors import UserError
from falcon_mamba.train.config import TrainConfig


def tiny() -> TrainConfig:
    """Seconds on a CPU: for tests and for trying the pipeline."""
    return TrainConfig(
        model=ModelConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=256),
        seq_len=64, global_batch=8, micro_batch=4, steps=20, lr=3e-3, warmup_steps=4,
        decay_fraction=0.25, eval_every=0, save_every=0, log_every=1, eval_tokens=4096)


def default_model() -> TrainConfig:
    """The small model embedded in the package: 7.7M parameters (15.4 MB in bf16) with a fitted 8k
    BPE vocabulary, on the offline corpus (6.2M training tokens; 1200 steps of 32k tokens is about
    six epochs). The Falcon Mamba recipe in miniature: WSD with a batch ramp (lr scaled by
    sqrt(batch)), and a last stage (the decay) that mixes in more of the small curated sources
    (the Jargon File, the Bible, Shakespeare) than their share of the tokens."""
    return TrainConfig(
        model=ModelConfig(hidden_size=256, num_hidden_layers=8, intermediate_size=512, vocab_size=8192,
                          state_size=16, time_step_rank=16),
        seq_len=512, global_batch=64, micro_batch=64, steps=1200,
        batch_ramp_start=16, batch_ramp_steps=120, batch_ramp_increment=8, ramp_lr_scaling="sqrt",
        lr=2e-3, schedule="wsd", warmup_steps=60, decay_fraction=0.2, decay_shape="linear",
        min_lr_ratio=0.01, weight_decay=0.1, grad_clip=1.0,
        mixture=("python-docs=47,shakespeare=26,kjv-bible=19,jargon=8@0.8;"
                 "python-docs=35,shakespeare=30,kjv-bible=20,jargon=15"),
        log_every=10, eval_every=200, eval_tokens=0, save_every=200)


def falcon_mamba_7b() -> TrainConfig:
    """The published Falcon Mamba 7B pretraining recipe, for reference (it needs hundreds of GPUs):
    AdamW (0.9, 0.95), weight decay 0.1, WSD at 6.4e-4 with an exponential decay to lr/256 over the
    last ~500 of 5,500 GT, batch ramp 128 -> 2048 sequences of 2048 tokens over the first 50 GT with
    the lr scaled by sqrt(batch), bf16, data parallel with sharded state (FSDP2 here). The context
    growth to 8,192 tokens in later stages is a separate run per stage (resume with another seq_len
    is refused, so export and restart with init_from)."""
    tokens_per_full_step = 2048 * 2048
    return TrainConfig(
        model=PRESETS["falcon-mamba-7b"], seq_len=2048, global_batch=2048, micro_batch=1,
        batch_ramp_start=128, batch_ramp_steps=22_400, batch_ramp_increment=128, ramp_lr_scaling="sqrt",
        steps=5_500_000_000_000 // tokens_per_full_step, lr=6.4e-4, schedule="wsd", warmup_steps=2000,
        decay_fraction=500 / 5500, decay_shape="exp", min_lr_ratio=1 / 256, weight_decay=0.1,
        beta1=0.9, beta2=0.95, grad_clip=1.0, precision="bf16", parallel="fsdp",
        activation_checkpointing=True, log_every=10, eval_every=2000, eval_tokens=1_000_000,
        save_every=1000)


def sft() -> TrainConfig:
    """Full supervised fine-tuning on chat data (set init_from, or use `falcon-mamba finetune`)."""
    return TrainConfig(
        model=PRESETS["tiny"], seq_len=1024, global_batch=16, micro_batch=4, steps=500, lr=5e-5,
        schedule="cosine", warmup_steps=20, min_lr_ratio=0.1, weight_decay=0.0, log_every=10,
        eval_every=100, eval_tokens=0, save_every=100)


def sft_lora() -> TrainConfig:
    """LoRA fine-tuning (rank 8 on in_proj, x_proj, dt_proj, out_proj), merged on export."""
    return sft().replace(lr=1e-3, lora_rank=8, lora_alpha=16.0)


RECIPES: dict[str, Callable[[], TrainConfig]] = {
    "tiny": tiny,
    "default-model": default_model,
    "falcon-mamba-7b": falcon_mamba_7b,
    "sft": sft,
    "sft-lora": sft_lora,
}


def get_recipe(name: str) -> TrainConfig:
    try:
        return RECIPES[name]()
    except KeyError:
        raise UserError(f"unknown training preset {name!r}; choose one of: {', '.join(RECIPES)}") from None
