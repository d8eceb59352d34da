"""Triton kernels for the single-token decode step, and a row-wise RMSNorm.

Legend: B batch, D inner width, N state size, R dt rank, K conv taps, H hidden, E = R + 2N (the
x_proj output [dt_r, B, C]).

Per layer a decode step is: add+norm (this file) -> in_proj (cuBLAS) -> conv step (this file) ->
x_proj (cuBLAS) -> fused SSM step (this file: the three weightless norms, dt_proj, bias +
softplus, state update, y = h.C, D skip and silu(z) gate) -> out_proj (cuBLAS). Each kernel
rounds where the plain PyTorch model rounds (the norms' outputs and dt to the model dtype), so the
fused path matches the layer-by-layer one to rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falcon_mamba.ops.triton_scan import _softplus

_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _round(v, MODE: tl.constexpr):
    # Emulate storing v in a narrower dtype and reading it back (the layer-by-layer path does).
    if MODE == 1:
        return v.to(tl.bfloat16).to(tl.float32)
    elif MODE == 2:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def _conv_step_kernel(state_ptr, x_ptr, w_ptr, bias_ptr, y_ptr, D, ss_b, ss_k, sx_b, sy_b, sw_d,
                      K: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    d = pid_d * BD + tl.arange(0, BD)
    md = d < D
    xraw = tl.load(x_ptr + b * sx_b + d, mask=md, other=0.0)
    acc = tl.load(w_ptr + d * sw_d + (K - 1), mask=md, other=0.0).to(tl.float32) * xraw.to(tl.float32)
    sp = state_ptr + b * ss_b + d
    for k in tl.static_range(K - 1):
        sk = tl.load(sp + k * ss_k, mask=md, other=0.0)
        acc += tl.load(w_ptr + d * sw_d + k, mask=md, other=0.0).to(tl.float32) * sk.to(tl.float32)
        if k > 0:
            tl.store(sp + (k - 1) * ss_k, sk, mask=md)  # shift left by one
    tl.store(sp + (K - 2) * ss_k, xraw.to(state_ptr.dtype.element_ty), mask=md)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=md, other=0.0).to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + b * sy_b + d, acc.to(y_ptr.dtype.element_ty), mask=md)


@triton.jit
def _ssm_step_kernel(
    state_ptr, x_ptr, z_ptr, dtr_ptr, b_ptr, c_ptr, wdt_ptr, dtb_ptr, a_ptr, dskip_ptr, y_ptr,
    D, R, eps,
    sx_b, sz_b, sdtr_b, sb_b, sc_b, swd, sy_b,
    N: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr, BD: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_DTB: tl.constexpr, NORM: tl.constexpr,
    DT_PROJ: tl.constexpr, A_LOG: tl.constexpr, RMODE: tl.constexpr,
):
    # One program: BD channels of one batch row. dtr_ptr holds dt (B, D) when not DT_PROJ, else the
    # rank-R dt input (B, R) that is normed (NORM) and projected by W_dt (D, R) here.
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    d = pid_d * BD + tl.arange(0, BD)
    md = d < D
    n = tl.arange(0, NP)
    mn = n < N
    if DT_PROJ:
        r = tl.arange(0, RP)
        mr = r < R
        dtr = tl.load(dtr_ptr + b * sdtr_b + r, mask=mr, other=0.0).to(tl.float32)
        if NORM:
            dtr = _round(dtr * tl.rsqrt(tl.sum(dtr * dtr, axis=0) / R + eps), RMODE)
        W = tl.load(wdt_ptr + d[:, None] * swd + r[None, :], mask=md[:, None] & mr[None, :],
                    other=0.0).to(tl.float32)
        v = _round(tl.sum(W * dtr[None, :], axis=1), RMODE)
    else:
        v = tl.load(dtr_ptr + b * sdtr_b + d, mask=md, other=0.0).to(tl.float32)
    Bv = tl.load(b_ptr + b * sb_b + n, mask=mn, other=0.0).to(tl.float32)
    Cv = tl.load(c_ptr + b * sc_b + n, mask=mn, other=0.0).to(tl.float32)
    if NORM:
        Bv = _round(Bv * tl.rsqrt(tl.sum(Bv * Bv, axis=0) / N + eps), RMODE)
        Cv = _round(Cv * tl.rsqrt(tl.sum(Cv * Cv, axis=0) / N + eps), RMODE)
    if HAS_DTB:
        v += tl.load(dtb_ptr + d, mask=md, other=0.0).to(tl.float32)
    sp = _softplus(v)
    dn = d[:, None].to(tl.int64) * N + n[None, :]
    mdn = md[:, None] & mn[None, :]
    A = tl.load(a_ptr + dn, mask=mdn, other=0.0).to(tl.float32)
    if A_LOG:
        A = -tl.exp(A)
    st = state_ptr + b * D * N + dn
    h = tl.load(st, mask=mdn, other=0.0)
    xv = tl.load(x_ptr + b * sx_b + d, mask=md, other=0.0).to(tl.float32)
    h = tl.exp2(sp[:, None] * A * 1.4426950408889634) * h + (sp * xv)[:, None] * Bv[None, :]
    tl.store(st, h, mask=mdn)
    yv = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        yv += tl.load(dskip_ptr + d, mask=md, other=0.0).to(tl.float32) * xv
    if HAS_Z:
        zv = tl.load(z_ptr + b * sz_b + d, mask=md, other=0.0).to(tl.float32)
        yv = yv * zv * tl.sigmoid(zv)
    tl.store(y_ptr + b * sy_b + d, yv.to(y_ptr.dtype.element_ty), mask=md)


@triton.jit
def _rms_kernel(x_ptr, res_ptr, w_ptr, xo_ptr, y_ptr, M, H, eps, sx, sres, sxo, sy,
                BR: tl.constexpr, BH: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
                WRITE_X: tl.constexpr, ROUND_IN: tl.constexpr, ROUND_Y: tl.constexpr):
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    cols = tl.arange(0, BH)
    m = (rows < M)[:, None] & (cols < H)[None, :]
    xv = tl.load(x_ptr + rows[:, None] * sx + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        xv += tl.load(res_ptr + rows[:, None] * sres + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if WRITE_X:
        tl.store(xo_ptr + rows[:, None] * sxo + cols[None, :], xv, mask=m)
    xv = _round(xv, ROUND_IN)
    rstd = tl.rsqrt(tl.sum(xv * xv, axis=1) / H + eps)
    yv = _round(xv * rstd[:, None], ROUND_Y)
    if HAS_W:
        yv = yv * tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * sy + cols[None, :], yv.to(y_ptr.dtype.element_ty), mask=m)


# ---- launchers --------------------------------------------------------------------------------

def conv_step(conv_state_BKD, x_BD, weight_DK, bias_D, silu=True) -> torch.Tensor:
    """One token through the conv; updates conv_state_BKD (B, K-1, D) in place; y (B, D)."""
    Bsz, D = x_BD.shape
    K = weight_DK.shape[1]
    assert conv_state_BKD.stride(-1) == 1 and x_BD.stride(-1) == 1 and weight_DK.stride(1) == 1
    y = torch.empty(Bsz, D, dtype=x_BD.dtype, device=x_BD.device)
    BD = 256
    _conv_step_kernel[(triton.cdiv(D, BD), Bsz)](
        conv_state_BKD, x_BD, weight_DK, bias_D if bias_D is not None else weight_DK, y, D,
        conv_state_BKD.stride(0), conv_state_BKD.stride(1), x_BD.stride(0), y.stride(0),
        weight_DK.stride(0), K=K, BD=BD, HAS_BIAS=bias_D is not None, SILU=silu, num_warps=2)
    return y


def ssm_step(state_BDN, x_BD, dt_or_dtr, A_DN, B_BN, C_BN, D_D, z_BD, dt_bias_D, *,
             W_dt=None, norm_eps=None, a_is_log=False) -> torch.Tensor:
    """One token of the scan; updates state_BDN (B, D, N) fp32 in place; returns y (B, D).

    Plain form (W_dt None): dt_or_dtr is dt (B, D) without bias. Fused form: dt_or_dtr is the
    rank-R dt input (B, R), projected here by W_dt (D, R); with norm_eps set, dt_r, B and C first go
    through the weightless RMSNorm (Falcon Mamba). a_is_log: A_DN holds A_log (A = -exp(A_log)).
    """
    Bsz, D = x_BD.shape
    N = A_DN.shape[1]
    assert state_BDN.dtype == torch.float32 and state_BDN.stride(2) == 1 and state_BDN.stride(1) == N
    assert state_BDN.stride(0) == D * N or Bsz == 1, "state rows must be (D, N) contiguous"
    y = torch.empty(Bsz, D, dtype=x_BD.dtype, device=x_BD.device)
    fused = W_dt is not None
    R = W_dt.shape[1] if fused else 1
    BD = 64 if fused else 128
    rdt = W_dt.dtype if fused else dt_or_dtr.dtype
    _ssm_step_kernel[(triton.cdiv(D, BD), Bsz)](
        state_BDN, x_BD, z_BD if z_BD is not None else x_BD, dt_or_dtr, B_BN, C_BN,
        W_dt if fused else A_DN, dt_bias_D if dt_bias_D is not None else A_DN, A_DN.contiguous(),
        D_D if D_D is not None else A_DN, y,
        D, R, float(norm_eps or 0.0),
        x_BD.stride(0), z_BD.stride(0) if z_BD is not None else 0, dt_or_dtr.stride(0),
        B_BN.stride(0), C_BN.stride(0), W_dt.stride(0) if fused else 0, y.stride(0),
        N=N, NP=triton.next_power_of_2(N), RP=triton.next_power_of_2(R), BD=BD,
        HAS_Z=z_BD is not None, HAS_D=D_D is not None, HAS_DTB=dt_bias_D is not None,
        NORM=norm_eps is not None, DT_PROJ=fused, A_LOG=a_is_log, RMODE=_ROUND.get(rdt, 0),
        num_warps=4,
    )
    return y


def rms_rows(x, weight, eps, *, residual=None, x_out=None, round_in=None, round_y=None,
             out_dtype=None) -> torch.Tensor:
    """RMSNorm over the last dim of a row-major (M, H) view: y = [weight *] round_y(rms(round_in(x
    [+ residual]))). Writes x + residual (fp32) to x_out when given. Returns y in out_dtype."""
    H = x.shape[-1]
    x2 = x.reshape(-1, H)
    M = x2.shape[0]
    out_dtype = out_dtype or x.dtype
    y = torch.empty(M, H, dtype=out_dtype, device=x.device)
    if M == 0:
        return y.reshape(x.shape)
    r2 = residual.reshape(-1, H) if residual is not None else None
    xo = x_out.reshape(-1, H) if x_out is not None else None
    BH = triton.next_power_of_2(H)
    BR = max(1, min(64, 2048 // BH))
    _rms_kernel[(triton.cdiv(M, BR),)](
        x2, r2 if r2 is not None else x2, weight if weight is not None else x2,
        xo if xo is not None else y, y, M, H, float(eps),
        x2.stride(0), r2.stride(0) if r2 is not None else 0, xo.stride(0) if xo is not None else 0,
        y.stride(0), BR=BR, BH=BH, HAS_RES=r2 is not None, HAS_W=weight is not None,
        WRITE_X=xo is not None, ROUND_IN=_ROUND[round_in] if round_in is not None else 0,
        ROUND_Y=_ROUND[round_y] if round_y is not None else 0, num_warps=4 if BH * BR >= 1024 else 1,
    )
    return y.reshape(*x.shape[:-1], H)
