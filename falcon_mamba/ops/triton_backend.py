"""The Triton backend: the functions of ``reference`` (same signatures), run by Triton kernels.

Legend: B batch, L length, D inner width, N state size, K conv taps, R dt rank, H hidden.

Training: selective_scan and causal_conv1d are autograd Functions (Triton forward, Triton scan
backward, Triton conv backward); rms_norm_backward is the training norm's backward (ops.rms_norm
under autograd: norm_autograd with this module's forward and backward kernels). The single-token
steps are inference kernels; when autograd needs their gradient they run the reference formula
instead (the same math, in torch).

The kernels need CUDA tensors (or TRITON_INTERPRET=1 with CPU tensors, for the CPU tests). A
kernel that cannot compile or launch on this GPU raises a UserError that says so: there is no
silent fall back to a slower path.
"""

from __future__ import annotations

import functools
import os

import torch

from falcon_mamba.errors import UserError
from falcon_mamba.ops import reference, triton_conv, triton_decode, triton_norm_bwd, triton_scan

NAME = "triton"


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _guard(fn):
    """Check the device, and turn a Triton compile/launch failure into a clear UserError."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        if x.device.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
            raise UserError(f"the triton op backend needs CUDA tensors, got {x.device.type}; "
                            f"use --backend torch (or reference) on this device")
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised with context below
            mod = type(e).__module__ or ""
            if not mod.startswith("triton"):
                raise
            gpu = torch.cuda.get_device_name(x.device) if x.device.type == "cuda" else "cpu"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"Triton kernel {fn.__name__} cannot run on {gpu} ({type(e).__name__}: "
                            f"{first}); use --backend torch to run without Triton") from e

    return wrapper


@_guard
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """See reference.rms_norm: y = rms(x) cast to x.dtype, times weight (promoted dtype)."""
    if _needs_grad(x, weight):
        return reference.rms_norm(x, weight, eps)
    out_dtype = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
    xc = x if x.stride(-1) == 1 else x.contiguous()
    return triton_decode.rms_rows(xc, weight, eps, round_y=x.dtype, out_dtype=out_dtype)


@_guard
def rms_norm_backward(x, weight, eps, g, need_dx=True, need_dw=True, *, residual_grad=None,
                      dx_dtype=None, y_dtype=None):
    """See norm_autograd.rms_norm_backward (and, with residual_grad and dx_dtype, the backward of
    norm_autograd.add_rms_norm): one Triton pass (triton_norm_bwd)."""
    return triton_norm_bwd.rms_norm_backward(x, weight, eps, g, need_dx, need_dw,
                                             residual_grad=residual_grad, dx_dtype=dx_dtype,
                                             y_dtype=y_dtype)


@_guard
def ce_rows_(logits, targets, grad):
    """See triton_ce.ce_rows_: a loss chunk's per-row cross-entropy (and, with grad, its softmax
    gradient written over the logits) in one kernel; the fused loss's GPU path."""
    from falcon_mamba.ops import triton_ce

    return triton_ce.ce_rows_(logits, targets, grad)


@_guard
def causal_conv1d(x_BLD, weight_DK, bias_D, conv_state_BKD=None, silu=True, reset_BL=None):
    """See reference.causal_conv1d. Returns (y (B, L, D), new conv state (B, K-1, D))."""
    if x_BLD.stride(-1) != 1:
        x_BLD = x_BLD.contiguous()
    if _needs_grad(x_BLD, weight_DK, bias_D, conv_state_BKD):
        return triton_conv.CausalConv1dFn.apply(x_BLD, weight_DK, bias_D, conv_state_BKD, reset_BL,
                                                silu)
    K = weight_DK.shape[1]
    y = triton_conv.conv_fwd(x_BLD, weight_DK, bias_D, conv_state_BKD, silu, reset_BL)
    return y, triton_conv.final_state(x_BLD, conv_state_BKD, reset_BL, K)


@_guard
def selective_scan(x_BLD, dt_BLD, A_DN, B_BLN, C_BLN, D_D=None, z_BLD=None, dt_bias_D=None,
                   state_BDN=None, reset_BL=None):
    """See reference.selective_scan. Returns (y (B, L, D) in x's dtype, final state (B, D, N) fp32)."""
    x_BLD, dt_BLD, B_BLN, C_BLN = (t if t.stride(-1) == 1 else t.contiguous()
                                   for t in (x_BLD, dt_BLD, B_BLN, C_BLN))
    if z_BLD is not None and z_BLD.stride(-1) != 1:
        z_BLD = z_BLD.contiguous()
    if _needs_grad(x_BLD, dt_BLD, A_DN, B_BLN, C_BLN, D_D, z_BLD, dt_bias_D, state_BDN):
        return triton_scan.SelectiveScanFn.apply(x_BLD, dt_BLD, A_DN, B_BLN, C_BLN, D_D, z_BLD,
                                                 dt_bias_D, state_BDN, reset_BL)
    y, hT, _ = triton_scan.scan_fwd(x_BLD, dt_BLD, A_DN.float(), B_BLN, C_BLN, D_D, z_BLD,
                                    dt_bias_D, None if state_BDN is None else state_BDN.float(),
                                    reset_BL)
    return y, hT


@_guard
def conv_step(conv_state_BKD, x_BD, weight_DK, bias_D, silu=True):
    """See reference.conv_step: updates conv_state_BKD in place, returns y (B, D)."""
    if _needs_grad(x_BD, weight_DK, bias_D) or conv_state_BKD.stride(-1) != 1:
        return reference.conv_step(conv_state_BKD, x_BD, weight_DK, bias_D, silu)
    if x_BD.stride(-1) != 1:
        x_BD = x_BD.contiguous()
    return triton_decode.conv_step(conv_state_BKD, x_BD, weight_DK.contiguous(), bias_D, silu)


@_guard
def ssm_step(state_BDN, x_BD, dt_BD, A_DN, B_BN, C_BN, D_D, z_BD, dt_bias_D):
    """See reference.ssm_step: updates state_BDN (fp32, or a state pool's bf16) in place, returns
    y (B, D)."""
    if (_needs_grad(x_BD, dt_BD, A_DN, B_BN, C_BN, D_D, z_BD, dt_bias_D)
            or not state_BDN.is_contiguous() or state_BDN.dtype not in (torch.float32, torch.bfloat16)):
        return reference.ssm_step(state_BDN, x_BD, dt_BD, A_DN, B_BN, C_BN, D_D, z_BD, dt_bias_D)
    x_BD, dt_BD, B_BN, C_BN = (t if t.stride(-1) == 1 else t.contiguous()
                               for t in (x_BD, dt_BD, B_BN, C_BN))
    if z_BD is not None and z_BD.stride(-1) != 1:
        z_BD = z_BD.contiguous()
    return triton_decode.ssm_step(state_BDN, x_BD, dt_BD, A_DN.float(), B_BN, C_BN, D_D, z_BD,
                                  dt_bias_D)


@_guard
def mixer_ssm_step(state_BDN, x_BD, z_BD, xdbl_BE, W_dt_DR, dt_bias_D, A_log_DN, D_D,
                   norm_eps: float | None, pairs_out=None, dt_normed: bool = False):
    """Fused decode tail of a mixer (see fused_reference.mixer_ssm_step): from the x_proj output
    [dt_r, B, C] (B, R+2N) to the gated y (B, D). Updates state_BDN in place. pairs_out: y also in
    the packed int4 GEMV's pair layout; dt_normed: dt_r already normed (triton_decode.ssm_step)."""
    R, N = W_dt_DR.shape[1], A_log_DN.shape[1]
    return triton_decode.ssm_step(
        state_BDN, x_BD, xdbl_BE[:, :R], A_log_DN, xdbl_BE[:, R:R + N], xdbl_BE[:, R + N:], D_D,
        z_BD, dt_bias_D, W_dt=W_dt_DR, norm_eps=norm_eps, a_is_log=True, pairs_out=pairs_out,
        dt_normed=dt_normed)


@_guard
def add_rms_norm(h_BH, out_BH, weight_H, eps, *, round_to, h_out=None, out_dtype=None, pairs_out=None,
                 rows=None):
    """Residual add then RMSNorm (see fused_reference.add_rms_norm): returns the normed rows;
    writes h + out (fp32) to h_out when given. round_to: the dtype the block norm sees (None for
    norm_f, which reads the fp32 stream). pairs_out: one row again in the packed int4 GEMV's pair
    layout; rows (B,) int64: h_BH is a table and row b is h_BH[rows[b]] (the token embeddings;
    triton_decode.rms_rows)."""
    return triton_decode.rms_rows(h_BH, weight_H, eps, residual=out_BH, x_out=h_out,
                                  round_in=round_to, round_y=round_to,
                                  out_dtype=out_dtype or weight_H.dtype, pairs_out=pairs_out, rows=rows)
