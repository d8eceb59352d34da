"""The selective scan backward's gradient pass as block scans over time (pass 3 of triton_scan_bwd).

Legend: B batch, L length, D inner width, N state size, BL steps per block (= CHK, the forward's
saved-state interval: the block's initial state is a saved one), BD channels per program.

The step-by-step pass (triton_scan_bwd._scan_bwd_kernel) walks the time steps one at a time with
a thread per channel holding its N states, so dB_t and dC_t (sums over channels) cost two
5-level shuffle reductions per step, and the chain of dependent steps leaves it latency-bound
(6.4 ms a layer at the 1.5B training shape, ~24% of the issue rate). Here a program takes a block
of BL steps x BD channels as one (BL, BD) tile per state n (a loop over n: sums over n, such as
y, dx and ddt, accumulate in registers) and resolves both recurrences with parallel scans along
the time axis:

- forward, h_t = a_t h_{t-1} + bx_t (a_t = exp(dt_t A_n), bx_t = dt_t x_t B_t[n]): the inclusive
  scan of (a, bx) under (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2) gives (P_t, H_t) with
  h_t = P_t h_in + H_t, h_in the saved state at the block's start;
- backward, g_t = beta_t + X_t, X_{t-1} = a_t g_t (g = dL/dh_t, beta_t = C_t[n] dy'_t, X_t the
  adjoint of h_t from the future): a reverse scan of (a_first, K, V) segments, where a segment
  [i, j] maps X_j to g_i = V + K X_j and carries a_i for the next composition:
  [i, k] o [k+1, j] = (a_i, K1 a_{k+1} K2, V1 + K1 a_{k+1} V2). So g_t = V_t + K_t X_end with X_end
  the adjoint entering the block (the later block's a_{t0'} g_{t0'}, the chunk's terminal
  adjoint, or dhT), and no shifted tile is needed (a_{t+1} lives in the segment summary).

The gradients then take no cross-thread work but dB, dC (sums over the tile's channels: in-thread,
then across the few lanes along d) and dA (over the block's steps):
dx = dt sum_n g B + D dy', d(dt) = x sum_n g B + sum_n A g (h - bx) (a_t h_{t-1} = h_t - bx_t),
dA_n = sum_t dt g (h - bx), dB_t[n] = sum_d g dt x, dC_t[n] = sum_d h dy'. A reset at t (a new
document) sets a_t = 0, which cuts both recurrences. One exp per (t, d, n), shared by both scans.

Per program, a small scratch holds X (N, BD) between blocks; dA accumulates in place in the
(row, chunk) partials, which is why a barrier ends each block (other threads read what a thread
wrote). Loops over runtime bounds are `while` loops (the interpreter of the CPU tests).
"""

from __future__ import annotations

import triton
import triton.language as tl

from falcon_mamba.ops.triton_helpers import mask_and

# Channels per program and warps: a (BL, BD) fp32 tile is BL * BD / (32 * warps) registers a
# thread, ~14 of them live at once (the block's dt, dt x, dy', three sums over n, and the scans').
BLK_BLOCK_D = 32
BLK_WARPS = {8: 1, 16: 1, 32: 2, 64: 4, 128: 8}  # by BL (CPU tests use BL 8)
BLK_MAXNREG = None  # a register cap per thread (ptxas maxnreg), None: the compiler's choice


@triton.jit
def _fwd_combine(a1, b1, a2, b2):
    # (earlier, later) segments of h_t = a_t h_{t-1} + b_t
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _rev_combine(af2, k2, v2, af1, k1, v1):
    # the reverse scan passes (accumulated later segment, earlier segment); see the docstring
    ka = k1 * af2
    return af1, ka * k2, v1 + ka * v2


@triton.jit
def _scan_bwd_blocks_kernel(
    x_ptr, dt_ptr, z_ptr, b_ptr, c_ptr, a_ptr, dskip_ptr, dtb_ptr, rst_ptr, chk_ptr, dy_ptr,
    gin_ptr, scr_ptr,
    dx_ptr, ddt_ptr, dz_ptr, db_ptr, dc_ptr, dA_ptr, dD_ptr, ddtb_ptr, dh0_ptr, y_ptr,
    L, D, CL, sgi_b, sgi_c,
    sx_b, sx_l, sdt_b, sdt_l, sz_b, sz_l, sb_b, sb_l, sc_b, sc_l, sr_b, sr_l, sdy_b, sdy_l,
    sdz_b, sdz_l,
    N: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_DTB: tl.constexpr,
    HAS_RST: tl.constexpr, HAS_GIN: tl.constexpr, HAS_Y: tl.constexpr,
):
    # Grid (D / BD, B, NC); outputs as triton_scan_bwd._scan_bwd_kernel, except dA: (B, NC, N, D)
    # fp32 partials, zeroed by the caller. chk (B, cdiv(L, BL), D, N): the state before each block.
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2).to(tl.int64)
    NC = tl.num_programs(2)
    d = pid_d * BD + tl.arange(0, BD)
    md = d < D
    d64 = d.to(tl.int64)
    rows = tl.arange(0, BL)
    first_row = (rows == 0)[:, None]
    if HAS_D:
        Dv = tl.load(dskip_ptr + d, mask=md, other=0.0).to(tl.float32)
    if HAS_DTB:
        dtb = tl.load(dtb_ptr + d, mask=md, other=0.0).to(tl.float32)
    # X: the adjoint entering the current block, (N, BD) fp32 in this program's scratch
    nprog_d = tl.num_programs(0)
    xs_p = scr_ptr + ((b * nprog_d + pid_d) * NC + pid_c) * (N * BD) + tl.arange(0, BD)
    for n in tl.static_range(N):
        if HAS_GIN:
            X0 = tl.load(gin_ptr + b * sgi_b + pid_c * sgi_c + d64 * N + n, mask=md, other=0.0)
        else:
            X0 = tl.zeros((BD,), tl.float32)
        tl.store(xs_p + n * BD, X0)
    tl.debug_barrier()
    dA_p = dA_ptr + (b * NC + pid_c) * N * D + d
    dD_acc = tl.zeros((BD,), tl.float32)
    ddtb_acc = tl.zeros((BD,), tl.float32)
    nblk = (L + BL - 1) // BL
    t_beg = pid_c * CL
    t_end = tl.minimum(t_beg + CL, L)
    kb = (t_end + BL - 1) // BL - 1  # blocks of [t_beg, t_end), last first
    while kb * BL >= t_beg:
        # addresses: a 64-bit base per tensor and block, 32-bit offsets inside the block (a tile
        # of 64-bit pointers held through the loop over the states costs 2 registers an element)
        t0 = (kb * BL).to(tl.int64)
        t = kb * BL + rows
        ok = t < t_end
        m2 = ok[:, None] & md[None, :]
        r2 = rows[:, None]
        dd = d[None, :]
        x_b = x_ptr + b * sx_b + t0 * sx_l
        dt_b = dt_ptr + b * sdt_b + t0 * sdt_l
        dy_b = dy_ptr + b * sdy_b + t0 * sdy_l
        z_b = z_ptr + b * sz_b + t0 * sz_l
        bb_b = b_ptr + b * sb_b + t0 * sb_l
        cc_b = c_ptr + b * sc_b + t0 * sc_l
        o_b = (b * L + t0) * D  # dx, ddt, y: (B, L, D) contiguous
        bc_b = (b * L + t0) * N  # dB, dC: (B, L, N)
        xv = tl.load(x_b + (r2 * sx_l + dd), mask=m2, other=0.0).to(tl.float32)
        v = tl.load(dt_b + (r2 * sdt_l + dd), mask=m2, other=0.0).to(tl.float32)
        if HAS_DTB:
            v += dtb[None, :]
        u = tl.exp(tl.minimum(v, 20.0))  # softplus, inline: see triton_scan._softplus
        w = 1.0 + u
        lp = tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0))
        sp = tl.where(v > 20.0, v, tl.where(w == 1.0, u, lp))
        sp = tl.where(m2, sp, 0.0)  # 0 past the end: a = 1, bx = 0, the states pass through
        dout = tl.load(dy_b + (r2 * sdy_l + dd), mask=m2, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_b + (r2 * sz_l + dd), mask=m2, other=0.0).to(tl.float32)
            dyv = dout * zv * tl.sigmoid(zv)
        else:
            dyv = dout
        spx = sp * xv
        # only sp, spx and dy' stay live through the loop over the states: x, dt, dy and z are
        # read again after it (L1/L2 hits) rather than held (5 more tiles of registers)
        if HAS_RST:
            keep = (tl.load(rst_ptr + b * sr_b + t * sr_l, mask=ok, other=0) == 0)[:, None]
        ypre = tl.zeros((BL, BD), tl.float32)
        gB = tl.zeros((BL, BD), tl.float32)
        agh = tl.zeros((BL, BD), tl.float32)
        h0_p = chk_ptr + (b * nblk + kb) * D * N + d64 * N
        for s in range(N):  # states one at a time (not unrolled: static_range's 16 spilled at 255 registers)
            A2n = tl.load(a_ptr + d64 * N + s, mask=md, other=0.0).to(tl.float32) * 1.4426950408889634
            Bn = tl.load(bb_b + rows * sb_l + s, mask=ok, other=0.0).to(tl.float32)[:, None]
            Cn = tl.load(cc_b + rows * sc_l + s, mask=ok, other=0.0).to(tl.float32)[:, None]
            a = tl.exp2(sp * A2n[None, :])
            if HAS_RST:
                a = tl.where(keep, a, 0.0)
            bx = spx * Bn
            P, H = tl.associative_scan((a, bx), 0, _fwd_combine)
            hin = tl.load(h0_p + s, mask=md, other=0.0)
            h = P * hin[None, :] + H
            _, K, V = tl.associative_scan((a, tl.full((BL, BD), 1.0, tl.float32), Cn * dyv), 0,
                                          _rev_combine, reverse=True)
            X = tl.load(xs_p + s * BD)
            g = V + K * X[None, :]
            tl.store(xs_p + s * BD, tl.sum(tl.where(first_row, a * g, 0.0), axis=0))
            ypre += h * Cn
            gB += g * Bn
            gh = g * (h - bx)  # g_t a_t h_{t-1}
            agh += gh * A2n[None, :]
            dA_s = tl.load(dA_p + s * D, mask=md, other=0.0)
            tl.store(dA_p + s * D, dA_s + tl.sum(gh * sp, axis=0), mask=md)
            # relaxed: plain sums over the channel blocks, read by later kernels
            tl.atomic_add(db_ptr + bc_b + rows * N + s, tl.sum(g * spx, axis=1), mask=ok, sem="relaxed")
            tl.atomic_add(dc_ptr + bc_b + rows * N + s, tl.sum(h * dyv, axis=1), mask=ok, sem="relaxed")
        xv = tl.load(x_b + (r2 * sx_l + dd), mask=m2, other=0.0).to(tl.float32)
        dout = tl.load(dy_b + (r2 * sdy_l + dd), mask=m2, other=0.0).to(tl.float32)
        if HAS_D:
            ypre += Dv[None, :] * xv
            dxv = sp * gB + Dv[None, :] * dyv
            dD_acc += tl.sum(dyv * xv, axis=0)
        else:
            dxv = sp * gB
        o_off = r2 * D + dd
        if HAS_Z:
            zv = tl.load(z_b + (r2 * sz_l + dd), mask=m2, other=0.0).to(tl.float32)
            sig = tl.sigmoid(zv)
            dz = dout * ypre * sig * (1.0 + zv * (1.0 - sig))
            dz_b = dz_ptr + b * sdz_b + t0 * sdz_l
            tl.store(dz_b + (r2 * sdz_l + dd), dz.to(dz_ptr.dtype.element_ty), mask=m2)
            if HAS_Y:  # the forward's order: (y_pre * z) * sigmoid(z)
                tl.store(y_ptr + o_b + o_off, (ypre * zv * sig).to(y_ptr.dtype.element_ty), mask=m2)
        elif HAS_Y:
            tl.store(y_ptr + o_b + o_off, ypre.to(y_ptr.dtype.element_ty), mask=m2)
        dsp = xv * gB + agh * 0.6931471805599453  # A2 ln2 = A
        v = tl.load(dt_b + (r2 * sdt_l + dd), mask=m2, other=0.0).to(tl.float32)
        if HAS_DTB:
            v += dtb[None, :]
        dv = tl.where(m2, dsp * tl.where(v > 20.0, 1.0, tl.sigmoid(v)), 0.0)
        ddtb_acc += tl.sum(dv, axis=0)
        tl.store(dx_ptr + o_b + o_off, dxv.to(dx_ptr.dtype.element_ty), mask=m2)
        tl.store(ddt_ptr + o_b + o_off, dv.to(ddt_ptr.dtype.element_ty), mask=m2)
        tl.debug_barrier()  # X and dA were written by other threads than will read them
        kb -= 1
    first = mask_and(md, pid_c == 0)
    for n in tl.static_range(N):
        tl.store(dh0_ptr + b * D * N + d64 * N + n, tl.load(xs_p + n * BD), mask=first)
    tl.store(dD_ptr + (b * NC + pid_c) * D + d, dD_acc, mask=md)
    tl.store(ddtb_ptr + (b * NC + pid_c) * D + d, ddtb_acc, mask=md)
