"""ModelConfig: every field that changes the math of a (Falcon) Mamba-1 model, presets, HF config.json.

Two HF model types share this architecture:
- ``falcon_mamba``: weightless RMSNorms on dt (rank space), B and C (``bcdt_rms=True``), untied lm_head.
- ``mamba``: the original state-spaces Mamba-1, no B/C/dt norms.
``intermediate_size`` is the truth; the 7B config.json's ``expand`` (16) is wrong and is ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from falcon_mamba.errors import UserError

MODEL_TYPES = ("falcon_mamba", "mamba")
_ARCHITECTURES = {"falcon_mamba": "FalconMambaForCausalLM", "mamba": "MambaForCausalLM"}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    vocab_size: int
    state_size: int = 16
    conv_kernel: int = 4
    time_step_rank: int = 0  # 0 means ceil(hidden_size / 16), as HF's "auto"
    use_bias: bool = False
    use_conv_bias: bool = True
    layer_norm_epsilon: float = 1e-5
    mixer_rms_eps: float = 1e-6
    bcdt_rms: bool = True  # weightless RMSNorm on B, C and dt: Falcon Mamba's addition
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 11
    pad_token_id: int | None = 11
    # Initialisation only (they do not change the forward math).
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_scale: float = 1.0
    initializer_range: float = 0.1

    def __post_init__(self) -> None:
        if self.time_step_rank == 0:
            object.__setattr__(self, "time_step_rank", math.ceil(self.hidden_size / 16))
        for name in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size",
                     "state_size", "conv_kernel", "time_step_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"config field {name} must be a positive integer, got {value!r}")
        if self.conv_kernel < 2:
            raise UserError(f"conv_kernel must be at least 2, got {self.conv_kernel}")

    @property
    def model_type(self) -> str:
        return "falcon_mamba" if self.bcdt_rms else "mamba"

    @property
    def x_proj_size(self) -> int:
        """Width of x_proj's output: [dt (R), B (N), C (N)]."""
        return self.time_step_rank + 2 * self.state_size

    @property
    def params_per_layer(self) -> int:
        H, D, N, K, R = (self.hidden_size, self.intermediate_size, self.state_size,
                         self.conv_kernel, self.time_step_rank)
        n = H  # block norm
        n += 2 * D * H + (2 * D if self.use_bias else 0)  # in_proj
        n += D * K + (D if self.use_conv_bias else 0)  # conv1d
        n += self.x_proj_size * D  # x_proj
        n += D * R + D  # dt_proj with bias
        n += D * N + D  # A_log, D
        n += H * D + (H if self.use_bias else 0)  # out_proj
        return n

    @property
    def num_parameters(self) -> int:
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + head + self.hidden_size + self.num_hidden_layers * self.params_per_layer

    def replace(self, **changes) -> ModelConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise UserError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    # ---- HF config.json ------------------------------------------------------------------
    def to_hf_dict(self) -> dict:
        return {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "intermediate_size": self.intermediate_size,
            "expand": self.intermediate_size // self.hidden_size,
            "vocab_size": self.vocab_size,
            "state_size": self.state_size,
            "conv_kernel": self.conv_kernel,
            "time_step_rank": self.time_step_rank,
            "use_bias": self.use_bias,
            "use_conv_bias": self.use_conv_bias,
            "hidden_act": "silu",
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "mixer_rms_eps": self.mixer_rms_eps,
            "residual_in_fp32": True,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "time_step_min": self.time_step_min,
            "time_step_max": self.time_step_max,
            "time_step_floor": self.time_step_floor,
            "time_step_scale": self.time_step_scale,
            "time_step_init_scheme": "random",
            "initializer_range": self.initializer_range,
            "rescale_prenorm_residual": False,
            "use_cache": True,
        }

    @classmethod
    def from_hf_dict(cls, d: dict, *, source: str = "config.json") -> ModelConfig:
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise UserError(f"{source}: model_type {model_type!r} is not supported "
                            f"(expected one of {', '.join(MODEL_TYPES)})")
        try:
            hidden = int(d["hidden_size"])
            # intermediate_size wins over expand (the 7B config's expand=16 is wrong).
            inter = d.get("intermediate_size") or int(d.get("expand", 2)) * hidden
            rank = d.get("time_step_rank", "auto")
            rank = math.ceil(hidden / 16) if rank in (None, "auto") else int(rank)
            act = d.get("hidden_act", "silu")
            if act != "silu":
                raise UserError(f"{source}: hidden_act {act!r} is not supported (only silu)")
            if d.get("residual_in_fp32") is False:
                raise UserError(f"{source}: residual_in_fp32=false is not supported")
            eos = d.get("eos_token_id", 0)
            if isinstance(eos, list):
                eos = eos[0] if eos else None
            tie_default = model_type == "mamba"
            return cls(
                hidden_size=hidden,
                num_hidden_layers=int(d["num_hidden_layers"]),
                intermediate_size=int(inter),
                vocab_size=int(d["vocab_size"]),
                state_size=int(d.get("state_size", 16)),
                conv_kernel=int(d.get("conv_kernel", 4)),
                time_step_rank=rank,
                use_bias=bool(d.get("use_bias", False)),
                use_conv_bias=bool(d.get("use_conv_bias", True)),
                layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-5)),
                mixer_rms_eps=float(d.get("mixer_rms_eps", 1e-6)),
                bcdt_rms=model_type == "falcon_mamba",
                tie_word_embeddings=bool(d.get("tie_word_embeddings", tie_default)),
                bos_token_id=d.get("bos_token_id", 0),
                eos_token_id=eos,
                pad_token_id=d.get("pad_token_id", 0),
                time_step_min=float(d.get("time_step_min", 0.001)),
                time_step_max=float(d.get("time_step_max", 0.1)),
                time_step_floor=float(d.get("time_step_floor", 1e-4)),
                time_step_scale=float(d.get("time_step_scale", 1.0)),
                initializer_range=float(d.get("initializer_range", 0.1)),
            )
        except KeyError as e:
            raise UserError(f"{source}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, UserError):
                raise
            raise UserError(f"{source}: bad value ({e})") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: not found; a model folder needs a config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise UserError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(d, source=str(path))

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n", encoding="utf-8")


PRESETS: dict[str, ModelConfig] = {
    # The published Falcon Mamba 7B shapes: 7,272,665,088 parameters, untied lm_head.
    "falcon-mamba-7b": ModelConfig(hidden_size=4096, num_hidden_layers=64, intermediate_size=8192,
                                   vocab_size=65024, time_step_rank=256),
    # Tiny shapes for tests; odd sizes on purpose.
    "tiny": ModelConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=512),
    "tiny-odd": ModelConfig(hidden_size=48, num_hidden_layers=3, intermediate_size=100,
                            vocab_size=301, state_size=5, conv_kernel=3, time_step_rank=7),
    "tiny-mamba": ModelConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                              vocab_size=512, bcdt_rms=False, tie_word_embeddings=True),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
