"""Triton selective scan (Mamba-1) backward, parallel over the length.

Legend: B batch, L length, D inner width, N state size (NP: N padded to a power of two), BD channels
per program, CHK steps between the states the forward saved, CL steps per length chunk (a multiple
of CHK; NC chunks per row), W steps per recompute window, T steps issued together.

The adjoint g_t = dL/dh_t runs backwards: at step t, g += C_t dy'_t (dy' = dy * silu(z)), the step's
gradients are taken, then g *= a_t = exp(dt_t A), and g = 0 where t starts a document. It is linear
in g, so a length chunk [s, e) maps its terminal adjoint G to M G + g_loc, with M = exp(A * sum of
dt over the chunk) (0 when a reset lies inside it) and g_loc the adjoint at s from a zero terminal
one. Three launches, as the length-chunked forward (triton_scan.scan_fwd):

1. ``_scan_bwd_local_kernel``, grid (D/BD, B, NC-1): each chunk but the first from a zero terminal
   adjoint: g_loc and the chunk's decay exponent. It reads dt, C, dy and z only (no states, no x).
2. ``_scan_bwd_carry_kernel``, grid (D/BD, B): walks a row's chunks from the last to the first,
   G = M_c G + g_loc_c, writing each chunk's true terminal adjoint (dhT enters at the last one).
3. ``_scan_bwd_kernel``, grid (D/BD, B, NC): each chunk from its terminal adjoint, walking its CHK
   sub-chunks in reverse: the states are recomputed from the forward's saved state of the sub-chunk
   (every W-th into scratch, then W at a time into a window), then the reverse recurrence writes
   dx, ddt, dz, adds dB, dC with relaxed atomics (sums over channel blocks) and keeps dA, dD and
   d(dt bias) in registers, stored per (row, chunk) and summed by the host. dh0 is chunk 0's
   adjoint at t = 0. With one chunk (NC = 1) passes 1 and 2 are skipped and pass 3 is the old
   single-pass kernel. A step's dB and dC leave its 32 channels as lane sums (lane_sums: a
   reduce-scatter, 32 shuffles where tl.sum took 160), and its x, dt, B and C are loaded during the
   step before it (BWD_AHEAD), as dy and z: the loop waits on latency more than on issue (8
   one-warp programs an SM), so a step's math should not wait on its own loads.

Pass 1 cannot be folded into pass 3: chunk c's terminal adjoint depends on every later chunk's
g_loc, so a chunk could only start after all later ones had finished their local pass, a grid-wide
dependency that needs a second launch (or spin-waiting on flags set by other programs, which
Triton cannot make safe: nothing guarantees those programs are scheduled). Its cost is one light
walk over the length (no states: ~70 instructions a step against ~650 for pass 3's reverse step).

Why windows (W) inside the CHK sub-chunks: recomputing a whole sub-chunk needs CHK states of
scratch per program (128 x 16 x 32 x 4 B = 256 KiB); at the 1.5B training shape (1024 programs
per chunk) that is 268 MB, all of the state history (4.3 GB written and ~4.3 GB read per layer,
past the 50 MB L2: HBM traffic, ~2 ms a layer), and it grows with the number of length chunks.
Two levels (every W-th state, then W states at a time) need (CHK/W + W + 1) slots: 25 at W = 16
(50 KiB per program); the window being rewritten is ~34 KiB per resident program, ~36 MB for the
~1056 resident programs: it stays in L2. The price is a second forward recompute of each step
(~100 instructions) beside the reverse step's ~650.

Measured and removed: the time axis as parallel scans instead (a (BL, BD) tile per state, the
forward and adjoint recurrences as tl.associative_scan, sums over the states in registers; git
6ce0027): 14.8-25.1 ms a layer at the 1.5B shape against this kernel's 6.43, over six tiles
(results/h200-scan-bwd-timescan-6ce0027.txt): the scans' shuffle and shared-memory rounds per
element cost more than the per-step reductions they remove.

Loops over runtime bounds are `while` loops (the interpreter of the CPU tests cannot run `range()`
over a runtime scalar with numpy >= 2.4); every (NP, BD) tensor is built from per-channel vectors
and per-state scalars (the layout note in triton_scan._scan_fwd_kernel); length offsets are int64.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from falcon_mamba.ops.triton_helpers import (
    LAUNCH_OPTIONS,
    bc_words,
    mask_and,
    row_values,
    softplus,
    softplus_t,
)

LN2 = 0.6931471805599453

# One warp of 32 channels x 16 states per program. More warps per program would split N or BD
# across warps, so the per-step reductions (over N for y, dx, ddt; over BD for dB, dC) would
# cross warps through shared memory with a barrier at every step.
BWD_BLOCK_D = 32
BWD_WARPS = 1
# Registers, not the grid, bound how many pass-3 programs an SM holds: 242-255 registers (sm_90a,
# Triton 3.9; the old single-pass kernel 219-236) leave room for 8 one-warp programs in 64k
# registers: ~1056 on 132 SMs. Past that, more programs only queue. Unrolling the reverse step
# (T steps' loads in flight, as the forward's DEFER) would need ~50 more registers a step (B, C,
# the state: 48 values) and spill: its latency is hidden by the second warp of each scheduler
# and by loading the next step's dy and z early instead.
BWD_PROGRAMS_PER_SM = 8
# A register cap for pass 3 (ptxas maxnreg; None: the compiler's 242-255). 168 would hold 12
# one-warp programs per SM instead of 8 at the price of spills (bench_scan_bwd.py --maxnreg times it).
BWD_MAXNREG = None
# The reverse step's x, dt, B and C loaded a step ahead (bf16 B and C of 16 states, as bc_words'
# 64-bit words: 18 registers more), so that a step's math does not wait on its own L2 loads.
BWD_AHEAD = True
# The reverse step's h_{t-1} (16 scratch loads from L2) issued a step ahead too (16 registers more).
# Prepared in session 18 without a GPU, so off: on sm_90a (Triton 3.9, inspect_kernels.py) it
# compiles to 254 registers, no spills, a reverse loop of 793 SASS instructions against 799; its
# time is not measured (benchmarks/NOTES.md, session 18).
BWD_PREFETCH_H = False
# Steps recomputed into scratch at a time: a divisor of CHK (CHK itself: one level, 256 KiB of
# scratch per program). 16 minimises CHK/W + W for CHK = 128.
BWD_WINDOW = 16
# Steps whose loads are issued together in the state recompute and in pass 1 (their bodies are
# small: ~19 registers a step); a divisor of W.
BWD_UNROLL = 4
# Length chunking (backward_chunk): pass 1's time per step relative to pass 3's (~20 SFU and ~70
# other instructions at 21-32 warps per SM, against ~900 instructions at 8), and at most this
# many chunks per row (the carry walks them in sequence) and programs in all (waves of the resident
# ones: splitting only trims the last wave's idle slots past that, while scratch grows with it).
BWD_LOCAL_COST = 0.15
BWD_MAX_CHUNKS = 64
BWD_MAX_WAVES = 4
CARRY_BLOCK_D = 32

_INTS_LOCAL = ["L", "D", "CL", "sdt_b", "sdt_l", "sz_b", "sz_l", "sc_b", "sc_l", "sr_b", "sr_l",
               "sdy_b", "sdy_l"]
_INTS_BWD = ["L", "D", "CL", "sgi_b", "sgi_c", "sx_b", "sx_l", "sdt_b", "sdt_l", "sz_b", "sz_l",
             "sb_b", "sb_l", "sc_b", "sc_l", "sr_b", "sr_l", "sdy_b", "sdy_l", "sdz_b", "sdz_l"]


@triton.jit
def _load_state(ptr, d64, md, nn, N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr):
    # (NP, BD) from a (D, N) fp32 block at ptr (ptr points at the row's d = 0, n = 0).
    s = tl.zeros((NP, BD), tl.float32)
    for k in tl.static_range(N):
        s = tl.where(nn == k, tl.load(ptr + d64 * N + k, mask=md, other=0.0).to(tl.float32)[None, :], s)
    return s


@triton.jit
def _store_slot(ptr, h, nn, N: tl.constexpr, BD: tl.constexpr):
    # One scratch slot: (N, BD) fp32, a state row of BD channels at a time (ptr includes the lane).
    for k in tl.static_range(N):
        tl.store(ptr + k * BD, tl.sum(tl.where(nn == k, h, 0.0), axis=0))


@triton.jit
def _recompute(h, A2, dtb, x_ptr, dt_ptr, b_ptr, rst_ptr, t0, L, d, md, nn, win_p,
               sx_l, sdt_l, sb_l, sr_l, N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr,
               T: tl.constexpr, HAS_DTB: tl.constexpr, HAS_RST: tl.constexpr, STORE: tl.constexpr,
               WORDS: tl.constexpr):
    # T forward steps from t0 (x_ptr... at this row); with STORE the state after step t0 + i goes to
    # the scratch slot win_p + i. No step's loads depend on the state: the compiler issues all T
    # steps' loads before the T dependent updates.
    for i in tl.static_range(T):
        t = t0 + i
        ok = t < L
        m = mask_and(md, ok)
        xv = tl.load(x_ptr + t * sx_l + d, mask=m, other=0.0).to(tl.float32)
        v = tl.load(dt_ptr + t * sdt_l + d, mask=m, other=0.0).to(tl.float32)
        if HAS_DTB:
            v += dtb
        sp = softplus(v)
        sp = tl.where(m, sp, 0.0)  # 0 past the end: the state stays put
        Bv = row_values(b_ptr + t * sb_l, ok, nn, N, NP, BD, WORDS)
        if HAS_RST:
            r = tl.load(rst_ptr + t * sr_l, mask=ok, other=0)
            h = tl.where(r != 0, 0.0, h)
        h = tl.exp2(sp[None, :] * A2) * h + (sp * xv)[None, :] * Bv
        if STORE:
            for k in tl.static_range(N):
                tl.store(win_p + (i * N + k) * BD, tl.sum(tl.where(nn == k, h, 0.0), axis=0))
    return h


@triton.jit(do_not_specialize=_INTS_LOCAL)
def _scan_bwd_local_kernel(
    dt_ptr, z_ptr, c_ptr, a_ptr, dtb_ptr, rst_ptr, dy_ptr, gloc_ptr, sum_ptr,
    L, D, CL, sdt_b, sdt_l, sz_b, sz_l, sc_b, sc_l, sr_b, sr_l, sdy_b, sdy_l,
    N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, T: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr, HAS_RST: tl.constexpr, BC_WORDS: tl.constexpr,
):
    # Pass 1: chunk c = program_id(2) + 1 (chunk 0's is never needed) from a zero terminal adjoint.
    # Writes gloc (B, NC, D, N): the adjoint at the chunk's start, and sum (B, NC, D): the chunk's
    # sum of dt (its decay is exp2(A2 * sum)), -1 where a reset inside it cuts the chain.
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2).to(tl.int64) + 1
    NC = tl.num_programs(2) + 1
    d = pid_d * BD + tl.arange(0, BD)
    md = d < D
    d64 = d.to(tl.int64)
    nn = tl.arange(0, NP)[:, None] + tl.zeros((NP, BD), tl.int32)
    A2 = _load_state(a_ptr, d64, md, nn, N, NP, BD) * 1.4426950408889634
    if HAS_DTB:
        dtb = tl.load(dtb_ptr + d, mask=md, other=0.0).to(tl.float32)
    g = tl.zeros((NP, BD), tl.float32)
    spsum = tl.zeros((BD,), tl.float32)
    seen_rst = tl.zeros((BD,), tl.int32)
    t_beg = c * CL
    t_end = tl.minimum(t_beg + CL, L)
    dt_p = dt_ptr + b * sdt_b + d
    z_p = z_ptr + b * sz_b + d
    dy_p = dy_ptr + b * sdy_b + d
    cc_p = c_ptr + b * sc_b
    r_p = rst_ptr + b * sr_b
    t0 = t_end - 1
    while t0 >= t_beg:
        for i in tl.static_range(T):
            t = t0 - i
            ok = t >= t_beg
            m = mask_and(md, ok)
            v = tl.load(dt_p + t * sdt_l, mask=m, other=0.0).to(tl.float32)
            if HAS_DTB:
                v += dtb
            sp = softplus(v)
            sp = tl.where(m, sp, 0.0)
            dyv = tl.load(dy_p + t * sdy_l, mask=m, other=0.0).to(tl.float32)
            if HAS_Z:
                zv = tl.load(z_p + t * sz_l, mask=m, other=0.0).to(tl.float32)
                dyv = dyv * zv * tl.sigmoid(zv)
            Cv = row_values(cc_p + t * sc_l, ok, nn, N, NP, BD, BC_WORDS)
            g = tl.exp2(sp[None, :] * A2) * (g + Cv * dyv[None, :])
            spsum += sp
            if HAS_RST:
                r = tl.load(r_p + t * sr_l, mask=ok, other=0)
                g = tl.where(r != 0, 0.0, g)
                seen_rst = tl.where(r != 0, 1, seen_rst)
        t0 -= T
    base = gloc_ptr + (b * NC + c) * D * N + d64 * N
    for k in tl.static_range(N):
        tl.store(base + k, tl.sum(tl.where(nn == k, g, 0.0), axis=0), mask=md)
    tl.store(sum_ptr + (b * NC + c) * D + d, tl.where(seen_rst != 0, -1.0, spsum), mask=md)


@triton.jit(do_not_specialize=["D", "NC"])
def _scan_bwd_carry_kernel(gloc_ptr, sum_ptr, a_ptr, dhT_ptr, D, NC,
                           N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, HAS_DHT: tl.constexpr):
    # Pass 2, the mirror of triton_scan._scan_carry_kernel: G = dhT; for c = NC-1 .. 1:
    # gloc[c] := G (chunk c's terminal adjoint); G = M_c G + gloc_c. Finally gloc[0] := G.
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    d = pid_d * BD + tl.arange(0, BD)
    md = d < D
    d64 = d.to(tl.int64)
    nn = tl.arange(0, NP)[:, None] + tl.zeros((NP, BD), tl.int32)
    A2 = _load_state(a_ptr, d64, md, nn, N, NP, BD) * 1.4426950408889634
    if HAS_DHT:
        g = _load_state(dhT_ptr + b * D * N, d64, md, nn, N, NP, BD)
    else:
        g = tl.zeros((NP, BD), tl.float32)
    c = NC - 1
    while c > 0:
        base = gloc_ptr + (b * NC + c) * D * N + d64 * N
        s = tl.load(sum_ptr + (b * NC + c) * D + d, mask=md, other=0.0)
        decay = tl.where(s[None, :] < 0.0, 0.0, tl.exp2(A2 * tl.maximum(s, 0.0)[None, :]))
        gl = tl.zeros((NP, BD), tl.float32)
        for k in tl.static_range(N):
            gl = tl.where(nn == k, tl.load(base + k, mask=md, other=0.0)[None, :], gl)
            tl.store(base + k, tl.sum(tl.where(nn == k, g, 0.0), axis=0), mask=md)
        g = decay * g + gl
        c -= 1
    base = gloc_ptr + b * NC * D * N + d64 * N
    for k in tl.static_range(N):
        tl.store(base + k, tl.sum(tl.where(nn == k, g, 0.0), axis=0), mask=md)




@triton.jit
def _words4(ptr, ok):
    """The 4 int64 words (16 bf16 values) of one (b, t) row of B or C at ptr (bc_words' layout)."""
    wp = ptr.to(tl.pointer_type(tl.int64))
    return (tl.load(wp, mask=ok, other=0), tl.load(wp + 1, mask=ok, other=0),
            tl.load(wp + 2, mask=ok, other=0), tl.load(wp + 3, mask=ok, other=0))


@triton.jit
def _bf16_of(word, j: tl.constexpr):
    """The j-th bf16 of an int64 word as fp32 (a bf16's bits are the top half of its fp32)."""
    return (((word >> (16 * j)) & 0xFFFF).to(tl.int32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _unpack16(w0, w1, w2, w3, nn, NP: tl.constexpr, BD: tl.constexpr):
    """(NP, BD) fp32 from _words4's words: value k in every element whose state index nn is k (the
    row_values layout)."""
    out = tl.zeros((NP, BD), tl.float32)
    for j in tl.static_range(4):
        out = tl.where(nn == j, _bf16_of(w0, j), out)
        out = tl.where(nn == 4 + j, _bf16_of(w1, j), out)
        out = tl.where(nn == 8 + j, _bf16_of(w2, j), out)
        out = tl.where(nn == 12 + j, _bf16_of(w3, j), out)
    return out


@triton.jit
def _halve_rows(v, lane, BIT: tl.constexpr, R: tl.constexpr, BD: tl.constexpr):
    """(R, BD) -> (R // 2, BD): a lane whose bit BIT is set keeps the upper half of the rows, the
    others the lower half, and adds its partner's (lane ^ 2^BIT) copy of the half it keeps."""
    lo, hi = tl.split(tl.permute(tl.reshape(v, (2, R // 2, BD)), (1, 2, 0)))
    up = ((lane >> BIT) & 1)[None, :] != 0
    partner = (lane ^ (1 << BIT))[None, :] + tl.zeros((R // 2, BD), tl.int32)
    return tl.where(up, hi, lo) + tl.gather(tl.where(up, lo, hi), partner, axis=1)


@triton.jit
def lane_sums(P, NP: tl.constexpr, BD: tl.constexpr, LOG_NP: tl.constexpr, LOG_BD: tl.constexpr):
    """P (NP, BD) -> (BD,): element l holds sum_d P[l >> (LOG_BD - LOG_NP), d], the row sums of P
    scattered over the BD elements (two or more hold each). With the channels on a warp's lanes
    (BD = 32, one warp) this is a reduce-scatter: each halving level shuffles half the rows left, so
    the 16 row sums of dB (or dC) cost 16 shuffles and adds and 30 selects a step, against 80
    shuffles and 64 adds for tl.sum(P, axis=1), which sums every row on every lane (pass 3's
    reverse step: ~320 of its ~780 SASS instructions were those two sums; sm_90a, Triton 3.9)."""
    lane = tl.arange(0, BD)
    v = P
    for i in tl.static_range(LOG_NP):
        v = _halve_rows(v, lane, LOG_BD - 1 - i, NP >> i, BD)
    v = tl.reshape(v, (BD,))
    for i in tl.static_range(LOG_BD - LOG_NP):
        v = v + tl.gather(v, lane ^ (1 << (LOG_BD - LOG_NP - 1 - i)), axis=0)
    return v


@triton.jit(do_not_specialize=_INTS_BWD)
def _scan_bwd_kernel(
    x_ptr, dt_ptr, z_ptr, b_ptr, c_ptr, a_ptr, dskip_ptr, dtb_ptr, rst_ptr, chk_ptr, dy_ptr,
    gin_ptr, scr_ptr,
    dx_ptr, ddt_ptr, dz_ptr, db_ptr, dc_ptr, dA_ptr, dD_ptr, ddtb_ptr, dh0_ptr, y_ptr,
    L, D, CL, sgi_b, sgi_c,
    sx_b, sx_l, sdt_b, sdt_l, sz_b, sz_l, sb_b, sb_l, sc_b, sc_l, sr_b, sr_l, sdy_b, sdy_l,
    sdz_b, sdz_l,
    N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, CHKS: tl.constexpr, W: tl.constexpr,
    T: tl.constexpr, HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_DTB: tl.constexpr,
    HAS_RST: tl.constexpr, HAS_GIN: tl.constexpr, HAS_Y: tl.constexpr, BC_WORDS: tl.constexpr,
    LOG_NP: tl.constexpr, LOG_BD: tl.constexpr, AHEAD: tl.constexpr, PREFETCH_H: tl.constexpr,
):
    # Pass 3. Gradient outputs dx, ddt are (B, L, D) contiguous, dz (B, L, D) with row strides
    # sdz_b, sdz_l (a half of the fused mixer's d(in_proj output)); db, dc (B, L, N) fp32, zeroed;
    # with HAS_Y the forward's output y = y_pre * silu(z) too (B, L, D) contiguous: the fused mixer
    # (mixer_autograd.py) takes out_proj's weight gradient from it instead of saving y.
    # dA (B, NC, D, N), dD and ddtb (B, NC, D): per-(row, chunk) partials summed by the caller.
    # gin: the chunk's terminal adjoint at gin_ptr + b * sgi_b + c * sgi_c, (D, N) fp32.
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2).to(tl.int64)
    nprog_d = tl.num_programs(0)
    NC = tl.num_programs(2)
    d = pid_d * BD + tl.arange(0, BD)
    md = d < D
    d64 = d.to(tl.int64)
    n = tl.arange(0, NP)
    nn = n[:, None] + tl.zeros((NP, BD), tl.int32)
    # dB and dC of a step leave as lane_sums: element l holds state ln[l] (its lowest
    # duplicate stores it)
    if LOG_NP <= LOG_BD:
        ln = tl.arange(0, BD) >> (LOG_BD - LOG_NP)
        mln = (ln < N) & ((tl.arange(0, BD) & ((1 << (LOG_BD - LOG_NP)) - 1)) == 0)
    else:
        ln = n
        mln = n < N
    A2 = _load_state(a_ptr, d64, md, nn, N, NP, BD) * 1.4426950408889634
    if HAS_GIN:
        g = _load_state(gin_ptr + b * sgi_b + pid_c * sgi_c, d64, md, nn, N, NP, BD)
    else:
        g = tl.zeros((NP, BD), tl.float32)
    if HAS_D:
        Dv = tl.load(dskip_ptr + d, mask=md, other=0.0).to(tl.float32)
    dtb = tl.zeros((BD,), tl.float32)
    if HAS_DTB:
        dtb = tl.load(dtb_ptr + d, mask=md, other=0.0).to(tl.float32)
    dA_acc = tl.zeros((NP, BD), tl.float32)
    dD_acc = tl.zeros((BD,), tl.float32)
    ddtb_acc = tl.zeros((BD,), tl.float32)
    # per-program scratch, (slot, N, BD) fp32, read and written one state row at a time (1-D, per
    # channel) for the layout rule: CHKS // W sub-chunk states, then a window of W + 1 states
    # (slot 0: the state before the window's first step)
    SLOT = N * BD
    prog = (b * nprog_d + pid_d) * NC + pid_c
    sub_p = scr_ptr + prog * ((CHKS // W + W + 1) * SLOT) + tl.arange(0, BD)
    win_p = sub_p + (CHKS // W) * SLOT
    x_p = x_ptr + b * sx_b
    dt_p = dt_ptr + b * sdt_b
    bb_p = b_ptr + b * sb_b
    r_p = rst_ptr + b * sr_b
    nchk = (L + CHKS - 1) // CHKS
    t_beg = pid_c * CL
    t_end = tl.minimum(t_beg + CL, L)
    kk = (t_end + CHKS - 1) // CHKS - 1  # the CHKS sub-chunks of [t_beg, t_end), last first
    while kk * CHKS >= t_beg:
        tstart = kk * CHKS
        nwin = (tl.minimum(L - tstart, CHKS) + W - 1) // W
        # 1) from the saved state, every W-th state into the sub-chunk slots
        h = _load_state(chk_ptr + (b * nchk + kk) * D * N, d64, md, nn, N, NP, BD)
        _store_slot(sub_p, h, nn, N, BD)
        w = 0
        while w < nwin - 1:
            i = 0
            while i < W:
                h = _recompute(h, A2, dtb, x_p, dt_p, bb_p, r_p, tstart + w * W + i, L, d, md, nn,
                               win_p, sx_l, sdt_l, sb_l, sr_l, N, NP, BD, T, HAS_DTB, HAS_RST, False,
                               BC_WORDS)
                i += T
            w += 1
            _store_slot(sub_p + w * SLOT, h, nn, N, BD)
        w = nwin - 1
        while w >= 0:
            tw = tstart + w * W
            nst = tl.minimum(L - tw, W)  # steps of this window inside the length
            # 2) the window's states into slots 1..nst (slot 0: the state before it)
            h = tl.zeros((NP, BD), tl.float32)
            for k in tl.static_range(N):
                h_k = tl.load(sub_p + w * SLOT + k * BD)
                h = tl.where(nn == k, h_k[None, :], h)
                tl.store(win_p + k * BD, h_k)
            i = 0
            while i < nst:
                h = _recompute(h, A2, dtb, x_p, dt_p, bb_p, r_p, tw + i, L, d, md, nn,
                               win_p + (i + 1) * SLOT, sx_l, sdt_l, sb_l, sr_l, N, NP, BD, T,
                               HAS_DTB, HAS_RST, True, BC_WORDS)
                i += T
            tl.debug_barrier()
            # 3) the reverse recurrence through the window. h_t is carried from the previous step's
            # h_{t-1} (the state after step nst - 1 for the first), so each step loads one state.
            # x, dt, B, reset and the states were just read or written by the recompute (L2 hits);
            # dy and z are read here first (HBM): the next step's are loaded before this step's
            # math, so their latency overlaps it (2 registers; the loop is at ~227 of 255).
            h_t = h
            j = nst - 1
            dout = tl.load(dy_ptr + b * sdy_b + (tw + j) * sdy_l + d, mask=md, other=0.0)
            zv = dout
            if HAS_Z:
                zv = tl.load(z_ptr + b * sz_b + (tw + j) * sz_l + d, mask=md, other=0.0)
            if AHEAD:  # this step's x, dt, B and C, loaded a step ahead as dy and z
                t0 = (tw + j).to(tl.int64)
                x_n = tl.load(x_p + t0 * sx_l + d, mask=md, other=0.0)
                v_n = tl.load(dt_p + t0 * sdt_l + d, mask=md, other=0.0)
                b0, b1, b2, b3 = _words4(bb_p + t0 * sb_l, t0 < L)
                c0, c1, c2, c3 = _words4(c_ptr + b * sc_b + t0 * sc_l, t0 < L)
            if PREFETCH_H:  # this step's h_{t-1} (scratch slot j), loaded a step ahead as well
                h_pre = tl.zeros((NP, BD), tl.float32)
                for k in tl.static_range(N):
                    h_pre = tl.where(nn == k, tl.load(win_p + (j * N + k) * BD)[None, :], h_pre)
            while j >= 0:
                t = (tw + j).to(tl.int64)
                m = md  # t < L inside the window
                mnext = mask_and(md, j > 0)
                dout_next = tl.load(dy_ptr + b * sdy_b + (t - 1) * sdy_l + d, mask=mnext, other=0.0)
                zv_next = dout_next
                if HAS_Z:
                    zv_next = tl.load(z_ptr + b * sz_b + (t - 1) * sz_l + d, mask=mnext, other=0.0)
                dout = dout.to(tl.float32)
                if AHEAD:
                    xv = x_n.to(tl.float32)
                    v = v_n.to(tl.float32)
                    Bv = _unpack16(b0, b1, b2, b3, nn, NP, BD)
                    Cv = _unpack16(c0, c1, c2, c3, nn, NP, BD)
                    okn = j > 0
                    x_n = tl.load(x_p + (t - 1) * sx_l + d, mask=mnext, other=0.0)
                    v_n = tl.load(dt_p + (t - 1) * sdt_l + d, mask=mnext, other=0.0)
                    b0, b1, b2, b3 = _words4(bb_p + (t - 1) * sb_l, okn)
                    c0, c1, c2, c3 = _words4(c_ptr + b * sc_b + (t - 1) * sc_l, okn)
                else:
                    xv = tl.load(x_p + t * sx_l + d, mask=m, other=0.0).to(tl.float32)
                    v = tl.load(dt_p + t * sdt_l + d, mask=m, other=0.0).to(tl.float32)
                    inside = t < L  # always: the window lies inside the length
                    Bv = row_values(bb_p + t * sb_l, inside, nn, N, NP, BD, BC_WORDS)
                    Cv = row_values(c_ptr + b * sc_b + t * sc_l, inside, nn, N, NP, BD, BC_WORDS)
                v += dtb
                sp, t_ = softplus_t(v)
                sp = tl.where(m, sp, 0.0)
                if PREFETCH_H:
                    h_prev = h_pre
                    h_pre = tl.zeros((NP, BD), tl.float32)
                    for k in tl.static_range(N):
                        h_pre = tl.where(nn == k, tl.load(win_p + ((j - 1) * N + k) * BD, mask=mnext,
                                                          other=0.0)[None, :], h_pre)
                else:
                    h_prev = tl.zeros((NP, BD), tl.float32)
                    for k in tl.static_range(N):
                        h_prev = tl.where(nn == k, tl.load(win_p + (j * N + k) * BD)[None, :], h_prev)
                hp = h_prev
                if HAS_RST:
                    r = tl.load(r_p + t * sr_l)
                    hp = tl.where(r != 0, 0.0, h_prev)
                y_raw = tl.sum(h_t * Cv, axis=0)
                if HAS_D:
                    y_pre = y_raw + Dv * xv
                else:
                    y_pre = y_raw
                if HAS_Z:
                    zv = zv.to(tl.float32)
                    sig = tl.sigmoid(zv)
                    dz = dout * y_pre * sig * (1.0 + zv * (1.0 - sig))
                    tl.store(dz_ptr + b * sdz_b + t * sdz_l + d, dz.to(dz_ptr.dtype.element_ty), mask=m)
                    dyv = dout * zv * sig
                    if HAS_Y:  # the forward's order: (y_pre * z) * sigmoid(z)
                        tl.store(y_ptr + (b * L + t) * D + d, (y_pre * zv * sig).to(y_ptr.dtype.element_ty),
                                 mask=m)
                else:
                    dyv = dout
                    if HAS_Y:
                        tl.store(y_ptr + (b * L + t) * D + d, y_pre.to(y_ptr.dtype.element_ty), mask=m)
                dxv = tl.zeros((BD,), tl.float32)
                if HAS_D:
                    dD_acc += dyv * xv
                    dxv = dyv * Dv
                g = g + Cv * dyv[None, :]  # dL/dh_t
                if LOG_NP <= LOG_BD:
                    dC = lane_sums(h_t * dyv[None, :], NP, BD, LOG_NP, LOG_BD)
                else:  # more states than channels a program: every lane sums every state
                    dC = tl.sum(h_t * dyv[None, :], axis=1)
                a = tl.exp2(sp[None, :] * A2)
                gB = tl.sum(g * Bv, axis=0)
                dxv += sp * gB
                gha = g * hp * a
                dsp = xv * gB + tl.sum(gha * A2, axis=0) * 0.6931471805599453  # A2 ln2 = A
                dA_acc += gha * sp[None, :]
                if LOG_NP <= LOG_BD:
                    dB = lane_sums(g * (sp * xv)[None, :], NP, BD, LOG_NP, LOG_BD)
                else:
                    dB = tl.sum(g * (sp * xv)[None, :], axis=1)
                dv = tl.where(m, dsp * (tl.where(v > 0.0, 1.0, t_) / (1.0 + t_)), 0.0)  # sigmoid(v)
                ddtb_acc += dv
                tl.store(dx_ptr + (b * L + t) * D + d, dxv.to(dx_ptr.dtype.element_ty), mask=m)
                tl.store(ddt_ptr + (b * L + t) * D + d, dv.to(ddt_ptr.dtype.element_ty), mask=m)
                # relaxed: plain sums read by later kernels. Triton's default (acq_rel) made each
                # of these two a fence that waited for the step's stores and held back the next
                # step's loads.
                tl.atomic_add(db_ptr + (b * L + t) * N + ln, dB, mask=mln, sem="relaxed")
                tl.atomic_add(dc_ptr + (b * L + t) * N + ln, dC, mask=mln, sem="relaxed")
                g = g * a  # dL/dh_{t-1} through the decay ...
                if HAS_RST:
                    g = tl.where(r != 0, 0.0, g)  # ... unless t started a new document
                h_t = h_prev
                dout = dout_next
                zv = zv_next
                j -= 1
            tl.debug_barrier()  # the next window's recompute overwrites the scratch
            w -= 1
        kk -= 1
    first = mask_and(md, pid_c == 0)
    for k in tl.static_range(N):
        sel = nn == k
        tl.store(dh0_ptr + b * D * N + d64 * N + k, tl.sum(tl.where(sel, g, 0.0), axis=0), mask=first)
        tl.store(dA_ptr + (b * NC + pid_c) * D * N + d64 * N + k, tl.sum(tl.where(sel, dA_acc, 0.0), axis=0),
                 mask=md)
    tl.store(dD_ptr + (b * NC + pid_c) * D + d, dD_acc, mask=md)
    tl.store(ddtb_ptr + (b * NC + pid_c) * D + d, ddtb_acc, mask=md)


def resident_programs(device: torch.device) -> int:
    """How many pass-3 programs the GPU holds at once (132 SMs where it is not a CUDA device)."""
    sms = (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda"
           else 132)
    return sms * BWD_PROGRAMS_PER_SM


@functools.lru_cache(maxsize=1024)
def _best_chunk(progs: int, L: int, chk_every: int, slots: int, max_chunks: int, max_waves: int,
                local_cost: float) -> int:
    best, best_cost = max(L, 1), float(triton.cdiv(progs, slots))  # one chunk
    for nc in range(2, min(max_chunks, triton.cdiv(L, chk_every)) + 1):
        CL = triton.cdiv(triton.cdiv(L, nc), chk_every) * chk_every
        NC = triton.cdiv(L, CL)
        if NC * progs > max_waves * slots:
            break
        cost = (triton.cdiv(NC * progs, slots) + local_cost * (NC - 1)) * CL / L
        if cost < best_cost - 1e-9:  # ties: fewer chunks (less scratch, no pass 1)
            best, best_cost = CL, cost
    return best


def backward_chunk(Bsz: int, L: int, D: int, block_d: int, chk_every: int, slots: int) -> int:
    """The length chunk CL the backward splits the length into: a multiple of chk_every (the
    forward's saved-state interval); L means one chunk, the single-pass backward.

    A model of the time in units of one full-length wave of programs: the NC chunks of CL steps
    make NC x (channel blocks x rows) programs (at most BWD_MAX_WAVES x slots), run in
    cdiv(programs, slots) waves of CL steps (slots: resident_programs()), plus pass 1 over NC - 1
    chunks at BWD_LOCAL_COST a step. The
    1.5B training shape (8 rows x 128 blocks = 1024 programs, ~1056 slots) keeps one chunk;
    batch 1 of it (128 programs) takes 8 chunks of 256 steps at L = 2048."""
    progs = triton.cdiv(D, block_d) * Bsz
    return _best_chunk(progs, L, chk_every, slots, BWD_MAX_CHUNKS, BWD_MAX_WAVES, BWD_LOCAL_COST)


def scan_bwd(x, dt, A, Bm, Cm, Dv, z, dt_bias, reset, chk, dy, dhT, chk_every, chunk=None,
             window=None, y_out=None, dz_out=None):
    """Launch the backward; returns fp32/input-dtype gradients
    (dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dh0); entries for absent inputs are None.

    Shapes as triton_scan.scan_fwd; chk (B, cdiv(L, chk_every), D, N) fp32: the states the forward
    saved every chk_every steps; dy (B, L, D), last dim contiguous; dhT (B, D, N) or None.
    chunk: the length chunk (default backward_chunk(); rounded up to a multiple of chk_every; L or
    more: one chunk). window: steps recomputed at a time (default BWD_WINDOW; a divisor of
    chk_every is used). y_out (B, L, D) contiguous, optional: filled with the forward's output y
    (rounded to y_out's dtype), recomputed on the way, so a caller need not have kept it. dz_out
    (B, L, D), last dim contiguous, any row strides, optional: where dz goes (and is returned)."""
    Bsz, L, D = x.shape
    N = A.shape[1]
    NP = triton.next_power_of_2(N)
    dev = x.device
    W = math.gcd(window or BWD_WINDOW, chk_every)
    T = math.gcd(BWD_UNROLL, W)
    CL = chunk or backward_chunk(Bsz, L, D, BWD_BLOCK_D, chk_every, resident_programs(dev))
    CL = triton.cdiv(max(1, min(CL, L)), chk_every) * chk_every  # chunks start on saved states
    NC = max(1, triton.cdiv(L, CL))
    dx = torch.empty(Bsz, L, D, dtype=x.dtype, device=dev)
    ddt = torch.empty(Bsz, L, D, dtype=dt.dtype, device=dev)
    dz = None
    if z is not None:
        dz = dz_out if dz_out is not None else torch.empty(Bsz, L, D, dtype=z.dtype, device=dev)
        assert dz.shape == z.shape and dz.stride(-1) == 1, "dz_out must be (B, L, D), last dim contiguous"
    dB = torch.zeros(Bsz, L, N, dtype=torch.float32, device=dev)
    dC = torch.zeros(Bsz, L, N, dtype=torch.float32, device=dev)
    dA = torch.empty(Bsz, NC, D, N, dtype=torch.float32, device=dev)
    dD = torch.empty(Bsz, NC, D, dtype=torch.float32, device=dev)
    ddtb = torch.empty(Bsz, NC, D, dtype=torch.float32, device=dev)
    dh0 = torch.empty(Bsz, D, N, dtype=torch.float32, device=dev)
    if y_out is not None:
        assert y_out.shape == x.shape and y_out.is_contiguous(), "y_out must be (B, L, D) contiguous"
    nprog = triton.cdiv(D, BWD_BLOCK_D)
    scratch = torch.empty(Bsz * nprog * NC * (chk_every // W + W + 1) * N * BWD_BLOCK_D,
                          dtype=torch.float32, device=dev)
    rst = reset.contiguous().view(torch.uint8) if reset is not None else None
    rr = rst if rst is not None else x
    sr = (rst.stride(0), rst.stride(1)) if rst is not None else (0, 0)
    zz = z if z is not None else x
    A = A.contiguous()
    if dhT is not None:
        dhT = dhT.contiguous()
    dtb = dt_bias if dt_bias is not None else A
    flags = dict(N=N, NP=NP, BD=BWD_BLOCK_D, num_warps=BWD_WARPS, **LAUNCH_OPTIONS)
    words = bc_words(Bm, Cm)
    if NC == 1:
        gin, sgi = dhT, (D * N, 0)
    else:
        # 1) every chunk but the first from a zero terminal adjoint; 2) the carry, last to first
        gin, sgi = torch.empty(Bsz, NC, D, N, dtype=torch.float32, device=dev), (NC * D * N, D * N)
        dsum = torch.empty(Bsz, NC, D, dtype=torch.float32, device=dev)
        _scan_bwd_local_kernel[(nprog, Bsz, NC - 1)](
            dt, zz, Cm, A, dtb, rr, dy, gin, dsum, L, D, CL,
            dt.stride(0), dt.stride(1), zz.stride(0), zz.stride(1), Cm.stride(0), Cm.stride(1), *sr,
            dy.stride(0), dy.stride(1),
            T=T, HAS_Z=z is not None, HAS_DTB=dt_bias is not None, HAS_RST=rst is not None,
            BC_WORDS=words, **flags)
        _scan_bwd_carry_kernel[(triton.cdiv(D, CARRY_BLOCK_D), Bsz)](
            gin, dsum, A, dhT if dhT is not None else A, D, NC,
            N=N, NP=NP, BD=CARRY_BLOCK_D, HAS_DHT=dhT is not None, num_warps=1, **LAUNCH_OPTIONS)
    # 3) every chunk from its terminal adjoint: the gradients
    _scan_bwd_kernel[(nprog, Bsz, NC)](
        x, dt, zz, Bm, Cm, A, Dv if Dv is not None else A, dtb, rr, chk, dy,
        gin if gin is not None else A, scratch,
        dx, ddt, dz if dz is not None else dx, dB, dC, dA, dD, ddtb, dh0,
        y_out if y_out is not None else dx, L, D, CL, *sgi,
        x.stride(0), x.stride(1), dt.stride(0), dt.stride(1), zz.stride(0), zz.stride(1),
        Bm.stride(0), Bm.stride(1), Cm.stride(0), Cm.stride(1), *sr, dy.stride(0), dy.stride(1),
        *((dz.stride(0), dz.stride(1)) if dz is not None else (0, 0)),
        CHKS=chk_every, W=W, T=T, HAS_Z=z is not None, HAS_D=Dv is not None,
        HAS_DTB=dt_bias is not None, HAS_RST=rst is not None, HAS_GIN=gin is not None,
        HAS_Y=y_out is not None, BC_WORDS=words, LOG_NP=NP.bit_length() - 1,
        LOG_BD=BWD_BLOCK_D.bit_length() - 1, AHEAD=BWD_AHEAD and words and N == 16,
        PREFETCH_H=BWD_PREFETCH_H, **flags,
        **({"maxnreg": BWD_MAXNREG} if BWD_MAXNREG else {}))
    return (dx, ddt, dA.sum((0, 1)), dB, dC, dD.sum((0, 1)) if Dv is not None else None, dz,
            ddtb.sum((0, 1)) if dt_bias is not None else None, dh0)
