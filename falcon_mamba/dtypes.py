"""Parsing dtype names from users, and checking that a device can compute in a dtype."""

from __future__ import annotations

import torch

from falcon_mamba.errors import UserError

_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
}


def parse_dtype(value: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if value is None:
        return default
    if isinstance(value, torch.dtype):
        if value not in _NAMES.values():
            raise UserError(f"dtype {value} is not supported; use float32, bfloat16 or float16")
        return value
    try:
        return _NAMES[str(value).lower().removeprefix("torch.")]
    except KeyError:
        raise UserError(f"unknown dtype {value!r}; use float32, bfloat16 or float16") from None


def parse_device(value: str | torch.device | None, flag: str = "--device") -> torch.device:
    """A device name from a user -> torch.device; None: cuda when available, else cpu. UserError
    for an unknown name, a CUDA device on a machine without one, or an index past the GPUs."""
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"{flag} {value!r}: unknown device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {value}: no CUDA GPU is available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {value}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type != "cpu":
        raise UserError(f"{flag} {value!r}: only cpu and cuda devices are supported")
    return device


def check_device_dtype(device: torch.device | str, dtype: torch.dtype) -> torch.device:
    """Fail with a clear message when the device does not exist or cannot run a matmul in dtype."""
    device = parse_device(device, "device")
    try:
        a = torch.ones(4, 4, dtype=dtype, device=device)
        torch.nn.functional.linear(a, a)
    except (RuntimeError, NotImplementedError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"device {device} cannot compute in {dtype} ({first}); "
                        f"pick another --dtype") from None
    return device
