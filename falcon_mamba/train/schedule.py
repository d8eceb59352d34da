"""Learning-rate schedules and the batch-size ramp, as pure functions of the step.

WSD (warmup-stable-decay, Falcon Mamba's schedule): linear warmup to ``lr``, flat, then a decay over
the last ``decay_fraction`` of the steps to ``lr * min_lr_ratio``. Falcon Mamba decayed
exponentially to lr/256; ``decay_shape`` also offers linear, cosine and 1-sqrt. Because the stable
phase does not depend on the total, a run can be extended before its decay starts.

Batch ramp: the global batch grows linearly from ``batch_ramp_start`` to ``global_batch`` over
``batch_ramp_steps``, in multiples of ``batch_ramp_increment``. While the batch is smaller the lr is
scaled by (batch / global_batch) ** p: p = 1/2 keeps Adam's noise temperature lr / sqrt(batch)
constant (what the Falcon Mamba model card describes), p = 1 is the linear rule.
"""

from __future__ import annotations

import math

from falcon_mamba.train.config import TrainConfig


def schedule_factor(cfg: TrainConfig, step: int) -> float:
    """The lr multiplier in [0, 1] at ``step`` (0-based), before the ramp scaling."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    decay_steps = round(cfg.steps * cfg.decay_fraction)
    decay_start = cfg.steps - decay_steps
    if decay_steps == 0 or step < decay_start:
        return 1.0
    t = min(1.0, (step - decay_start + 1) / decay_steps)  # reaches 1 at the last step
    if cfg.decay_shape == "linear":
        return floor + (1 - floor) * (1 - t)
    if cfg.decay_shape == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.decay_shape == "sqrt":
        return floor + (1 - floor) * (1 - math.sqrt(t))
    return floor ** t  # exp: a straight line in log(lr) from 1 to floor


def batch_at(cfg: TrainConfig, step: int) -> int:
    """The global batch (sequences) at ``step``."""
    if not cfg.batch_ramp_start or step >= cfg.batch_ramp_steps:
        return cfg.global_batch
    inc = cfg.batch_ramp_increment
    b = cfg.batch_ramp_start + (cfg.global_batch - cfg.batch_ramp_start) * step / cfg.batch_ramp_steps
    b = max(inc, int(b) // inc * inc)
    return min(b, cfg.global_batch)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate at ``step``: schedule times the ramp scaling."""
    lr = cfg.lr * schedule_factor(cfg, step)
    b = batch_at(cfg, step)
    if b < cfg.global_batch and cfg.ramp_lr_scaling != "none":
        p = 0.5 if cfg.ramp_lr_scaling == "sqrt" else 1.0
        lr *= (b / cfg.global_batch) ** p
    return lr


def check_batch_sizes(cfg: TrainConfig, world: int) -> None:
    """Every batch of the run must split evenly over the processes."""
    from falcon_mamba.errors import UserError

    if cfg.global_batch % world:
        raise UserError(f"global_batch {cfg.global_batch} does not split over {world} processes; "
                        f"make it a multiple of {world}")
    if cfg.batch_ramp_start and cfg.batch_ramp_increment % world:
        raise UserError(f"batch_ramp_increment {cfg.batch_ramp_increment} must be a multiple of the "
                        f"{world} processes")
