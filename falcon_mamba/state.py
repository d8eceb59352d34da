"""The recurrent state of a sequence batch: the whole memory of a context, a fixed number of bytes.

Per layer: the conv state, the last K-1 pre-conv inputs (B, K-1, D) in the model dtype, and the SSM
state (B, D, N) in fp32 (a server's state pool may keep it in bf16: engine/state_pool.py). Both
are stacked over layers so that clone, row selection and file I/O are single tensor operations:
conv (nL, B, K-1, D),  ssm (nL, B, D, N).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from falcon_mamba import atomic
from falcon_mamba.config import ModelConfig
from falcon_mamba.errors import UserError

_FORMAT = "falcon-mamba-state/1"
# Values a state of a real run never reaches (they stay within a few thousand); larger ones
# overflow float32 within a step and reach the sampler as inf/NaN.
MAX_ABS_VALUE = 1e9


@dataclass
class State:
    config: ModelConfig
    conv: torch.Tensor  # (nL, B, K-1, D) model dtype
    ssm: torch.Tensor  # (nL, B, D, N) fp32 (bf16 in a state pool that opts in)
    tokens_seen: int = 0  # how many tokens this state has absorbed (informational, per batch)

    @classmethod
    def zeros(cls, config: ModelConfig, batch_size: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu", ssm_dtype: torch.dtype = torch.float32) -> State:
        nL, K, D, N = (config.num_hidden_layers, config.conv_kernel, config.intermediate_size,
                       config.state_size)
        return cls(config,
                   torch.zeros(nL, batch_size, K - 1, D, dtype=dtype, device=device),
                   torch.zeros(nL, batch_size, D, N, dtype=ssm_dtype, device=device))

    @property
    def batch_size(self) -> int:
        return self.conv.shape[1]

    @property
    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.ssm.numel() * self.ssm.element_size()

    @property
    def device(self) -> torch.device:
        return self.ssm.device

    def clone(self) -> State:
        return State(self.config, self.conv.clone(), self.ssm.clone(), self.tokens_seen)

    def select(self, rows: list[int] | torch.Tensor) -> State:
        """A new state holding the given batch rows, in that order (repeats allowed: forking one
        context into several continuations)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.batch_size):
            raise UserError(f"row index out of range for a state of batch size {self.batch_size}")
        return State(self.config, self.conv.index_select(1, idx), self.ssm.index_select(1, idx),
                     self.tokens_seen)

    def to(self, device: torch.device | str) -> State:
        return State(self.config, self.conv.to(device), self.ssm.to(device), self.tokens_seen)

    @staticmethod
    def cat(states: list[State]) -> State:
        """Stack the rows of several states of the same model into one batch."""
        first = states[0]
        return State(first.config, torch.cat([s.conv for s in states], 1),
                     torch.cat([s.ssm for s in states], 1), first.tokens_seen)

    # ---- files ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the state as safetensors with a header naming the model config. Atomic: a temp
        file in the same folder, then rename, so an existing file is never left half-written."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {"conv": self.conv.contiguous().cpu(), "ssm": self.ssm.contiguous().cpu()}
        meta = {"format": _FORMAT, "config": json.dumps(self.config.to_hf_dict(), sort_keys=True),
                "tokens_seen": str(self.tokens_seen), "sha256": _digest(tensors)}
        check_state_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.remove_stale_temps(path)
        except OSError as e:
            raise UserError(f"{path}: cannot write the state file here ({e.strerror})") from None
        tmp = atomic.temp_name_beside(path)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.chmod(tmp, atomic.file_mode())  # safetensors writes 0600; a saved state is an ordinary file
            os.replace(tmp, path)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise UserError(f"{path}: cannot write the state file ({e.strerror or e})") from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def check_state_path(path: str | os.PathLike, flag: str = "state file") -> Path:
    """Fail now, before any work, when a state could not be saved at path: a folder, a path under
    a file, or a folder this process cannot write."""
    from falcon_mamba.outputs import check_output_file

    return check_output_file(path, flag)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the raw bytes, so a file damaged inside its data is caught, not silently used."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _check_header_shapes(path: Path, f, config: ModelConfig) -> None:
    """Shapes and dtypes from the header, before any data is read: a header claiming a huge batch
    must not make us allocate it."""
    nL, K, D, N = (config.num_hidden_layers, config.conv_kernel, config.intermediate_size,
                   config.state_size)
    conv, ssm = f.get_slice("conv"), f.get_slice("ssm")
    cs, ss = tuple(conv.get_shape()), tuple(ssm.get_shape())
    if (len(cs) != 4 or len(ss) != 4 or cs[0] != nL or cs[2:] != (K - 1, D) or ss[0] != nL
            or ss[2:] != (D, N) or cs[1] != ss[1] or cs[1] < 1):
        raise UserError(f"{path}: this state does not fit the model (shapes {cs}, {ss}; the model "
                        f"needs ({nL}, B, {K - 1}, {D}) and ({nL}, B, {D}, {N})); load it with the "
                        "model that wrote it")
    if ssm.get_dtype() != "F32" or conv.get_dtype() not in ("F32", "BF16", "F16"):
        raise UserError(f"{path}: damaged state file (dtypes {conv.get_dtype()}, {ssm.get_dtype()})")


def _config_key(config: ModelConfig) -> dict:
    # Only the fields that shape the state and its meaning; token ids and init ranges don't matter.
    d = config.to_hf_dict()
    return {k: d[k] for k in ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
                              "state_size", "conv_kernel", "time_step_rank", "vocab_size")}


def load_state(path: str | os.PathLike, model_or_config, device: torch.device | str | None = None) -> State:
    """Read a state written by State.save; it must come from a model with the same config. The
    header (format, config, tensor names, shapes, dtypes) is checked before any data is read, the
    data (checksum, finite, in range) before it is used: every problem is one UserError."""
    from safetensors import safe_open

    config = getattr(model_or_config, "config", model_or_config)
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a state file")
    if not path.is_file():
        raise UserError(f"{path}: state file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise UserError(f"{path}: not a falcon-mamba state file")
            saved = _saved_config(path, meta)
            if _config_key(saved) != _config_key(config):
                raise UserError(f"{path}: this state was made by another model "
                                f"({saved.model_type}, {saved.num_hidden_layers} layers, hidden "
                                f"{saved.hidden_size}); load it with that model")
            if sorted(f.keys()) != ["conv", "ssm"]:
                raise UserError(f"{path}: damaged state file (tensors {sorted(f.keys())[:4]})")
            _check_header_shapes(path, f, config)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except UserError:
        raise
    except Exception as e:  # SafetensorError, OSError, ValueError...: not a readable file
        raise UserError(f"{path}: damaged state file ({type(e).__name__}: {str(e)[:200]})") from None
    conv, ssm = tensors["conv"], tensors["ssm"]
    if "sha256" in meta and meta["sha256"] != _digest(tensors):
        raise UserError(f"{path}: damaged state file (checksum mismatch)")
    try:
        seen = int(meta.get("tokens_seen", "0"))
        if not 0 <= seen < 1 << 63:
            raise ValueError
    except ValueError:
        raise UserError(f"{path}: damaged state file (bad tokens_seen header)") from None
    if not (torch.isfinite(ssm).all() and torch.isfinite(conv.float()).all()):
        raise UserError(f"{path}: damaged state file (it holds NaN or infinite values)")
    if ssm.abs().max() > MAX_ABS_VALUE or conv.float().abs().max() > MAX_ABS_VALUE:
        raise UserError(f"{path}: damaged state file (values over {MAX_ABS_VALUE:g}, which no run "
                        "produces and which overflow at the next token)")
    # Given a model, the state lands on its device with the conv state in its dtype, ready to use.
    model_dtype = getattr(model_or_config, "dtype", None)
    if device is None:
        device = getattr(model_or_config, "device", None)
    if isinstance(model_dtype, torch.dtype):
        conv = conv.to(model_dtype)
    state = State(config, conv, ssm.float(), seen)
    return state.to(device) if device is not None else state


def _saved_config(path: Path, meta: dict) -> ModelConfig:
    try:
        header = json.loads(meta["config"])
        if not isinstance(header, dict):
            raise ValueError("not an object")
        return ModelConfig.from_hf_dict(header, source=str(path))
    except (KeyError, ValueError, RecursionError):
        raise UserError(f"{path}: damaged state file (bad config header)") from None
