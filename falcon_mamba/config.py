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
# Limits that keep every accepted config computable (sizes and their products far past any real
# model: the 7B has hidden 4096, 64 layers, 7.3e9 parameters), so a hostile config.json fails here
# with its field named instead of overflowing an allocation later.
_MAX = {"hidden_size": 1 << 20, "num_hidden_layers": 1 << 12, "intermediate_size": 1 << 22,
        "vocab_size": 1 << 31, "state_size": 1 << 12, "conv_kernel": 1 << 8, "time_step_rank": 1 << 20}
MAX_PARAMETERS = 1 << 44
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
        for name, high in _MAX.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"config field {name} must be a positive integer, got {value!r}")
            if value > high:
                raise UserError(f"config field {name} is {value}, over the limit of {high}")
        if self.conv_kernel < 2:
            raise UserError(f"conv_kernel must be at least 2, got {self.conv_kernel}")
        for name in ("layer_norm_epsilon", "mixer_rms_eps"):
            value = getattr(self, name)
            if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                    or not 0 < value < 1):
                raise UserError(f"config field {name} must be a number in (0, 1), got {value!r}")
        for name in ("time_step_min", "time_step_max", "time_step_floor", "time_step_scale",
                     "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise UserError(f"config field {name} must be a finite number, got {value!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 <= value < self.vocab_size):
                raise UserError(f"config field {name} must be a token id in [0, {self.vocab_size}) "
                                f"or null, got {value!r}")
        if self.num_parameters > MAX_PARAMETERS:
            raise UserError(f"this config has {self.num_parameters:.3g} parameters, over the limit of "
                            f"{MAX_PARAMETERS:.3g}; check hidden_size, intermediate_size and vocab_size")

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
        def as_int(name, v):
            if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
                v = int(v)  # 256.0 is 256; 256.9 is refused, never truncated
            if not isinstance(v, int) or isinstance(v, bool):
                raise UserError(f"{source}: {name} must be an integer, got {v!r}")
            return v

        def integer(name, default=None):
            return as_int(name, d.get(name, default))

        def number(name, default):
            v = d.get(name, default)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise UserError(f"{source}: {name} must be a finite number, got {v!r}")
            return float(v)

        def token_id(name, default):
            v = d.get(name, default)
            if isinstance(v, list):  # several EOS ids: the first is ours
                v = v[0] if v else None
            return None if v is None else as_int(name, v)

        for name in ("hidden_size", "num_hidden_layers", "vocab_size"):
            if name not in d:
                raise UserError(f"{source}: missing field {name!r}")
        hidden = integer("hidden_size")
        # intermediate_size wins over expand (the 7B config's expand=16 is wrong).
        if d.get("intermediate_size") is not None:
            inter = integer("intermediate_size")
        else:
            inter = integer("expand", 2) * hidden
        rank = d.get("time_step_rank", "auto")
        rank = math.ceil(hidden / 16) if rank in (None, "auto") else integer("time_step_rank")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise UserError(f"{source}: hidden_act {act!r} is not supported (only silu)")
        if d.get("residual_in_fp32") is False:
            raise UserError(f"{source}: residual_in_fp32=false is not supported")
        for name in ("use_bias", "use_conv_bias", "tie_word_embeddings"):
            if name in d and not isinstance(d[name], bool):
                raise UserError(f"{source}: {name} must be true or false, got {d[name]!r}")
        tie_default = model_type == "mamba"
        # from here on, __post_init__ checks ranges and raises UserError naming the field
        return cls(
            hidden_size=hidden,
            num_hidden_layers=integer("num_hidden_layers"),
            intermediate_size=inter,
            vocab_size=integer("vocab_size"),
            state_size=integer("state_size", 16),
            conv_kernel=integer("conv_kernel", 4),
            time_step_rank=rank,
            use_bias=d.get("use_bias", False),
            use_conv_bias=d.get("use_conv_bias", True),
            layer_norm_epsilon=number("layer_norm_epsilon", 1e-5),
            mixer_rms_eps=number("mixer_rms_eps", 1e-6),
            bcdt_rms=model_type == "falcon_mamba",
            tie_word_embeddings=d.get("tie_word_embeddings", tie_default),
            bos_token_id=token_id("bos_token_id", 0),
            eos_token_id=token_id("eos_token_id", 0),
            pad_token_id=token_id("pad_token_id", 0),
            time_step_min=number("time_step_min", 0.001),
            time_step_max=number("time_step_max", 0.1),
            time_step_floor=number("time_step_floor", 1e-4),
            time_step_scale=number("time_step_scale", 1.0),
            initializer_range=number("initializer_range", 0.1),
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: not found; a model folder needs a config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        except ValueError as e:  # e.g. an integer of more than 4300 digits
            raise UserError(f"{path}: not valid JSON ({e})") from None
        except OSError as e:
            raise UserError(f"{path}: cannot be read ({e.strerror})") from None
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
