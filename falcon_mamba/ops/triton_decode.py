"""Triton kernels for the single-token decode step, and a row-wise RMSNorm.

Legend: B batch, D inner width, N state size, R dt rank, K conv taps, H hidden, E = R + 2N (the
x_proj output [dt_r, B, C]).

Per layer a decode step is: add+norm (this file) -> in_proj (cuBLAS) -> conv step (this file) ->
x_proj (cuBLAS) -> fused SSM step (this file: the three weightless norms, dt_proj, bias +
softplus, state update, y = h.C, D skip and silu(z) gate) -> out_proj (cuBLAS). dt_proj's weight
may be dense or quantized (quant/formats.py: int8 per row, int4 per group). Each kernel
rounds where the plain PyTorch model rounds (the norms' outputs and dt to the model dtype), so the
fused path matches the layer-by-layer one to rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falcon_mamba.ops import pdl
from falcon_mamba.ops.pdl import dep_sync
from falcon_mamba.ops.triton_helpers import LAUNCH_OPTIONS, softplus

_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# fused SSM step with dt_proj inside, batch 1 in a CUDA graph on the H100: 32 channels x all 256
# dt_proj columns per program 3.8 us; 64 x 64-column slices 5.6 us (benchmarks/kernel_bench.py ssm).
# (decode/step.py's merged-x_proj int4 mode asks for 16: faster there, slower in the others.)
SSM_BLOCK_D = 32
SSM_WARPS = 4
SSM_RB = 256  # dt_proj columns per slice (all of the 7B's rank in one)
RMS_WARPS = 8  # for rows of 2048+; fewer for short rows
RMS_WARPS_B1 = 16  # one row of 2048+ (batch-1 decode): int4 ~0.4 us less per 7B layer than 8, bf16
# and int8 the same (benchmarks/sweep_xproj.py, results/archive/dev-runs/h100-sweep-xproj-6233aa4.json)
DT_PROJ_MAX_BATCH = 4
# The step without the in-kernel projection (_ssm_rows_kernel: dt from one GEMM, batches above
# DT_PROJ_MAX_BATCH): one row of 128 channels per 4-warp program, timed inside the 16-layer decode
# step on the H200, where every layer's state is cold (benchmarks/sweep_step_kernels.py,
# results/h200-sweep-ssm-rows-35a8ab0.json), us a 7B layer, 128 x 4 against the 256 x 4 before it:
# 256 rows fp32 76.6 / 80.9 (85% of the copy rate for the state), bf16 50.3 / 55.8; 64 rows fp32
# 18.1 / 19.1, bf16 13.0 / 13.9; 128 x 2 warps, 256 x 8 and 512 x 4 / 8 were between the two or
# slower. (A loop over one layer's state, kernel_bench.py --parts ssmrows, had put 256 x 4 first:
# there 64 rows' 34 MB of state stayed in the 60 MB L2.) Two to eight rows per program sharing A's
# tile, as a plain or a software-pipelined loop, were slower in the step too (64 rows fp32
# 20.6-23.2, 256 rows 83.7-90.7): they were removed again.
SSM_ROWS_BLOCK_D = 128
SSM_ROWS_WARPS = 4
# The conv step (_conv_step_kernel): 512 channels per 8-warp program (2 a thread), timed inside
# the 16-layer decode step on the H200 (benchmarks/sweep_step_kernels.py --kernel conv,
# results/h200-sweep-conv-51d8f9b.txt), us a 7B layer against the 256 x 2 warps before: 256 rows
# 10.0 / 13.4 (81% of the copy rate for its bytes), 64 rows 3.8 / 4.7; 1024 x 16 was within noise,
# 4 channels a thread (128 x 1, 512 x 4, 1024 x 8) 13.5-20.9 at 256 rows. Reading the state's taps
# before the PDL wait (only x comes from in_proj) changed nothing (13.5 against 13.4) and went.
CONV_STEP_BLOCK_D = 512
CONV_STEP_WARPS = 8


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
def _pair_index(k, KW):
    # Where element k of a width-8*KW row goes in the "pair planes" layout the packed int4 GEMV
    # reads (ops/triton_gemv_i4.py): plane j = k % 4, word w = k // 8, half h = k % 8 // 4, so that
    # int32 (j, w) holds the bf16 pair (x[8w + j], x[8w + j + 4]).
    return 2 * ((k % 4) * KW + k // 8) + (k % 8) // 4


@triton.jit
def _ld(ptrs, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptrs, mask=mask, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _conv_window(xv, cst_ptr, cw_ptr, k, mk, s_ck, s_cw, CK: tl.constexpr, MASKED: tl.constexpr,
                 SHIFT: tl.constexpr):
    # sum_j w[k, j] * window_j[k] (fp32) over the window = state rows 0..CK-2 at channels k (1-D),
    # then xv (fp32, the new input as stored), in _conv_step_kernel's order. SHIFT: then shift the
    # state (CK-1, D) left by one and insert xv, in place. A channel's value may be held by several
    # threads of the program (Triton replicates small 1-D tensors across warps), so the old state is
    # kept in registers and a CTA barrier separates every thread's reads from any thread's writes:
    # reading and shifting slot by slot let a lagging warp read a slot another had already shifted.
    tl.static_assert(CK - 1 <= 4, "the fused conv-step helpers take at most 5 taps")
    acc = _ld(cw_ptr + k * s_cw + (CK - 1), mk, MASKED).to(tl.float32) * xv
    if SHIFT:
        jj = tl.arange(0, 4)[:, None] + tl.zeros((4, k.shape[0]), tl.int32)
        S = tl.zeros((4, k.shape[0]), tl.float32)
    for j in tl.static_range(CK - 1):
        sj = _ld(cst_ptr + j * s_ck + k, mk, MASKED).to(tl.float32)
        acc += _ld(cw_ptr + k * s_cw + j, mk, MASKED).to(tl.float32) * sj
        if SHIFT:
            S = tl.where(jj == j, sj[None, :], S)
    if SHIFT:
        tl.debug_barrier()  # every thread has read the old state
        for j in tl.static_range(1, CK - 1):
            old = tl.sum(tl.where(jj == j, S, 0.0), axis=0)  # row j (exact: the other rows add 0)
            tl.store(cst_ptr + (j - 1) * s_ck + k, old.to(cst_ptr.dtype.element_ty), mask=mk)
        tl.store(cst_ptr + (CK - 2) * s_ck + k, xv.to(cst_ptr.dtype.element_ty), mask=mk)
    return acc


@triton.jit
def _conv_in(x_ptr, cst_ptr, cw_ptr, cb_ptr, k, mk, s_ck, s_cw, CK: tl.constexpr, HAS_CB: tl.constexpr,
             MASKED: tl.constexpr, SHIFT: tl.constexpr, ROUND_X: tl.constexpr):
    # The conv step's output xc at channels k (1-D), fp32 holding a ROUND_X-rounded value:
    # silu(w[k, CK-1] * x[k] + sum_j w[k, j] * state[j, k] + bias[k]), in _conv_step_kernel's order
    # (the x_proj GEMV and the SSM step both call this, so their xc agree bit for bit). SHIFT: also
    # shift the state (CK-1, D) left and insert x, in place (see _conv_window).
    xraw = _ld(x_ptr + k, mk, MASKED)
    acc = _conv_window(xraw.to(tl.float32), cst_ptr, cw_ptr, k, mk, s_ck, s_cw, CK, MASKED, SHIFT)
    if HAS_CB:
        acc += _ld(cb_ptr + k, mk, MASKED).to(tl.float32)
    acc = acc * tl.sigmoid(acc)
    return _round(acc, ROUND_X)


@triton.jit
def _conv_step_kernel(state_ptr, x_ptr, w_ptr, bias_ptr, y_ptr, D, ss_b, ss_k, ss_d, sx_b, sy_b, sw_d,
                      K: tl.constexpr, EXTRA: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SILU: tl.constexpr, PDL: tl.constexpr):
    # The state holds EXTRA + K-1 slots of the last inputs (slot stride ss_k, channel stride ss_d):
    # the conv reads the last K-1; all of them shift left by one and the new input goes last.
    dep_sync(PDL)
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    d = pid_d * BD + tl.arange(0, BD)
    md = d < D
    xraw = tl.load(x_ptr + b * sx_b + d, mask=md, other=0.0)
    acc = tl.load(w_ptr + d * sw_d + (K - 1), mask=md, other=0.0).to(tl.float32) * xraw.to(tl.float32)
    s0 = state_ptr + b * ss_b + d * ss_d
    for e in tl.static_range(EXTRA):  # slots the conv does not read only move (before the window
        tl.store(s0 + e * ss_k, tl.load(s0 + (e + 1) * ss_k, mask=md, other=0.0), mask=md)  # shifts)
    sp = s0 + EXTRA * ss_k
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
def _dt_tile(w_ptr, sc_ptr, zp_ptr, d, md, r0, R, swd, sws, BD: tl.constexpr, RB: tl.constexpr,
             WQ: tl.constexpr, WG: tl.constexpr):
    # dt_proj's weight at rows d, columns r0 .. r0+RB-1 as an fp32 (BD, RB) tile, 0 past R. WQ 0:
    # dense as stored; 8: the int8 codes (the row scale is applied once, after the sum over r);
    # 4: (code - zero) * scale of the column's group (int4: the byte at column k // 2 holds k's code
    # in its low nibble for even k, the high one for odd k; scales/zeros (D, Rp/WG) row stride sws).
    r = r0 + tl.arange(0, RB)
    mr = r < R
    if WQ == 4:
        j = r0 // 2 + tl.arange(0, RB // 2)
        b = tl.load(w_ptr + d[:, None] * swd + j[None, :], mask=md[:, None] & (2 * j < R)[None, :], other=0)
        code = tl.reshape(tl.join(b & 15, b >> 4), (BD, RB))  # (BD, RB/2, 2) -> k = 2j, 2j + 1
        # scale and zero point per (row, group), repeated over the group's GW columns by a broadcast:
        # gathering them per column instead ((BD, RB) loads at r // WG) made Triton 3.9 lay the whole
        # step out around those loads (lanes along r), which spilled (benchmarks/results/
        # triton-3.6-vs-3.9-sm90a.txt). Columns past R in the last group get its scale and zero point,
        # not 0: their codes and their q are 0, so they add (0 - zp) * sc * 0 = 0 all the same.
        GW: tl.constexpr = RB if RB < WG else WG
        NG: tl.constexpr = RB // GW
        gi = r0 // WG + tl.arange(0, NG)
        g = d[:, None] * sws + gi[None, :]
        m = md[:, None] & (gi * WG < R)[None, :]
        zp = tl.load(zp_ptr + g, mask=m, other=0).to(tl.float32)
        sc = tl.load(sc_ptr + g, mask=m, other=0.0).to(tl.float32)
        zp = tl.reshape(tl.broadcast_to(zp[:, :, None], (BD, NG, GW)), (BD, RB))
        sc = tl.reshape(tl.broadcast_to(sc[:, :, None], (BD, NG, GW)), (BD, RB))
        return (code.to(tl.float32) - zp) * sc
    else:
        return tl.load(w_ptr + d[:, None] * swd + r[None, :], mask=md[:, None] & mr[None, :],
                       other=0.0).to(tl.float32)


@triton.jit
def _ssm_step_kernel(
    state_ptr, x_ptr, z_ptr, dtr_ptr, b_ptr, c_ptr, wdt_ptr, dtb_ptr, a_ptr, dskip_ptr, y_ptr,
    cst_ptr, cw_ptr, cb_ptr,
    D, R, eps,
    sx_b, sz_b, sdtr_b, sb_b, sc_b, swd, sy_b, scs_b, s_ck, s_cw,
    wsc_ptr, wz_ptr, sws,
    N: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr, RB: tl.constexpr, BD: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_DTB: tl.constexpr, NORM: tl.constexpr,
    A_LOG: tl.constexpr, RMODE: tl.constexpr,
    CONV_IN: tl.constexpr, CK: tl.constexpr, HAS_CB: tl.constexpr, ROUND_X: tl.constexpr,
    WQ: tl.constexpr, WG: tl.constexpr, PDL: tl.constexpr, yp_ptr=None, PAIRS: tl.constexpr = False,
):
    # One program: BD channels of one batch row (at most DT_PROJ_MAX_BATCH rows: every row re-reads
    # W_dt; more rows take _ssm_rows_kernel). dtr_ptr holds the rank-R dt input (B, R), normed here
    # when NORM and projected by W_dt (D, R) in RB-wide slices (a whole (BD, R) tile would not fit
    # the registers). NORM also norms B and C. WQ: W_dt's format
    # (_dt_tile; 8 and 4 read the scales at wsc_ptr, int4 the zero points at wz_ptr, group WG).
    # CONV_IN: x_ptr is the conv input (in_proj's x half); the conv step runs here for this program's
    # channels (xc as the x_proj GEMV recomputed it) and shifts the conv state (B, CK-1, D) in place.
    # What no other kernel of the step writes (A, D, the dt bias, W_dt when one slice holds all of R,
    # this layer's SSM state) is loaded before the PDL wait: a program launched while x_proj still
    # runs has it in registers when the inputs become readable.
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    d = pid_d * BD + tl.arange(0, BD)
    md = d < D
    n = tl.arange(0, NP)
    mn = n < N
    dn = d[:, None].to(tl.int64) * N + n[None, :]
    mdn = md[:, None] & mn[None, :]
    A = tl.load(a_ptr + dn, mask=mdn, other=0.0).to(tl.float32)
    if A_LOG:
        A = -tl.exp(A)
    st = state_ptr + b * D * N + dn
    h = tl.load(st, mask=mdn, other=0.0).to(tl.float32)  # fp32 or bf16 states (StatePool ssm_dtype)
    if HAS_D:
        dsk = tl.load(dskip_ptr + d, mask=md, other=0.0).to(tl.float32)
    if HAS_DTB:
        dtb = tl.load(dtb_ptr + d, mask=md, other=0.0).to(tl.float32)
    if RP == RB:
        W0 = _dt_tile(wdt_ptr, wsc_ptr, wz_ptr, d, md, 0, R, swd, sws, BD, RB, WQ, WG)
    dep_sync(PDL)
    # every input an earlier kernel wrote, loaded at once (one round trip to L2, not one per use)
    if RP == RB:
        r = tl.arange(0, RB)
        q0 = tl.load(dtr_ptr + b * sdtr_b + r, mask=r < R, other=0.0).to(tl.float32)
    Bv = tl.load(b_ptr + b * sb_b + n, mask=mn, other=0.0).to(tl.float32)
    Cv = tl.load(c_ptr + b * sc_b + n, mask=mn, other=0.0).to(tl.float32)
    if not CONV_IN:
        xv = tl.load(x_ptr + b * sx_b + d, mask=md, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z_ptr + b * sz_b + d, mask=md, other=0.0).to(tl.float32)
    rinv = 1.0
    if NORM:
        if RP == RB:
            ss = tl.sum(q0 * q0, axis=0)
        else:
            ss = 0.0
            for r0 in tl.static_range(0, RP, RB):
                r = r0 + tl.arange(0, RB)
                q = tl.load(dtr_ptr + b * sdtr_b + r, mask=r < R, other=0.0).to(tl.float32)
                ss += tl.sum(q * q, axis=0)
        rinv = tl.rsqrt(ss / R + eps)
    if RP == RB:  # all of R in the preloaded slice
        q = _round(q0 * rinv, RMODE)
        v = tl.sum(W0 * q[None, :], axis=1)
    else:
        v = tl.zeros((BD,), tl.float32)
        for r0 in range(0, RP, RB):  # a loop, not unrolled: one W slice in registers at a time
            r = r0 + tl.arange(0, RB)
            mr = r < R
            q = _round(tl.load(dtr_ptr + b * sdtr_b + r, mask=mr, other=0.0).to(tl.float32) * rinv, RMODE)
            W = _dt_tile(wdt_ptr, wsc_ptr, wz_ptr, d, md, r0, R, swd, sws, BD, RB, WQ, WG)
            v += tl.sum(W * q[None, :], axis=1)
    if WQ == 8:
        v = v * tl.load(wsc_ptr + d, mask=md, other=0.0)
    v = _round(v, RMODE)
    if NORM:
        Bv = _round(Bv * tl.rsqrt(tl.sum(Bv * Bv, axis=0) / N + eps), RMODE)
        Cv = _round(Cv * tl.rsqrt(tl.sum(Cv * Cv, axis=0) / N + eps), RMODE)
    if HAS_DTB:
        v += dtb
    sp = softplus(v)
    if CONV_IN:
        xv = _conv_in(x_ptr + b * sx_b, cst_ptr + b * scs_b, cw_ptr, cb_ptr, d, md, s_ck, s_cw, CK, HAS_CB,
                      True, True, ROUND_X)
    h = tl.exp2(sp[:, None] * A * 1.4426950408889634) * h + (sp * xv)[:, None] * Bv[None, :]
    tl.store(st, h.to(state_ptr.dtype.element_ty), mask=mdn)  # y below reads the unrounded h
    yv = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        yv += dsk * xv
    if HAS_Z:
        yv = yv * zv * tl.sigmoid(zv)
    tl.store(y_ptr + b * sy_b + d, yv.to(y_ptr.dtype.element_ty), mask=md)
    if PAIRS:  # batch 1: also in the packed int4 GEMV's pair layout
        tl.store(yp_ptr + _pair_index(d, D // 8), yv.to(yp_ptr.dtype.element_ty), mask=md)


@triton.jit
def _ssm_rows_kernel(
    state_ptr, x_ptr, z_ptr, dt_ptr, b_ptr, c_ptr, dtb_ptr, a_ptr, dskip_ptr, y_ptr,
    D, eps, sx_b, sz_b, sdt_b, sb_b, sc_b, sy_b,
    N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_DTB: tl.constexpr, NORM: tl.constexpr,
    A_LOG: tl.constexpr, RMODE: tl.constexpr, PDL: tl.constexpr,
):
    # One program: BD channels of row b whose dt (B, D) is given (dt_proj already ran as
    # one GEMM); NORM norms B and C (weightless RMSNorm). A and the row's state are loaded before
    # the PDL wait (no other kernel of the step writes them).
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    d = pid_d * BD + tl.arange(0, BD)
    md = d < D
    n = tl.arange(0, NP)
    mn = n < N
    dn = d[:, None].to(tl.int64) * N + n[None, :]
    mdn = md[:, None] & mn[None, :]
    A = tl.load(a_ptr + dn, mask=mdn, other=0.0).to(tl.float32)
    if A_LOG:
        A = -tl.exp(A)
    if HAS_D:
        dsk = tl.load(dskip_ptr + d, mask=md, other=0.0).to(tl.float32)
    if HAS_DTB:
        dtb = tl.load(dtb_ptr + d, mask=md, other=0.0).to(tl.float32)
    st = state_ptr + b * D * N + dn
    h = tl.load(st, mask=mdn, other=0.0).to(tl.float32)  # fp32 or bf16 states (StatePool ssm_dtype)
    dep_sync(PDL)
    Bv = tl.load(b_ptr + b * sb_b + n, mask=mn, other=0.0).to(tl.float32)
    Cv = tl.load(c_ptr + b * sc_b + n, mask=mn, other=0.0).to(tl.float32)
    xv = tl.load(x_ptr + b * sx_b + d, mask=md, other=0.0).to(tl.float32)
    v = tl.load(dt_ptr + b * sdt_b + d, mask=md, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z_ptr + b * sz_b + d, mask=md, other=0.0).to(tl.float32)
    if NORM:
        Bv = _round(Bv * tl.rsqrt(tl.sum(Bv * Bv, axis=0) / N + eps), RMODE)
        Cv = _round(Cv * tl.rsqrt(tl.sum(Cv * Cv, axis=0) / N + eps), RMODE)
    if HAS_DTB:
        v += dtb
    sp = softplus(v)
    h = tl.exp2(sp[:, None] * A * 1.4426950408889634) * h + (sp * xv)[:, None] * Bv[None, :]
    tl.store(st, h.to(state_ptr.dtype.element_ty), mask=mdn)  # y below reads the unrounded h
    yv = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        yv += dsk * xv
    if HAS_Z:
        yv = yv * zv * tl.sigmoid(zv)
    tl.store(y_ptr + b * sy_b + d, yv.to(y_ptr.dtype.element_ty), mask=md)


@triton.jit
def _rms_kernel(x_ptr, res_ptr, w_ptr, xo_ptr, y_ptr, M, H, eps, sx, sres, sxo, sy,
                BR: tl.constexpr, BH: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
                WRITE_X: tl.constexpr, ROUND_IN: tl.constexpr, ROUND_Y: tl.constexpr, PDL: tl.constexpr,
                yp_ptr=None, PAIRS: tl.constexpr = False, idx_ptr=None, IDX: tl.constexpr = False):
    dep_sync(PDL)
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    cols = tl.arange(0, BH)
    m = (rows < M)[:, None] & (cols < H)[None, :]
    xrows = rows
    if IDX:  # row r of x is row idx[r] of the table x_ptr (the token embeddings)
        xrows = tl.load(idx_ptr + rows, mask=rows < M, other=0).to(tl.int64)
    xv = tl.load(x_ptr + xrows[:, None] * sx + cols[None, :], mask=m, other=0.0).to(tl.float32)
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
    if PAIRS:  # one row (M == 1): also in the packed int4 GEMV's pair layout
        slot = rows[:, None] * 0 + _pair_index(cols, H // 8)[None, :]
        tl.store(yp_ptr + slot, yv.to(yp_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, sw_n, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # y[n] = sum_k w[n, k] x[k] for one row x (batch-1 decode): W streamed once, fp32 accumulation
    # in a (BN, BK) tile reduced at the end, output rounded to y's dtype (as cuBLAS does). K is a
    # constexpr (a layer's width): the loop is software-pipelined over it.
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    mn = n < N
    acc = tl.zeros((BN, BK), tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        mk = k < K
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * sw_n + k[None, :], mask=mn[:, None] & mk[None, :],
                    other=0.0)
        xv = tl.load(x_ptr + k, mask=mk, other=0.0)
        acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
    tl.store(y_ptr + n, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=mn)


# ---- launchers --------------------------------------------------------------------------------

def conv_step(conv_state_BKD, x_BD, weight_DK, bias_D, silu=True) -> torch.Tensor:
    """One token through the conv; updates conv_state_BKD (B, K-1, D) in place; y (B, D)."""
    assert conv_state_BKD.stride(-1) == 1
    return _conv_step(conv_state_BKD, conv_state_BKD.stride(1), 1, 0, x_BD, weight_DK, bias_D, silu)


def conv_step_channels_first(conv_state_BDS, x_BD, weight_DK, bias_D, silu=True) -> torch.Tensor:
    """conv_step on a state laid out (B, D, S), S >= K-1 (transformers' cache: S = K, the last S
    inputs, time contiguous): the conv reads the last K-1 slots; all S shift in place; y (B, D)."""
    K, S = weight_DK.shape[1], conv_state_BDS.shape[2]
    assert S >= K - 1, (S, K)
    return _conv_step(conv_state_BDS, conv_state_BDS.stride(2), conv_state_BDS.stride(1), S - (K - 1),
                      x_BD, weight_DK, bias_D, silu)


def _conv_step(state, ss_k: int, ss_d: int, extra: int, x_BD, weight_DK, bias_D, silu) -> torch.Tensor:
    Bsz, D = x_BD.shape
    K = weight_DK.shape[1]
    assert x_BD.stride(-1) == 1 and weight_DK.stride(1) == 1
    y = torch.empty(Bsz, D, dtype=x_BD.dtype, device=x_BD.device)
    BD = CONV_STEP_BLOCK_D
    _conv_step_kernel[(triton.cdiv(D, BD), Bsz)](
        state, x_BD, weight_DK, bias_D if bias_D is not None else weight_DK, y, D,
        state.stride(0), ss_k, ss_d, x_BD.stride(0), y.stride(0), weight_DK.stride(0), K=K, EXTRA=extra,
        BD=BD, HAS_BIAS=bias_D is not None, SILU=silu, num_warps=CONV_STEP_WARPS,
        **pdl.launch_kwargs(x_BD.device), **LAUNCH_OPTIONS)
    return y


def ssm_step(state_BDN, x_BD, dt_or_dtr, A_DN, B_BN, C_BN, D_D, z_BD, dt_bias_D, *,
             W_dt=None, norm_eps=None, a_is_log=False, block_d=None, rb=None,
             num_warps=None, conv=None, pairs_out=None, dt_normed=False) -> torch.Tensor:
    """One token of the scan; updates state_BDN (B, D, N) in place; returns y (B, D). The state is
    fp32, or bf16 (a state pool's opt-in: read into fp32, the new state rounded once when stored,
    y from the unrounded one, as mamba_ssm's selective_state_update does).

    Plain form (W_dt None): dt_or_dtr is dt (B, D) without bias. Fused form: dt_or_dtr is the
    rank-R dt input (B, R), projected here by W_dt (D, R); with norm_eps set, dt_r, B and C first go
    through the weightless RMSNorm (Falcon Mamba). W_dt is a dense tensor or a quantized
    ops.triton_gemv.GemvWeight (int8: codes (D, R) + fp32 scales (D,); int4: packed (D, Rp/2) +
    fp16 scales and uint8 zeros (D, Rp/G)): dequantized in fp32 in the kernel, dt rounded to
    dt_or_dtr's dtype (a dense W_dt: to its own dtype). Above DT_PROJ_MAX_BATCH rows the projection
    is one GEMM instead (in-kernel, every row would re-read W_dt). a_is_log: A_DN holds A_log.
    conv = (conv state (B, K-1, D), weight (D, K), bias (D,) or None): x_BD is the conv input
    (in_proj's x half) instead of xc; the kernel runs the conv step for its channels (as
    _conv_step_kernel, xc rounded to x's dtype), updates the conv state in place and uses xc as x.
    pairs_out (D,) in x's dtype, batch 1: y again in the packed int4 GEMV's pair layout (out_proj's
    input; _pair_index). conv and pairs_out need the in-kernel projection (W_dt, at most
    DT_PROJ_MAX_BATCH rows). Without it (W_dt None, or more rows) the step is _ssm_rows_kernel:
    block_d channels of one row per program (default SSM_ROWS_BLOCK_D). dt_normed: the fused
    form above DT_PROJ_MAX_BATCH rows with dt_r already through its norm (ops/triton_xproj.py's
    finish kernel did it); B and C are still normed here.
    """
    Bsz, D = x_BD.shape
    N = A_DN.shape[1]
    assert state_BDN.dtype in (torch.float32, torch.bfloat16)
    assert state_BDN.stride(2) == 1 and state_BDN.stride(1) == N
    assert state_BDN.stride(0) == D * N or Bsz == 1, "state rows must be (D, N) contiguous"
    if W_dt is not None and not isinstance(W_dt, torch.Tensor) and not W_dt.bits:
        W_dt = W_dt.w  # a dense GemvWeight: its tensor
    wq = None if W_dt is None or isinstance(W_dt, torch.Tensor) else W_dt  # quantized
    fused = W_dt is not None
    if dt_normed and not (fused and Bsz > DT_PROJ_MAX_BATCH):
        raise ValueError(f"ssm_step: dt_normed needs W_dt and more than {DT_PROJ_MAX_BATCH} rows")
    if fused and Bsz > DT_PROJ_MAX_BATCH:
        dt_r = dt_or_dtr
        if norm_eps is not None and not dt_normed:
            dt_r = rms_rows(dt_r, None, norm_eps, round_y=dt_r.dtype)
        if wq is None:
            dt_or_dtr = torch.nn.functional.linear(dt_r, W_dt)
        else:
            from falcon_mamba.quant.qlinear import quant_matmul

            dt_or_dtr = quant_matmul(dt_r, wq.w, wq.scales, wq.zeros, wq.bits, wq.group or None, wq.K)
        W_dt = wq = None
    y = torch.empty(Bsz, D, dtype=x_BD.dtype, device=x_BD.device)
    if W_dt is None:
        if conv is not None or pairs_out is not None:
            raise ValueError("ssm_step: conv and pairs_out need the in-kernel dt_proj "
                             f"(W_dt given, at most {DT_PROJ_MAX_BATCH} rows)")
        _ssm_rows_kernel[(triton.cdiv(D, block_d or SSM_ROWS_BLOCK_D), Bsz)](
            state_BDN, x_BD, z_BD if z_BD is not None else x_BD, dt_or_dtr, B_BN, C_BN,
            dt_bias_D if dt_bias_D is not None else A_DN, A_DN.contiguous(),
            D_D if D_D is not None else A_DN, y,
            D, float(norm_eps or 0.0), x_BD.stride(0), z_BD.stride(0) if z_BD is not None else 0,
            dt_or_dtr.stride(0), B_BN.stride(0), C_BN.stride(0), y.stride(0),
            N=N, NP=triton.next_power_of_2(N), BD=block_d or SSM_ROWS_BLOCK_D,
            HAS_Z=z_BD is not None, HAS_D=D_D is not None, HAS_DTB=dt_bias_D is not None,
            NORM=norm_eps is not None, A_LOG=a_is_log, RMODE=_ROUND.get(dt_or_dtr.dtype, 0),
            num_warps=num_warps or SSM_ROWS_WARPS, **pdl.launch_kwargs(x_BD.device), **LAUNCH_OPTIONS,
        )
        return y
    BD, warps = block_d or SSM_BLOCK_D, num_warps or SSM_WARPS
    if wq is not None:
        assert wq.w.stride(1) == 1 and wq.bits in (8, 4), "W_dt: a quantized GemvWeight, rows contiguous"
        R, w_ptr, swd = wq.K, wq.w, wq.w.stride(0)
        sws = wq.scales.stride(0) if wq.bits == 4 else 0
        if wq.bits == 4:
            assert wq.zeros.stride(0) == sws and wq.scales.stride(1) == wq.zeros.stride(1) == 1
        qargs = (wq.scales, wq.zeros if wq.zeros is not None else wq.scales, sws)
    else:
        R, w_ptr, swd = W_dt.shape[1], W_dt, W_dt.stride(0)
        qargs = (A_DN, A_DN, 0)
    WQ = wq.bits if wq is not None else 0
    RP = triton.next_power_of_2(R)
    RB = min(RP, rb or SSM_RB)
    if WQ == 4:  # whole bytes per slice
        RP, RB = max(RP, 2), max(RB, 2)
    rdt = W_dt.dtype if wq is None else dt_or_dtr.dtype
    if conv is not None:
        cst, cw, cb = conv
        assert x_BD.stride(-1) == 1 and cst.stride(-1) == 1 and cw.stride(1) == 1
        assert cst.shape[0] == Bsz and cst.shape[-1] == D and cw.shape[0] == D
        assert cst.shape[1] == cw.shape[1] - 1
        cargs = (cst, cw, cb if cb is not None else cw, cst.stride(0), cst.stride(1), cw.stride(0))
        CK = cw.shape[1]
    else:
        cargs, CK = (y, y, y, 0, 0, 0), 2
    _ssm_step_kernel[(triton.cdiv(D, BD), Bsz)](
        state_BDN, x_BD, z_BD if z_BD is not None else x_BD, dt_or_dtr, B_BN, C_BN,
        w_ptr, dt_bias_D if dt_bias_D is not None else A_DN, A_DN.contiguous(),
        D_D if D_D is not None else A_DN, y, *cargs[:3],
        D, R, float(norm_eps or 0.0),
        x_BD.stride(0), z_BD.stride(0) if z_BD is not None else 0, dt_or_dtr.stride(0),
        B_BN.stride(0), C_BN.stride(0), swd, y.stride(0), *cargs[3:], *qargs,
        N=N, NP=triton.next_power_of_2(N), RP=RP, RB=RB, BD=BD,
        HAS_Z=z_BD is not None, HAS_D=D_D is not None, HAS_DTB=dt_bias_D is not None,
        NORM=norm_eps is not None, A_LOG=a_is_log, RMODE=_ROUND.get(rdt, 0),
        CONV_IN=conv is not None, CK=CK, HAS_CB=conv is not None and conv[2] is not None,
        ROUND_X=_ROUND.get(x_BD.dtype, 0), WQ=WQ, WG=wq.group if WQ == 4 else 1,
        num_warps=warps, **pdl.launch_kwargs(x_BD.device), **_pairs_kwargs(pairs_out, Bsz, D, y.dtype),
        **LAUNCH_OPTIONS,
    )
    return y


def rms_rows(x, weight, eps, *, residual=None, x_out=None, round_in=None, round_y=None,
             out_dtype=None, pairs_out=None, rows=None) -> torch.Tensor:
    """RMSNorm over the last dim of a row-major (M, H) view: y = [weight *] round_y(rms(round_in(x
    [+ residual]))). Writes x + residual (fp32) to x_out when given. Returns y in out_dtype.
    pairs_out (H,) in y's dtype, one row only: y again in the packed int4 GEMV's pair layout
    (_pair_index; H a multiple of 8). rows (M,) int64: x is a table (V, H) and row r is x[rows[r]]
    (the decode step's token embeddings, gathered by the norm instead of a launch of their own)."""
    H = x.shape[-1]
    x2 = x.reshape(-1, H)
    M = x2.shape[0] if rows is None else rows.numel()
    lead = tuple(x.shape[:-1]) if rows is None else (M,)
    if rows is not None:
        assert x.dim() == 2 and rows.dtype == torch.int64 and rows.is_contiguous()
    out_dtype = out_dtype or x.dtype
    y = torch.empty(M, H, dtype=out_dtype, device=x.device)
    if M == 0:
        return y.reshape(*lead, H)
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
        ROUND_Y=_ROUND[round_y] if round_y is not None else 0,
        num_warps=((RMS_WARPS_B1 if M == 1 else RMS_WARPS) if BH * BR >= 2048
                   else (4 if BH * BR >= 512 else 1)),
        **pdl.launch_kwargs(x.device), **_pairs_kwargs(pairs_out, M, H, out_dtype),
        **({"idx_ptr": rows, "IDX": True} if rows is not None else {}), **LAUNCH_OPTIONS,
    )
    return y.reshape(*lead, H)


def _pairs_kwargs(pairs_out, rows: int, width: int, dtype) -> dict:
    """Kernel arguments for an optional pair-layout copy of a one-row output (see _pair_index)."""
    if pairs_out is None:
        return {}
    assert rows == 1 and width % 8 == 0 and pairs_out.numel() == width and pairs_out.dtype == dtype
    return {"yp_ptr": pairs_out, "PAIRS": True}


GEMV_BN, GEMV_BK, GEMV_WARPS, GEMV_STAGES = 8, 512, 4, 4


def gemv(x_1K: torch.Tensor, w_NK: torch.Tensor, bn=None, bk=None, num_warps=None,
         num_stages=None) -> torch.Tensor:
    """x (1, K) @ w (N, K)^T -> (1, N) in x's dtype: the batch-1 decode projection."""
    assert x_1K.shape[0] == 1 and w_NK.stride(1) == 1
    N, K = w_NK.shape
    x = x_1K if x_1K.stride(-1) == 1 else x_1K.contiguous()
    y = torch.empty(1, N, dtype=x_1K.dtype, device=x_1K.device)
    bn = bn or GEMV_BN
    _gemv_kernel[(triton.cdiv(N, bn),)](x, w_NK, y, N, w_NK.stride(0), K=K, BN=bn, BK=bk or GEMV_BK,
                                        num_warps=num_warps or GEMV_WARPS,
                                        num_stages=num_stages or GEMV_STAGES, **LAUNCH_OPTIONS)
    return y
