"""The recurrent state of a sequence batch: the whole memory of a context, a fixed number of bytes.

Per layer: the conv state, the last K-1 pre-conv inputs (B, K-1, D) in the model dtype, and the SSM
state (B, D, N) in fp32. Both are stacked over layers so that clone, row selection and file I/O are
single tensor operations:  conv (nL, B, K-1, D),  ssm (nL, B, D, N).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from falcon_mamba.config import ModelConfig
from falcon_mamba.errors import UserError

_FORMAT = "falcon-mamba-state/1"


@dataclass
class State:
    config: ModelConfig
    conv: torch.Tensor  # (nL, B, K-1, D) model dtype
    ssm: torch.Tensor  # (nL, B, D, N) fp32
    tokens_seen: int = 0  # how many tokens this state has absorbed (informational, per batch)

    @classmethod
    def zeros(cls, config: ModelConfig, batch_size: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> State:
        nL, K, D, N = (config.num_hidden_layers, config.conv_kernel, config.intermediate_size,
                       config.state_size)
        return cls(config,
                   torch.zeros(nL, batch_size, K - 1, D, dtype=dtype, device=device),
                   torch.zeros(nL, batch_size, D, N, dtype=torch.float32, device=device))

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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            save_file(tensors, tmp, metadata=meta)
            os.chmod(tmp, _file_mode())  # safetensors writes 0600; a saved state is an ordinary file
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _file_mode() -> int:
    """0666 minus the process umask, read without os.umask's set-and-restore (not thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o644


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the raw bytes, so a file damaged inside its data is caught, not silently used."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _config_key(config: ModelConfig) -> dict:
    # Only the fields that shape the state and its meaning; token ids and init ranges don't matter.
    d = config.to_hf_dict()
    return {k: d[k] for k in ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
                              "state_size", "conv_kernel", "time_step_rank", "vocab_size")}


def load_state(path: str | os.PathLike, model_or_config, device: torch.device | str | None = None) -> State:
    """Read a state written by State.save; it must come from a model with the same config."""
    from safetensors import SafetensorError, safe_open

    config = getattr(model_or_config, "config", model_or_config)
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: state file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise UserError(f"{path}: not a falcon-mamba state file")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{path}: damaged state file ({e})") from None
    try:
        saved = ModelConfig.from_hf_dict(json.loads(meta["config"]), source=str(path))
    except (KeyError, json.JSONDecodeError):
        raise UserError(f"{path}: damaged state file (bad config header)") from None
    if _config_key(saved) != _config_key(config):
        raise UserError(f"{path}: this state was made by another model "
                        f"({saved.model_type}, {saved.num_hidden_layers} layers, hidden "
                        f"{saved.hidden_size}); load it with that model")
    if set(tensors) != {"conv", "ssm"}:
        raise UserError(f"{path}: damaged state file (tensors {sorted(tensors)})")
    conv, ssm = tensors["conv"], tensors["ssm"]
    nL, K, D, N = (config.num_hidden_layers, config.conv_kernel, config.intermediate_size,
                   config.state_size)
    if (conv.dim() != 4 or ssm.dim() != 4 or conv.shape[0] != nL or conv.shape[2:] != (K - 1, D)
            or ssm.shape[0] != nL or ssm.shape[2:] != (D, N) or conv.shape[1] != ssm.shape[1]):
        raise UserError(f"{path}: damaged state file (shapes {tuple(conv.shape)}, {tuple(ssm.shape)})")
    if "sha256" in meta and meta["sha256"] != _digest(tensors):
        raise UserError(f"{path}: damaged state file (checksum mismatch)")
    try:
        seen = int(meta.get("tokens_seen", "0"))
    except ValueError:
        raise UserError(f"{path}: damaged state file (bad tokens_seen header)") from None
    if not (torch.isfinite(ssm).all() and torch.isfinite(conv.float()).all()):
        raise UserError(f"{path}: damaged state file (it holds NaN or infinite values)")
    # Given a model, the state lands on its device with the conv state in its dtype, ready to use.
    model_dtype = getattr(model_or_config, "dtype", None)
    if device is None:
        device = getattr(model_or_config, "device", None)
    if isinstance(model_dtype, torch.dtype):
        conv = conv.to(model_dtype)
    state = State(config, conv, ssm.float(), seen)
    return state.to(device) if device is not None else state
