"""Triton selective scan (Mamba-1): forward kernels, their launcher and the autograd Function (the
backward's kernels are in triton_scan_bwd.py; scan_bwd is re-exported here).

Legend: B batch, L length, D inner width, N state size (NP: N padded to a power of two), BD channels
per program, T time steps unrolled per chunk, CHK steps between saved states (backward).

Forward: one program owns BD channels of one batch row and walks the length in chunks of T steps
with its (NP, BD) state in fp32 registers. Each thread holds one channel's N states, so the
y = h @ C reduction stays inside a thread. A chunk's loads do not depend on the recurrence and its
outputs are stored once at the chunk's end (DEFER), so the compiler can issue all of a chunk's
loads before its math: the latency is hidden by instruction-level parallelism rather than by many
warps (batch 1 has only D/BD programs). Length offsets are 64-bit (pointer increments, int64).

Length chunks (length_chunk; infer_chunk without saved states): where a row's channel blocks are
too few programs to fill the GPU, the length is split into chunks scanned in parallel: each from a
zero state (its final state and total decay), a carry kernel across the chunks, then each chunk
again from its true initial state.

Backward (triton_scan_bwd.py): the forward saves the state every CHK steps. The backward is
parallel over length chunks as well: the adjoint dL/dh is carried backwards across the chunks
(each chunk from a zero terminal adjoint, a reverse carry, then each chunk again), and within a
chunk the states are recomputed from the saved ones a short window at a time for the reverse
recurrence g_{t-1} = exp(dt_t A) g_t.

Loops over runtime bounds are `while` loops: Triton's interpreter (TRITON_INTERPRET=1, the CPU
tests) cannot run `range()` over a runtime scalar with numpy >= 2.4.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from falcon_mamba.ops.triton_helpers import LAUNCH_OPTIONS, bc_words, mask_and, row_values, softplus
from falcon_mamba.ops.triton_scan_bwd import scan_bwd  # noqa: F401 (the backward; re-exported)

LOG2E = 1.4426950408889634

# Launch defaults (tuned on the H100, the unroll on the H200; see benchmarks/NOTES.md).
FWD_BLOCK_D = 32
# Steps per chunk of loads (T). The chunked passes of a long row: T=2 (7B width, H200, Triton 3.6:
# 1 x 16384 2.18 ms a layer vs 2.28 at T=4; 1 x 2048 0.338 vs 0.371); one pass over many rows (a
# burst of prompts, 64 x 32: 0.195 vs 0.207) and training's passes with saved states (8 x 2048 at
# D 4096: 1.33 vs 1.61): T=4 (results/h200-scan-fwd-30c8da3.txt).
FWD_UNROLL = 2
FWD_UNROLL_WIDE = 4
FWD_WARPS = 1
FWD_DEFER = True
CHK = 128  # steps between saved states for the backward; a multiple of the unrolls
# Length chunking of the forward (length_chunk): aim for this many programs in all, at most this
# many chunks per row (the carry pass walks them in sequence), chunks at least this long.
FWD_CHUNK_PROGRAMS = 16384
FWD_MAX_CHUNKS = 64
FWD_MIN_CHUNK = 256
# (Measured and removed: one pass at T=2 from 1024 (row, channel block) programs, the 1.5B training
# shape: 1.19-1.22 ms a layer under do_bench against 1.34-1.36 for these chunks, but 2.7 ms inside
# the training step against 1.2 there; results/h200-scan-fwd-train-8d87f75.txt, NOTES session 18.)
# ...and without saved states (inference: prompt chunks; infer_chunk): a row of at least two
# FWD_MIN_CHUNK_INFER is cut into FWD_INFER_CHUNKS chunks, each FWD_MIN_CHUNK_INFER to
# FWD_MAX_CHUNK_INFER steps long (and within length_chunk's caps). Batch 1 at the 7B width on the
# H200 (results/h200-scan-inference-chunks-2e69a9a.txt), ms a layer: 1024 tokens 0.258 in chunks
# of 64 (= of 32; 0.275 of 128); 2048: 0.351 of 128 against 0.369 of 64 and 0.383 of 256; 4096:
# 0.669 of 256 (0.650 of 128); 16k: 2.275 of 256 against 2.385 of 128 and 2.312 of 512. Below
# ~1024 tokens those timings (do_bench, no CUDA graph) are bound by the three launches' host time
# (~0.25-0.30 ms whatever the chunk), so short rows keep the 64-step chunks chosen before
# (a 512-token chunk's two 256-step passes took 2 x 152 us a layer: h200-profile-prefill-9786fe1).
FWD_INFER_CHUNKS = 16
FWD_MIN_CHUNK_INFER = 64
FWD_MAX_CHUNK_INFER = 256
CARRY_BLOCK_D = 32


@triton.jit
def _decay_and_state(a_ptr, h0_ptr, d64, md, nn, N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr,
                     HAS_H0: tl.constexpr):
    # (NP, BD) A * log2(e) and the initial state (zeros without h0; h0_ptr points at this row's
    # (D, N) state), built from per-channel loads: see the layout note in _scan_fwd_kernel.
    A2 = tl.zeros((NP, BD), tl.float32)
    h = tl.zeros((NP, BD), tl.float32)
    for k in tl.static_range(N):
        a_k = tl.load(a_ptr + d64 * N + k, mask=md, other=0.0).to(tl.float32)
        A2 = tl.where(nn == k, a_k[None, :] * 1.4426950408889634, A2)
        if HAS_H0:
            h_k = tl.load(h0_ptr + d64 * N + k, mask=md, other=0.0).to(tl.float32)
            h = tl.where(nn == k, h_k[None, :], h)
    return A2, h


_INTS_FWD = ["L", "D", "sx_b", "sx_l", "sdt_b", "sdt_l", "sz_b", "sz_l", "sb_b", "sb_l", "sc_b", "sc_l",
             "sy_b", "sy_l", "sr_b", "sr_l"]


# Lengths and strides are not specialised on (divisibility by 16, == 1): one compiled kernel
# serves every shape; the per-lane 1-element loads gain nothing from known alignment.
@triton.jit(do_not_specialize=_INTS_FWD)
def _scan_fwd_kernel(
    x_ptr, dt_ptr, z_ptr, b_ptr, c_ptr, a_ptr, dskip_ptr, dtb_ptr, h0_ptr, rst_ptr,
    y_ptr, hT_ptr, chk_ptr, sum_ptr,
    L, D, CL, sh0_b, sh0_c,
    sx_b, sx_l, sdt_b, sdt_l, sz_b, sz_l, sb_b, sb_l, sc_b, sc_l, sy_b, sy_l, sr_b, sr_l,
    N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, T: tl.constexpr, CHKS: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_DTB: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_RST: tl.constexpr, SAVE_CHK: tl.constexpr, DEFER: tl.constexpr, STATE_ONLY: tl.constexpr,
    STORE_HT: tl.constexpr, BC_WORDS: tl.constexpr,
):
    # Layout: every (NP, BD) tensor here is built from 1-D per-channel loads (one lane per
    # channel) and per-state scalars, so Triton gives it its default layout: one register per
    # state n in each lane. Loading A or the state as (NP, BD) tiles instead makes Triton pick a
    # layout with n across lanes, and the loop then pays shared-memory layout conversions (and
    # barriers) at every step: 20x slower on the H100 (benchmarks/NOTES.md).
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2).to(tl.int64)  # length chunk [t_beg, t_end) of CL steps
    d = pid_d * BD + tl.arange(0, BD)
    md = d < D
    d64 = d.to(tl.int64)
    nn = tl.arange(0, NP)[:, None] + tl.zeros((NP, BD), tl.int32)  # the state index of each element
    A2, h = _decay_and_state(a_ptr, h0_ptr + b * sh0_b + pid_c * sh0_c, d64, md, nn, N, NP, BD, HAS_H0)
    if HAS_D:
        Dv = tl.load(dskip_ptr + d, mask=md, other=0.0).to(tl.float32)
    if HAS_DTB:
        dtb = tl.load(dtb_ptr + d, mask=md, other=0.0).to(tl.float32)
    t_beg = pid_c * CL
    t_end = tl.minimum(t_beg + CL, L)
    x_p = x_ptr + b * sx_b + t_beg * sx_l + d
    dt_p = dt_ptr + b * sdt_b + t_beg * sdt_l + d
    z_p = z_ptr + b * sz_b + t_beg * sz_l + d
    bb_p = b_ptr + b * sb_b + t_beg * sb_l  # scalar pointers: B and C are shared by all channels
    cc_p = c_ptr + b * sc_b + t_beg * sc_l
    y_p = y_ptr + b * sy_b + t_beg * sy_l + d
    r_p = rst_ptr + b * sr_b + t_beg * sr_l
    rows = tl.arange(0, T)
    nchk = (L + CHKS - 1) // CHKS
    if STATE_ONLY:
        spsum = tl.zeros((BD,), tl.float32)  # the chunk's total decay is exp2(A2 * spsum) ...
        seen_rst = tl.zeros((BD,), tl.int32)  # ... or 0 after a document reset inside it
    t0 = t_beg
    while t0 < t_end:
        if SAVE_CHK:
            if t0 % CHKS == 0:
                base = chk_ptr + (b * nchk + t0 // CHKS) * D * N + d64 * N
                for k in tl.static_range(N):
                    tl.store(base + k, tl.sum(tl.where(nn == k, h, 0.0), axis=0), mask=md)
        if DEFER and not STATE_ONLY:
            Y = tl.zeros((T, BD), tl.float32)
        for i in tl.static_range(T):
            ok = (t0 + i) < t_end
            m = mask_and(md, ok)
            xv = tl.load(x_p, mask=m, other=0.0).to(tl.float32)
            v = tl.load(dt_p, mask=m, other=0.0).to(tl.float32)
            if HAS_DTB:
                v += dtb
            sp = softplus(v)
            sp = tl.where(m, sp, 0.0)  # 0 past the end: the state stays put
            # B and C of this step (C only where y is made); see triton_helpers.row_values
            Bv = row_values(bb_p, ok, nn, N, NP, BD, BC_WORDS)
            if not STATE_ONLY:
                Cv = row_values(cc_p, ok, nn, N, NP, BD, BC_WORDS)
            if HAS_RST:
                r = tl.load(r_p, mask=ok, other=0)
                h = tl.where(r != 0, 0.0, h)
                if STATE_ONLY:
                    seen_rst = tl.where(r != 0, 1, seen_rst)
                    spsum = tl.where(r != 0, 0.0, spsum)
            h = tl.exp2(sp[None, :] * A2) * h + (sp * xv)[None, :] * Bv
            if STATE_ONLY:
                spsum += sp
            else:
                yv = tl.sum(h * Cv, axis=0)
                if HAS_D:
                    yv += Dv * xv
                if HAS_Z:
                    zv = tl.load(z_p, mask=m, other=0.0).to(tl.float32)
                    yv = yv * zv * tl.sigmoid(zv)
                if DEFER:
                    Y = tl.where(rows[:, None] == i, yv[None, :], Y)
                else:
                    tl.store(y_p, yv.to(y_ptr.dtype.element_ty), mask=m)
                    y_p += sy_l
            x_p += sx_l
            dt_p += sdt_l
            z_p += sz_l
            bb_p += sb_l
            cc_p += sc_l
            r_p += sr_l
        if DEFER and not STATE_ONLY:
            tt = t0 + rows
            ptrs = y_ptr + b * sy_b + tt[:, None].to(tl.int64) * sy_l + d[None, :]
            tl.store(ptrs, Y.to(y_ptr.dtype.element_ty), mask=(tt < t_end)[:, None] & md[None, :])
        t0 += T
    if STORE_HT:  # the final state (of this chunk when STATE_ONLY: hT is then (B, nchunks, D, N))
        nck = tl.num_programs(2)
        for k in tl.static_range(N):
            tl.store(hT_ptr + (b * nck + pid_c) * D * N + d64 * N + k,
                     tl.sum(tl.where(nn == k, h, 0.0), axis=0), mask=md)
    if STATE_ONLY:  # decay exponent of the whole chunk, -1 where a reset cuts it off
        tl.store(sum_ptr + (b * tl.num_programs(2) + pid_c) * D + d,
                 tl.where(seen_rst != 0, -1.0, spsum), mask=md)


@triton.jit(do_not_specialize=["D", "NC"])
def _scan_carry_kernel(hloc_ptr, sum_ptr, a_ptr, h0_ptr, hT_ptr, D, NC,
                       N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, HAS_H0: tl.constexpr):
    # Carries the state across the length chunks of one row: h_in(c) = h; h = P_c h + hloc_c, with
    # P_c = exp2(A2 * sum of the chunk's dt) (0 after a reset in it). hloc (B, NC, D, N) holds each
    # chunk's final state from a zero start and is overwritten with the chunk's true initial state.
    # Same layout rule as the forward kernel: (NP, BD) tensors built from per-channel vectors.
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    d = pid_d * BD + tl.arange(0, BD)
    md = d < D
    d64 = d.to(tl.int64)
    nn = tl.arange(0, NP)[:, None] + tl.zeros((NP, BD), tl.int32)
    A2, h = _decay_and_state(a_ptr, h0_ptr + b * D * N, d64, md, nn, N, NP, BD, HAS_H0)
    c = 0
    while c < NC:
        base = hloc_ptr + (b * NC + c) * D * N + d64 * N
        s = tl.load(sum_ptr + (b * NC + c) * D + d, mask=md, other=0.0)
        decay = tl.where(s[None, :] < 0.0, 0.0, tl.exp2(A2 * tl.maximum(s, 0.0)[None, :]))
        hl = tl.zeros((NP, BD), tl.float32)
        for k in tl.static_range(N):
            hl = tl.where(nn == k, tl.load(base + k, mask=md, other=0.0)[None, :], hl)
            tl.store(base + k, tl.sum(tl.where(nn == k, h, 0.0), axis=0), mask=md)
        h = decay * h + hl
        c += 1
    for k in tl.static_range(N):
        tl.store(hT_ptr + b * D * N + d64 * N + k, tl.sum(tl.where(nn == k, h, 0.0), axis=0), mask=md)


def _np2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _check_last_stride(name: str, t: torch.Tensor) -> None:
    assert t.stride(-1) == 1, f"{name} must have a contiguous last dim (stride {t.stride()})"


def length_chunk(Bsz: int, L: int, D: int, block_d: int, min_chunk: int | None = None,
                 step: int = CHK) -> int:
    """The chunk length CL the forward splits the length into (L itself: one sequential pass): at
    least min_chunk (default FWD_MIN_CHUNK), a multiple of step (CHK where states are saved).

    Batch 1 gives only D / block_d programs (256 for the 7B): each walks the whole length and waits
    on its loads at every step (latency-bound, ~0.7 us per step). Splitting the length into chunks
    scanned in parallel from a zero state, then carrying the states across chunks and re-running
    each chunk from its true initial state, costs a second pass but multiplies the warps in flight
    by the number of chunks."""
    min_chunk = min_chunk or FWD_MIN_CHUNK
    nc = _chunks_allowed(Bsz, D, block_d)
    if nc < 2 or L < 2 * min_chunk:
        return L
    return max(min_chunk, triton.cdiv(triton.cdiv(L, nc), step) * step)


def _chunks_allowed(Bsz: int, D: int, block_d: int) -> int:
    """Length chunks a row may be cut into: FWD_CHUNK_PROGRAMS programs in all, at most
    FWD_MAX_CHUNKS a row (below 2: one pass)."""
    return min(FWD_MAX_CHUNKS, FWD_CHUNK_PROGRAMS // max(triton.cdiv(D, block_d) * Bsz, 1))


def infer_chunk(Bsz: int, L: int, D: int, block_d: int, step: int) -> int:
    """The chunk length of an inference forward (no saved states), a multiple of step (the
    unroll): L / FWD_INFER_CHUNKS within [FWD_MIN_CHUNK_INFER, FWD_MAX_CHUNK_INFER], and no more
    chunks than _chunks_allowed; L itself (one pass) for rows shorter than two FWD_MIN_CHUNK_INFER
    or batches whose channel blocks already fill the GPU."""
    nc = _chunks_allowed(Bsz, D, block_d)
    if nc < 2 or L < 2 * FWD_MIN_CHUNK_INFER:
        return L
    cl = min(max(triton.cdiv(L, FWD_INFER_CHUNKS), FWD_MIN_CHUNK_INFER), FWD_MAX_CHUNK_INFER)
    return triton.cdiv(max(cl, triton.cdiv(L, nc)), step) * step


def scan_fwd(x, dt, A, Bm, Cm, Dv=None, z=None, dt_bias=None, h0=None, reset=None,
             save_chk=False, block_d=None, unroll=None, num_warps=None, defer=None, chunk=None):
    """Launch the forward kernel(s). Shapes: x, dt, z (B, L, D) any row strides, last dim contiguous;
    Bm, Cm (B, L, N); A (D, N) fp32; Dv, dt_bias (D,); h0 (B, D, N) fp32; reset (B, L) bool.
    chunk: the length chunk (default length_chunk(); L or more: one sequential pass).
    Returns (y (B, L, D) in x's dtype, final state (B, D, N) fp32, saved states (B, nchk, D, N) or None).
    """
    Bsz, L, D = x.shape
    N = A.shape[1]
    for name, t in (("x", x), ("dt", dt), ("B", Bm), ("C", Cm)) + ((("z", z),) if z is not None else ()):
        _check_last_stride(name, t)
    A = A.contiguous()
    block_d = block_d or FWD_BLOCK_D
    CL = chunk or (length_chunk(Bsz, L, D, block_d) if save_chk
                   else infer_chunk(Bsz, L, D, block_d, unroll or FWD_UNROLL))
    if CL < L and save_chk:  # saved states sit at multiples of CHK: chunks must start on them
        CL = triton.cdiv(CL, CHK) * CHK
    CL = max(1, min(CL, L))
    unroll = unroll or (FWD_UNROLL_WIDE if save_chk or CL >= L else FWD_UNROLL)
    if save_chk:  # states are saved at chunk starts: CHK must be a multiple of the unroll
        unroll = math.gcd(unroll, CHK)
    NC = triton.cdiv(L, CL) if L else 1
    y = torch.empty(Bsz, L, D, dtype=x.dtype, device=x.device)
    hT = torch.empty(Bsz, D, N, dtype=torch.float32, device=x.device)
    nchk = triton.cdiv(L, CHK)
    chk = (torch.empty(Bsz, nchk, D, N, dtype=torch.float32, device=x.device) if save_chk else hT)
    if h0 is not None:
        h0 = h0.contiguous()
    rst = reset.contiguous().view(torch.uint8) if reset is not None else None
    zz = z if z is not None else x
    NP = _np2(N)
    common = dict(N=N, NP=NP, BD=block_d, T=unroll, CHKS=CHK, HAS_Z=z is not None, HAS_D=Dv is not None,
                  HAS_DTB=dt_bias is not None, HAS_RST=rst is not None, BC_WORDS=bc_words(Bm, Cm),
                  DEFER=FWD_DEFER if defer is None else defer, num_warps=num_warps or FWD_WARPS,
                  **LAUNCH_OPTIONS)
    strides = (x.stride(0), x.stride(1), dt.stride(0), dt.stride(1), zz.stride(0), zz.stride(1),
               Bm.stride(0), Bm.stride(1), Cm.stride(0), Cm.stride(1), y.stride(0), y.stride(1),
               rst.stride(0) if rst is not None else 0, rst.stride(1) if rst is not None else 0)
    ins = (x, dt, zz, Bm, Cm, A, Dv if Dv is not None else A, dt_bias if dt_bias is not None else A)
    rr = rst if rst is not None else x
    if NC == 1:
        _scan_fwd_kernel[(triton.cdiv(D, block_d), Bsz, 1)](
            *ins, h0 if h0 is not None else hT, rr, y, hT, chk, hT,
            L, D, max(L, 1), D * N, 0, *strides,
            HAS_H0=h0 is not None, SAVE_CHK=save_chk, STATE_ONLY=False, STORE_HT=True, **common)
        return y, hT, (chk if save_chk else None)
    grid = (triton.cdiv(D, block_d), Bsz, NC)
    # 1) each chunk from a zero state: its final state and its total decay exponent
    hloc = torch.empty(Bsz, NC, D, N, dtype=torch.float32, device=x.device)
    dsum = torch.empty(Bsz, NC, D, dtype=torch.float32, device=x.device)
    _scan_fwd_kernel[grid](
        *ins, hT, rr, y, hloc, chk, dsum, L, D, CL, 0, 0, *strides,
        HAS_H0=False, SAVE_CHK=False, STATE_ONLY=True, STORE_HT=True, **common)
    # 2) carry the states across chunks (hloc becomes each chunk's initial state; hT the final one)
    _scan_carry_kernel[(triton.cdiv(D, CARRY_BLOCK_D), Bsz)](
        hloc, dsum, A, h0 if h0 is not None else hT, hT, D, NC,
        N=N, NP=NP, BD=CARRY_BLOCK_D, HAS_H0=h0 is not None, num_warps=1, **LAUNCH_OPTIONS)
    # 3) every chunk again from its initial state: the outputs (and the saved states)
    _scan_fwd_kernel[grid](
        *ins, hloc, rr, y, hT, chk, dsum, L, D, CL, NC * D * N, D * N, *strides,
        HAS_H0=True, SAVE_CHK=save_chk, STATE_ONLY=False, STORE_HT=False, **common)
    return y, hT, (chk if save_chk else None)


class SelectiveScanFn(torch.autograd.Function):
    """Autograd wrapper: forward saves the state every CHK steps, backward recomputes from them."""

    @staticmethod
    def forward(ctx, x, dt, A, Bm, Cm, Dv, z, dt_bias, h0, reset):
        y, hT, chk = scan_fwd(x, dt, A, Bm, Cm, Dv, z, dt_bias, h0, reset, save_chk=True)
        ctx.save_for_backward(x, dt, A, Bm, Cm, Dv, z, dt_bias, reset, chk)
        ctx.chk_every = CHK  # the interval chk was saved at (tests change CHK)
        ctx.set_materialize_grads(False)  # an unused final state (training) gives dhT None, not zeros
        ctx.has_h0 = h0 is not None
        ctx.h0_dtype = h0.dtype if h0 is not None else None
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        x, dt, A, Bm, Cm, Dv, z, dt_bias, reset, chk = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        dx, ddt, dA, dB, dC, dD, dz, ddtb, dh0 = scan_bwd(x, dt, A, Bm, Cm, Dv, z, dt_bias, reset,
                                                          chk, dy, dhT, ctx.chk_every)
        cast = lambda g, ref: None if g is None or ref is None else g.to(ref.dtype)
        return (dx, ddt, cast(dA, A), cast(dB, Bm), cast(dC, Cm), cast(dD, Dv), dz,
                cast(ddtb, dt_bias), dh0.to(ctx.h0_dtype) if ctx.has_h0 else None, None)
