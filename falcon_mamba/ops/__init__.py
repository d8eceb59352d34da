"""The op layer: one public function per op, dispatched to a backend.

Backends (each a module with the same functions and signatures as ``reference``):
- ``reference``: the spec; plain PyTorch, one time step at a time. Slow, exact.
- ``torch``: chunked pure-PyTorch scan (``chunked.py``); the CPU default, fast enough to train small
  models, and it runs on any device.
- ``triton``: GPU kernels (``triton_*.py``); the CUDA default once present.

The backend is chosen from the tensor's device unless the user overrides it with ``set_backend`` or
the ``FALCON_MAMBA_BACKEND`` environment variable. Asking for a backend that cannot run on the
tensors' device is an error, never a silent fall back to a slower path.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch

from falcon_mamba.errors import UserError

BACKENDS = {
    "reference": "falcon_mamba.ops.reference",
    "torch": "falcon_mamba.ops.chunked",
    "triton": "falcon_mamba.ops.triton_backend",
}

_override: str | None = os.environ.get("FALCON_MAMBA_BACKEND") or None
_modules: dict[str, ModuleType] = {}


def set_backend(name: str | None) -> None:
    """Force a backend for every op (None restores the automatic choice)."""
    global _override
    if name is not None and name not in BACKENDS:
        raise UserError(f"unknown op backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    _override = name


def _load(name: str) -> ModuleType:
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(BACKENDS[name])
        except ImportError as e:
            raise UserError(f"op backend {name!r} cannot be loaded here: {e}") from None
    return _modules[name]


@functools.cache  # a process's answer does not change; asked on every op call (~20 us uncached)
def _triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return importlib.util.find_spec(BACKENDS["triton"]) is not None


def backend_name(device: torch.device | str) -> str:
    """The backend ops on tensors of this device will use."""
    device = torch.device(device)
    if _override is not None:
        if _override == "triton" and device.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
            raise UserError(f"op backend 'triton' needs a CUDA device, but the tensors are on "
                            f"{device.type}; pick --backend torch or reference")
        return _override
    if device.type == "cuda":
        if _triton_usable():
            return "triton"
        return "torch"
    return "torch" if importlib.util.find_spec(BACKENDS["torch"]) is not None else "reference"


def _impl(x: torch.Tensor) -> ModuleType:
    return _load(backend_name(x.device))


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """See reference.rms_norm. The backend's kernel where it has one (Triton: one pass over the
    rows instead of six elementwise kernels in prefill); the reference formula otherwise. Under
    autograd, that forward with norm_autograd's backward (which keeps no fp32 copy of x), run by
    the backend's rms_norm_backward where it has one (Triton: one pass instead of ~12)."""
    impl = _impl(x)
    fwd = getattr(impl, "rms_norm", _load("reference").rms_norm)
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        from falcon_mamba.ops import norm_autograd

        # training: saves x only (not fp32 copies); the backend's backward kernel where it has one
        return norm_autograd.rms_norm(x, weight, eps, fwd, getattr(impl, "rms_norm_backward", None))
    return fwd(x, weight, eps)


def causal_conv1d(x_BLD, weight_DK, bias_D, conv_state_BKD=None, silu=True, *, reset_BL=None):
    """See reference.causal_conv1d. ``reset_BL`` (B, L) bool marks document starts (None: none)."""
    # reset_BL is passed only when given, so a backend without resets still serves inference.
    kw = {} if reset_BL is None else {"reset_BL": reset_BL}
    return _impl(x_BLD).causal_conv1d(x_BLD, weight_DK, bias_D, conv_state_BKD, silu, **kw)


def selective_scan(x_BLD, dt_BLD, A_DN, B_BLN, C_BLN, D_D=None, z_BLD=None, dt_bias_D=None,
                   state_BDN=None, *, reset_BL=None):
    """See reference.selective_scan. ``reset_BL`` (B, L) bool marks document starts (None: none)."""
    kw = {} if reset_BL is None else {"reset_BL": reset_BL}
    return _impl(x_BLD).selective_scan(x_BLD, dt_BLD, A_DN, B_BLN, C_BLN, D_D, z_BLD, dt_bias_D,
                                       state_BDN, **kw)


def conv_step(conv_state_BKD, x_BD, weight_DK, bias_D, silu=True):
    """See reference.conv_step (updates the conv state in place)."""
    return _impl(x_BD).conv_step(conv_state_BKD, x_BD, weight_DK, bias_D, silu)


def ssm_step(state_BDN, x_BD, dt_BD, A_DN, B_BN, C_BN, D_D, z_BD, dt_bias_D):
    """See reference.ssm_step (updates the SSM state in place)."""
    return _impl(x_BD).ssm_step(state_BDN, x_BD, dt_BD, A_DN, B_BN, C_BN, D_D, z_BD, dt_bias_D)
