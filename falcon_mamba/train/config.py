"""TrainConfig: every setting of a training run, as one frozen dataclass (no YAML).

A recipe (recipes.py) is a Python function that returns one; the CLI takes a recipe name plus
``--set key=value`` overrides, type-checked against the fields (``model.hidden_size=256`` reaches
into the model config).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from falcon_mamba.config import ModelConfig
from falcon_mamba.errors import UserError


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ModelConfig
    # ---- data -------------------------------------------------------------------------------
    seq_len: int = 256
    mixture: str = ""  # see falcon_mamba.data.mixture; "" = sources by size
    seed: int = 0
    # ---- batch (in sequences of seq_len tokens) ----------------------------------------------
    global_batch: int = 64  # after the ramp
    micro_batch: int = 16  # rows per forward pass per process (gradient accumulation above it)
    batch_ramp_start: int = 0  # 0: no ramp; else the global batch at step 0
    batch_ramp_steps: int = 0  # steps over which the batch grows linearly to global_batch
    batch_ramp_increment: int = 8  # ramp batches are multiples of this (of the process count too)
    ramp_lr_scaling: str = "sqrt"  # lr * (batch / global_batch) ** p during the ramp: sqrt | linear | none
    # ---- schedule -----------------------------------------------------------------------------
    steps: int = 1000
    lr: float = 3e-3
    schedule: str = "wsd"  # wsd | cosine | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the last fraction of the steps decays
    decay_shape: str = "linear"  # wsd decay: linear | cosine | exp | sqrt (1 - sqrt)
    min_lr_ratio: float = 0.0  # lr at the end = lr * min_lr_ratio
    # ---- optimizer ----------------------------------------------------------------------------
    weight_decay: float = 0.1  # not on A_log, D, biases, norms, embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0: off
    # ---- numerics and scale -------------------------------------------------------------------
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    device: str = "auto"
    parallel: str = "ddp"  # under torchrun: ddp | fsdp
    activation_checkpointing: bool = False
    fused_loss: bool = True  # lm_head + cross-entropy chunked (train/linear_ce.py): no (B, L, V) logits
    loss_chunk: int = 0  # tokens per chunk of the fused loss; 0 = ~2^27 logits per chunk
    # Reduce gradients after every micro-batch, not once per step: FSDP2 then keeps only sharded
    # gradients (4 bytes per parameter / processes instead of 4 unsharded), for more traffic.
    sync_every_micro_batch: bool = False
    # ---- fine-tuning --------------------------------------------------------------------------
    init_from: str = ""  # an HF-format model folder to start from (its vocab wins)
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: str = "in_proj,x_proj,dt_proj,out_proj"
    # ---- bookkeeping --------------------------------------------------------------------------
    log_every: int = 10
    eval_every: int = 200  # 0: only at the end
    eval_tokens: int = 0  # validation targets per source per eval; 0 = the whole split
    save_every: int = 200  # 0: only at the end
    keep_checkpoints: int = 1  # complete checkpoints kept in OUT/checkpoints (the newest ones)
    time_budget_s: float = 0.0  # > 0: after warm-up, lower `steps` (if needed) to fit this many seconds
    peak_tflops: float = 0.0  # for MFU; 0 = the bf16 matmul rate measured at the start (CUDA), none on CPU

    def __post_init__(self) -> None:
        choices = {"ramp_lr_scaling": ("sqrt", "linear", "none"), "schedule": ("wsd", "cosine", "constant"),
                   "decay_shape": ("linear", "cosine", "exp", "sqrt"), "precision": ("auto", "bf16", "fp32"),
                   "parallel": ("ddp", "fsdp")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name in ("seq_len", "global_batch", "micro_batch", "steps", "batch_ramp_increment",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_ramp_start and not 0 < self.batch_ramp_start <= self.global_batch:
            raise UserError("batch_ramp_start must be in (0, global_batch]")
        if self.exp_needs_floor:
            raise UserError("decay_shape=exp needs min_lr_ratio > 0 (e.g. 1/256, as Falcon Mamba)")
        if not 0 <= self.decay_fraction <= 1:
            raise UserError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        ranges = {"lr": (0, 10, False), "beta1": (0, 1, True), "beta2": (0, 1, True),
                  "adam_eps": (0, 1, False), "min_lr_ratio": (0, 1, True), "weight_decay": (0, 10, True),
                  "grad_clip": (0, 1e6, True), "lora_alpha": (0, 1e6, False),
                  "time_budget_s": (0, 1e9, True), "peak_tflops": (0, 1e9, True)}
        for name, (low, high, closed) in ranges.items():
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not (low <= v if closed else low < v) or not v <= high:
                raise UserError(f"{name} must be {'>=' if closed else '>'} {low} and <= {high}, got {v!r}")
        for name in ("warmup_steps", "batch_ramp_steps", "log_every", "eval_every", "eval_tokens",
                     "save_every", "lora_rank"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must not be negative, got {getattr(self, name)}")

    @property
    def exp_needs_floor(self) -> bool:
        return self.schedule == "wsd" and self.decay_shape == "exp" and self.min_lr_ratio <= 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = dataclasses.asdict(self.model)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["model"] = ModelConfig(**d["model"])
        return cls(**d)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# Fields that may change when a run is resumed: they do not change what the run computes.
RESUMABLE_CHANGES = {"log_every", "eval_every", "eval_tokens", "save_every", "peak_tflops", "device",
                     "time_budget_s", "activation_checkpointing", "parallel", "fused_loss", "loss_chunk",
                     "sync_every_micro_batch", "keep_checkpoints"}


def _convert(value: str, typ, key: str):
    """Turn the string of --set into the field's type, or fail naming the key."""
    if typ is bool:
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--set {key}={value}: expected true or false")
    origin = typing.get_origin(typ)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        return _convert(value, args[0], key)
    if typ is float:
        try:
            f = float(value)
        except ValueError:
            raise UserError(f"--set {key}={value}: expected a number") from None
        if f != f or abs(f) == float("inf"):
            raise UserError(f"--set {key}={value}: expected a finite number")
        return f
    if typ is int:
        try:
            f = float(value)  # accepts 1e4 as well as 10000
        except ValueError:
            f = float("nan")
        if f != f or abs(f) == float("inf") or f != int(f):
            raise UserError(f"--set {key}={value}: expected an integer")
        if abs(f) > 2**53:  # past float precision: read it exactly, or refuse it
            try:
                n = int(value)
            except ValueError:
                raise UserError(f"--set {key}={value}: expected an integer") from None
            if abs(n) >= 1 << 63:
                raise UserError(f"--set {key}={value}: out of range")
            return n
        return int(f)
    return value


def apply_overrides(cfg: TrainConfig, items: list[str]) -> TrainConfig:
    """Apply ``key=value`` strings; ``model.X`` sets a model field. Unknown keys and values of the
    wrong type raise UserError naming the key and the choices."""
    train_hints = typing.get_type_hints(TrainConfig)
    model_hints = typing.get_type_hints(ModelConfig)
    top: dict = {}
    model: dict = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise UserError(f"--set {item!r}: write key=value")
        if key.startswith("model."):
            sub = key[len("model."):]
            if sub not in model_hints:
                raise UserError(f"--set {key}: unknown model field; known: {', '.join(model_hints)}")
            model[sub] = _convert(value, model_hints[sub], key)
        else:
            if key not in train_hints or key == "model":
                raise UserError(f"--set {key}: unknown training field; known: "
                                f"{', '.join(k for k in train_hints if k != 'model')}, model.<field>")
            top[key] = _convert(value, train_hints[key], key)
    if model:
        top["model"] = cfg.model.replace(**model)
    return cfg.replace(**top)
