"""Training: the Falcon Mamba recipe (WSD, batch ramp, curriculum, data parallel) as a library.

    from falcon_mamba.train import get_recipe, apply_overrides, train
    cfg = apply_overrides(get_recipe("tiny"), ["steps=50", "model.hidden_size=96"])
    result = train(cfg, "data/", "runs/tiny")      # metrics.jsonl, checkpoints/, model/ in runs/tiny
    print(result.val_bpb)

Files: config (TrainConfig, --set), recipes (presets), schedule (lr, batch ramp), optim (AdamW
groups), objective (the loss module), linear_ce (its fused lm_head + cross-entropy), loop (train),
checkpoint (sharded, atomic training state), distributed (DDP / FSDP2), evaluate (val loss,
bits/byte), metrics (JSONL, progress bar), flops (FLOPs per token, the MFU peak), build (model,
export).
"""

from falcon_mamba.train.config import TrainConfig, apply_overrides
from falcon_mamba.train.loop import RunResult, train
from falcon_mamba.train.recipes import RECIPES, get_recipe

__all__ = ["RECIPES", "RunResult", "TrainConfig", "apply_overrides", "get_recipe", "train"]
