"""Batch-1 decode GEMV kernels: y (N,) = W (N, K) @ x (K,), W dense or quantized, with fusions.

Legend: N output rows, K input width (H for in_proj/lm_head, D for out_proj/x_proj), Kp padded K
(int4), G int4 group size, D inner width, CK conv taps, S split-K slices.

One kernel family (``_gemv_kernel``) streams the weight once with fp32 accumulation. Weight formats:
dense fp32/bf16/fp16, int8 per-row scale, int4 group-wise with zero points (quant/formats.py layout;
the int4 group scale is applied after each per-group dot product, as triton_qmm does). Two optional
fusions (constexpr flags) save whole launches in the decode step:

- PROLOGUE add+RMSNorm: the input is u = rmsnorm(h + res) * w_norm, rounded exactly where
  triton_decode.rms_rows rounds (round_in on the sum, round_y on the normed value, the product in
  u's dtype). Every program first sums the squares over the whole row (pass 1) and then rebuilds
  u block by block in the GEMV loop (pass 2), reading h/res/w_norm from L2. Program (0, 0) writes
  h + res (fp32) to h_out, which must be a different buffer from h (the other programs still read
  h): the decode step ping-pongs two fp32 residual buffers across layers.
- EPILOGUE conv step: rows n < D are in_proj's x half; their GEMV value (rounded to y's dtype, as
  the unfused path stores it) goes through the causal-conv single-token update (state shift,
  taps, bias, SiLU), writing xc (D,) and the conv state (CK-1, D) in place. All rows are stored to
  y (so z = y[D:]). Each channel belongs to one program, so the in-place state update is safe.
- CIN conv-step input (x_proj in the "triton_gemv_cx" decode mode): the input at k is the conv
  step's output xc[k] = silu(w[k, CK-1] x[k] + sum_j w[k, j] state[j, k] + bias[k]) rounded to x's
  dtype, x being in_proj's x half (D = K): the conv_step kernel's math, recomputed by every program
  for its K slice (~9 small loads per input element, from L2: wide row blocks amortise them). The
  conv state is only read (other programs read it concurrently); the fused SSM step then recomputes
  xc for its own channels with the same jit helper (bit-identical) and shifts the state.

Split-K (S > 1, for narrow outputs such as x_proj's 288 rows): each program writes an fp32 partial
(S, N); then either the last program of each row block to arrive (an atomic ticket per block, reset
to zero by that program so CUDA-graph replays start clean) sums the S partials in order and runs
the epilogue ("last": one launch), or a second small kernel does ("kernel": two launches). Both are
deterministic.

Quantized weights are read as int32 words (4 int8 / 8 int4 codes) and decoded without int->float
conversions (I2F is quarter rate on Hopper and bound the int kernels): each code is masked in place
and OR-ed into the exponent of 2^23 (one LOP3), read as fp32 and offset by one FADD (``_magic``);
x at the matching strided k is pre-scaled by the code's power-of-two position.

GemvConfig.xsplit (XSPLIT) reads the quantized tile's input once: k = k0 + 8 * word + (0..7) (int4;
4 for int8) as one contiguous block (vector loads, and the PRO/CIN math once per element), and
split by code position with tl.reshape + tl.split (no arithmetic). The split runs on the block
broadcast to the weight tile's shape, which makes Triton place the one layout change (through
shared memory) on the loaded block instead of on every split piece; int4 loads the words as a flat
(BN, words) tile (lanes along K: fewer lanes hold the same x), splits its zero-point offsets the
same way (one layout change, not four), and fuses each code's mask and 2^23 OR into one LOP3 by
taking 0x4B000000 from a kernel argument. The products and their order are the strided path's:
the results are bit-identical. Offline sm_90 SASS per inner iteration (benchmarks-style compile,
4 warps): int4 g128 bn16 bk1024 1008 -> 617 instructions, int8 bn16 bk512 367 -> 304.

Row offsets into the weight are 64-bit (lm_head int4: 65024 x 2048 bytes; fp32 65024 x 4096 > 2^31).

A program whose K slice is one block (split-K x_proj) loads its weight tile before the PDL wait
(_first_tile). int4 tiles with GemvConfig.i4x2 run the packed-bf16 kernel of triton_gemv_i4.py
instead (plain GEMV or conv epilogue; fused_gemv dispatches).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from falcon_mamba.ops import pdl
from falcon_mamba.ops.pdl import dep_sync
from falcon_mamba.ops.triton_decode import _ROUND, _conv_in, _conv_window, _round
from falcon_mamba.ops.triton_decode import _ld as _vload  # a masked-or-not vector load
from falcon_mamba.ops.triton_helpers import LAUNCH_OPTIONS, mask_and


@triton.jit
def _wload(ptrs, mn, mk, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    # A weight tile; mn (rows) and mk (columns) come shaped to broadcast against ptrs. Masks only
    # where the shape needs them (unmasked loads vectorise best).
    if EVEN_N and EVEN_K:
        return tl.load(ptrs)
    elif EVEN_K:
        return tl.load(ptrs, mask=mn, other=0)
    elif EVEN_N:
        return tl.load(ptrs, mask=mk, other=0)
    else:
        return tl.load(ptrs, mask=mn & mk, other=0)


@triton.jit
def _magic(bits_i32, off):
    # float(v) - off for the integer v held in the low 23 bits (v | 2^23's exponent, read as fp32, is
    # 2^23 + v exactly): an integer OR and one FADD, instead of an int->float conversion (I2F runs
    # at a quarter of the FADD rate on Hopper). With the mask an immediate too, ptxas emits the AND
    # and the OR as two LOP3 (see _magic_r).
    return (bits_i32 | 0x4B000000).to(tl.float32, bitcast=True) - off


@triton.jit
def _magic_r(bits_i32, magic, off):
    # _magic with 2^23's bits from a register (the kernel argument magic = 0x4B000000): with both the
    # mask and the exponent as immediates ptxas emits an AND and an OR (two LOP3); with one of them in
    # a register it fuses (bits & mask) | magic into one LOP3. Same bits out.
    return (bits_i32 | magic).to(tl.float32, bitcast=True) - off


@triton.jit
def _input(x_ptr, res_ptr, wn_ptr, k, mk, rstd, cst_ptr, cw_ptr, cb_ptr, s_ck, s_cw, MASKED: tl.constexpr,
           PRO: tl.constexpr, HAS_RES: tl.constexpr, ROUND_IN: tl.constexpr, ROUND_Y: tl.constexpr,
           ROUND_U: tl.constexpr, CIN: tl.constexpr, CK: tl.constexpr, HAS_CB: tl.constexpr):
    # The GEMV input at indices k (fp32): x itself, the normed residual sum (PRO), or the conv step's
    # output xc computed from x = in_proj's x half and the conv state, read only (CIN; ROUND_U: xc's
    # dtype, x's).
    if CIN:
        v = _conv_in(x_ptr, cst_ptr, cw_ptr, cb_ptr, k, mk, s_ck, s_cw, CK, HAS_CB, MASKED, False, ROUND_U)
    else:
        v = _vload(x_ptr + k, mk, MASKED).to(tl.float32)
    if PRO:
        if HAS_RES:
            v += _vload(res_ptr + k, mk, MASKED).to(tl.float32)
        v = _round(_round(v, ROUND_IN) * rstd, ROUND_Y)
        v = _round(v * _vload(wn_ptr + k, mk, MASKED).to(tl.float32), ROUND_U)
    return v


@triton.jit
def _split4(v):
    # (..., 2, 2) -> the 4 slices v[..., j // 2, j % 2] for j = 0..3, by layout only (no arithmetic)
    c0, c1 = tl.split(v)
    x0, x2 = tl.split(c0)
    x1, x3 = tl.split(c1)
    return x0, x1, x2, x3


@triton.jit
def _split8(v):
    # (..., 2, 2, 2) -> the 8 slices v[..., j // 4, j // 2 % 2, j % 2] for j = 0..7 (no arithmetic)
    c0, c1 = tl.split(v)
    x0, x2, x4, x6 = _split4(c0)
    x1, x3, x5, x7 = _split4(c1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _finish(acc, n, mn, y_ptr, cst_ptr, cw_ptr, cb_ptr, xc_ptr, D, s_ck, s_cw,
            ROUND_OUT: tl.constexpr, CONV: tl.constexpr, CK: tl.constexpr, HAS_CB: tl.constexpr):
    # Store y (rounded to the model dtype even when y is fp32), then the conv step on rows < D.
    yv = _round(acc, ROUND_OUT)
    tl.store(y_ptr + n, yv.to(y_ptr.dtype.element_ty), mask=mn)
    if CONV:
        # the conv reads x as the layer-by-layer path stores it: rounded to y's dtype
        yv = yv.to(y_ptr.dtype.element_ty).to(tl.float32)
        mx = mn & (n < D)
        c = _conv_window(yv, cst_ptr, cw_ptr, n, mx, s_ck, s_cw, CK, True, True)
        if HAS_CB:
            c += tl.load(cb_ptr + n, mask=mx, other=0.0).to(tl.float32)
        c = c * tl.sigmoid(c)
        tl.store(xc_ptr + n, c.to(xc_ptr.dtype.element_ty), mask=mx)


@triton.jit
def _first_tile(w_ptr, row, mn, k_start, K: tl.constexpr, KL: tl.constexpr, FMT: tl.constexpr,
                WORDS: tl.constexpr, XSPLIT: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    # The weight tile of block k_start exactly as _gemv_kernel's loop loads it (raw, before any
    # decoding), for programs whose slice is one block (PRE): loaded before the PDL wait.
    if FMT == 4:
        GW: tl.constexpr = BK if BK < GROUP else GROUP
        NG: tl.constexpr = BK // GW
        WPG: tl.constexpr = GW // 8
        if XSPLIT:
            wf = k_start // 8 + tl.arange(0, NG * WPG)
            wd = _wload(w_ptr + row[:, None] + wf[None, :], mn[:, None], (wf < KL // 8)[None, :], EVEN_N,
                        EVEN_K)
            wd = tl.reshape(wd, (BN, NG, WPG))
        else:
            wi = k_start // 8 + tl.arange(0, NG)[:, None] * WPG + tl.arange(0, WPG)[None, :]
            wd = _wload(w_ptr + row[:, None, None] + wi[None, :, :], mn[:, None, None],
                        (wi < KL // 8)[None, :, :], EVEN_N, EVEN_K)
    elif FMT == 8 and WORDS:
        wi = k_start // 4 + tl.arange(0, BK // 4)
        wd = _wload(w_ptr + row[:, None] + wi[None, :], mn[:, None], (wi < KL // 4)[None, :], EVEN_N, EVEN_K)
    else:
        k = k_start + tl.arange(0, BK)
        wd = _wload(w_ptr + row[:, None] + k[None, :], mn[:, None], (k < K)[None, :], EVEN_N, EVEN_K)
    return wd


@triton.jit
def _gemv_kernel(
    x_ptr, res_ptr, wn_ptr, hout_ptr, eps,
    w_ptr, s_ptr, z_ptr, s_wn, s_sn,
    y_ptr, part_ptr, cnt_ptr,
    cst_ptr, cw_ptr, cb_ptr, xc_ptr, D, s_ck, s_cw,
    rs_ptr, hin_ptr, hnx_ptr, nsq_ptr, neps,
    N, K: tl.constexpr, KL: tl.constexpr, K_PER_SPLIT: tl.constexpr,
    FMT: tl.constexpr, WORDS: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, MASK_X: tl.constexpr,
    PRO: tl.constexpr, HAS_RES: tl.constexpr, WRITE_H: tl.constexpr, NORM_BK: tl.constexpr,
    ROUND_IN: tl.constexpr, ROUND_Y: tl.constexpr, ROUND_U: tl.constexpr,
    CONV: tl.constexpr, CK: tl.constexpr, HAS_CB: tl.constexpr, CIN: tl.constexpr,
    SPLIT: tl.constexpr, LAST: tl.constexpr, ROUND_OUT: tl.constexpr, PDL: tl.constexpr,
    XSPLIT: tl.constexpr = False, magic=0x4B000000, RSTD_IN: tl.constexpr = False, NEPI: tl.constexpr = False,
    NGRID: tl.constexpr = 1,
):
    # FMT 0 dense, 8 int8, 4 int4. KL: the K extent of the weight loop (Kp for int4, else K). The
    # widths are constexpr: one compile per projection shape, loops with known trip counts.
    # WORDS: w_ptr is the quantized weight viewed as int32 words (s_wn in words); always for int4,
    # for int8 when K is a multiple of 4 (else bytes, tiny test models only).
    # PRE: a program's K slice is one block (split-K GEMVs such as x_proj): its weight tile is loaded
    # before the PDL wait, so a program launched while the previous kernel runs holds it by then.
    PRE: tl.constexpr = K_PER_SPLIT == BK
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n = pid_n * BN + tl.arange(0, BN)
    mn = n < N
    row = n.to(tl.int64) * s_wn
    k_start = pid_s * K_PER_SPLIT
    if PRE:
        w_pre = _first_tile(w_ptr, row, mn, k_start, K, KL, FMT, WORDS, XSPLIT, GROUP, BN, BK, EVEN_N, EVEN_K)
    dep_sync(PDL)
    rstd = 1.0
    if PRO and RSTD_IN:  # 1/rms left by the previous out_proj's norm epilogue (NEPI): no pass 1
        rstd = tl.load(rs_ptr)
    elif PRO:  # pass 1: the full row's sum of squares (every program needs it)
        ssq = tl.zeros((NORM_BK,), tl.float32)
        first = (pid_n == 0) & (pid_s == 0)
        for k0 in range(0, K, NORM_BK):
            k = k0 + tl.arange(0, NORM_BK)
            mk = k < K
            v = tl.load(x_ptr + k, mask=mk, other=0.0).to(tl.float32)
            if HAS_RES:
                v += tl.load(res_ptr + k, mask=mk, other=0.0).to(tl.float32)
            if WRITE_H:
                tl.store(hout_ptr + k, v, mask=mask_and(mk, first))
            v = _round(v, ROUND_IN)
            ssq += v * v
        rstd = tl.rsqrt(tl.sum(ssq, axis=0) / K + eps)
    if FMT == 4:
        # Words of 8 nibbles: nibble j of word i is k = 8i + j. The tile is (BN, NG, WPG) words: NG
        # groups of WPG words, so each group's scale and zero point broadcast over its own words.
        GW: tl.constexpr = BK if BK < GROUP else GROUP  # K elements per scale within one block
        NG: tl.constexpr = BK // GW
        WPG: tl.constexpr = GW // 8
        gi = tl.arange(0, NG)[:, None] * WPG + tl.arange(0, WPG)[None, :]  # (NG, WPG) word in tile
        acc3 = tl.zeros((BN, NG, WPG), tl.float32)
        for kk in range(0, K_PER_SPLIT, BK):
            k0 = k_start + kk
            wi = k0 // 8 + gi
            if PRE:
                wd = w_pre
            elif XSPLIT:  # a flat (BN, NG * WPG) load: lanes along K, so fewer lanes share one x
                wf = k0 // 8 + tl.arange(0, NG * WPG)
                wd = _wload(w_ptr + row[:, None] + wf[None, :], mn[:, None], (wf < KL // 8)[None, :], EVEN_N,
                            EVEN_K)
                wd = tl.reshape(wd, (BN, NG, WPG))
            else:
                wd = _wload(w_ptr + row[:, None, None] + wi[None, :, :], mn[:, None, None],
                            (wi < KL // 8)[None, :, :], EVEN_N, EVEN_K)
            wd_hi = wd >> 16  # nibbles 4..7 moved to bits 0..15
            g = k0 // GROUP + tl.arange(0, NG)
            sg = n.to(tl.int64)[:, None] * s_sn + g[None, :]
            mg = mn[:, None] & (g < KL // GROUP)[None, :]
            sc = tl.load(s_ptr + sg, mask=mg, other=0.0).to(tl.float32)
            zp = tl.load(z_ptr + sg, mask=mg, other=0).to(tl.float32)
            dw = tl.zeros((BN, NG, WPG), tl.float32)
            if XSPLIT:  # the tile's input once, contiguous (vector loads), then split by position
                k3 = k0 + 8 * gi[:, :, None] + tl.arange(0, 8)[None, None, :]  # (NG, WPG, 8)
                x3 = _input(x_ptr, res_ptr, wn_ptr, k3, k3 < K, rstd, cst_ptr, cw_ptr, cb_ptr, s_ck, s_cw,
                            MASK_X, PRO, HAS_RES, ROUND_IN, ROUND_Y, ROUND_U, CIN, CK, HAS_CB)
                # x at position j times 16^-(j%4) (below), here as one multiply by exact powers of two
                # (127 - 4(j%4) in the exponent): every position shares one layout path into the split
                jp = tl.arange(0, 8) % 4
                x3 = x3 * (0x3F800000 - (jp << 25)).to(tl.float32, bitcast=True)[None, None, :]
                xs = _split8(tl.reshape(tl.broadcast_to(x3[None, :, :, :], (BN, NG, WPG, 8)),
                                        (BN, NG, WPG, 2, 2, 2)))
                # the zero point at each nibble position's scale, 2^23 + zp * 16^m (m = 0..3), built
                # per (row, group) and split like x: one layout change instead of one per m
                o4 = tl.join(tl.join(8388608.0 + zp, 8388608.0 + zp * 256.0),
                             tl.join(8388608.0 + zp * 16.0, 8388608.0 + zp * 4096.0))  # [.., m // 2, m % 2]
                os = _split4(tl.broadcast_to(o4[:, :, None, :, :], (BN, NG, WPG, 2, 2)))
            for j in tl.static_range(8):
                # Nibble j is decoded in place (bits 4(j%4).., no shift): the magic float is then
                # 2^23 + code * 16^(j%4) (< 2^24, exact), so the zero point is scaled alike and x by
                # 16^-(j%4) (a power of two: the products are the unscaled ones, exactly).
                SH = 4 * (j % 4)
                src = wd if j < 4 else wd_hi
                if XSPLIT:
                    dw += _magic_r(src & (0xF << SH), magic, os[j % 4]) * xs[j]  # x pre-scaled
                else:
                    off = 8388608.0 + zp * (1 << SH)  # (BN, NG)
                    kj = k0 + 8 * gi + j
                    xj = _input(x_ptr, res_ptr, wn_ptr, kj, kj < K, rstd, cst_ptr, cw_ptr, cb_ptr, s_ck, s_cw,
                                MASK_X, PRO, HAS_RES, ROUND_IN, ROUND_Y, ROUND_U, CIN, CK, HAS_CB)
                    if SH > 0:
                        xj = xj * (1.0 / (1 << SH))
                    dw += _magic(src & (0xF << SH), off[:, :, None]) * xj[None, :, :]
            acc3 += sc[:, :, None] * dw  # a group's scale after its dot product, as triton_qmm
        acc = tl.sum(tl.sum(acc3, axis=2), axis=1)
    elif FMT == 8 and WORDS:
        # Words of 4 int8 codes: byte j of word i is k = 4i + j. XOR 0x80 per byte makes the codes
        # unsigned (c + 128); bytes 0-1 (and 2-3 after one shift) decode in place like the int4 nibbles.
        BW: tl.constexpr = BK // 4
        acc2 = tl.zeros((BN, BW), tl.float32)
        for kk in range(0, K_PER_SPLIT, BK):
            k0 = k_start + kk
            wi = k0 // 4 + tl.arange(0, BW)
            if PRE:
                wd = w_pre ^ -0x7F7F7F80  # 0x80808080 as an int32
            else:
                wd = _wload(w_ptr + row[:, None] + wi[None, :], mn[:, None], (wi < KL // 4)[None, :], EVEN_N,
                            EVEN_K) ^ -0x7F7F7F80
            wd_hi = wd >> 16
            if XSPLIT:  # as int4: the input once (BW, 4), contiguous, then split by byte position
                k2 = 4 * wi[:, None] + tl.arange(0, 4)[None, :]
                x2 = _input(x_ptr, res_ptr, wn_ptr, k2, k2 < K, rstd, cst_ptr, cw_ptr, cb_ptr, s_ck, s_cw,
                            MASK_X, PRO, HAS_RES, ROUND_IN, ROUND_Y, ROUND_U, CIN, CK, HAS_CB)
                jp = tl.arange(0, 4) % 2  # x times 256^-(j%2), as int4 does
                x2 = x2 * (0x3F800000 - (jp << 26)).to(tl.float32, bitcast=True)[None, :]
                xs = _split4(tl.reshape(tl.broadcast_to(x2[None, :, :], (BN, BW, 4)), (BN, BW, 2, 2)))
            for j in tl.static_range(4):
                SH = 8 * (j % 2)
                src = wd if j < 2 else wd_hi
                if XSPLIT:
                    acc2 += _magic_r(src & (0xFF << SH), magic, 8388608.0 + 128.0 * (1 << SH)) * xs[j]
                else:
                    kj = 4 * wi + j
                    xj = _input(x_ptr, res_ptr, wn_ptr, kj, kj < K, rstd, cst_ptr, cw_ptr, cb_ptr, s_ck, s_cw,
                                MASK_X, PRO, HAS_RES, ROUND_IN, ROUND_Y, ROUND_U, CIN, CK, HAS_CB)
                    if SH > 0:
                        xj = xj * (1.0 / (1 << SH))
                    acc2 += _magic(src & (0xFF << SH), 8388608.0 + 128.0 * (1 << SH)) * xj[None, :]
        acc = tl.sum(acc2, axis=1) * tl.load(s_ptr + n, mask=mn, other=0.0).to(tl.float32)
    else:
        acc2 = tl.zeros((BN, BK), tl.float32)
        for kk in range(0, K_PER_SPLIT, BK):
            k = k_start + kk + tl.arange(0, BK)
            mk = k < K
            xv = _input(x_ptr, res_ptr, wn_ptr, k, mk, rstd, cst_ptr, cw_ptr, cb_ptr, s_ck, s_cw, MASK_X,
                        PRO, HAS_RES, ROUND_IN, ROUND_Y, ROUND_U, CIN, CK, HAS_CB)
            if PRE:
                w = w_pre
            else:
                w = _wload(w_ptr + row[:, None] + k[None, :], mn[:, None], mk[None, :], EVEN_N, EVEN_K)
            if FMT == 8:  # int8 bytes (K not a multiple of 4): c + 2^23 + 128 is the magic float
                acc2 += ((w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0) * xv[None, :]
            else:
                acc2 += w.to(tl.float32) * xv[None, :]
        acc = tl.sum(acc2, axis=1)
        if FMT == 8:
            acc = acc * tl.load(s_ptr + n, mask=mn, other=0.0).to(tl.float32)
    if SPLIT == 1:
        _finish(acc, n, mn, y_ptr, cst_ptr, cw_ptr, cb_ptr, xc_ptr, D, s_ck, s_cw, ROUND_OUT, CONV, CK,
                HAS_CB)
        if NEPI:
            _norm_epilogue(acc, n, mn, pid_n, NGRID, y_ptr, hin_ptr, hnx_ptr, nsq_ptr, cnt_ptr,
                           rs_ptr, neps, N, ROUND_OUT, ROUND_IN, NORM_BK)
    else:
        tl.store(part_ptr + pid_s * N + n, acc, mask=mn)
        if LAST:
            tl.debug_barrier()  # every thread's partial is stored before the ticket is taken
            ticket = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if ticket == SPLIT - 1:
                tot = tl.zeros((BN,), tl.float32)
                for s in tl.static_range(SPLIT):  # in split order: deterministic
                    tot += tl.load(part_ptr + s * N + n, mask=mn, other=0.0, cache_modifier=".cg")
                _finish(tot, n, mn, y_ptr, cst_ptr, cw_ptr, cb_ptr, xc_ptr, D, s_ck, s_cw, ROUND_OUT,
                        CONV, CK, HAS_CB)
                tl.atomic_xchg(cnt_ptr + pid_n, 0)  # ready for the next launch (graph replays)


@triton.jit
def _norm_epilogue(acc, n, mn, pid, NGRID: tl.constexpr, y_ptr, hin_ptr, hnx_ptr, nsq_ptr, cnt_ptr, rs_ptr,
                   eps, N,
                   ROUND_OUT: tl.constexpr, ROUND_IN: tl.constexpr, RB: tl.constexpr):
    # The next RMSNorm's statistics, in out_proj's epilogue (NEPI): h' = h + y (y as stored) for this
    # program's rows -> hnx (fp32, not hin's memory: every row is held by several threads); the sum of
    # squares of round_in(h') over the rows -> nsq[pid]; the last program to arrive (atomic ticket,
    # reset for graph replays) sums the partials in program order (deterministic) and stores
    # 1/rms = rsqrt(mean + eps) for the next GEMV's prologue (RSTD_IN).
    yv = _round(acc, ROUND_OUT).to(y_ptr.dtype.element_ty).to(tl.float32)
    hv = tl.load(hin_ptr + n, mask=mn, other=0.0) + yv
    tl.store(hnx_ptr + n, hv, mask=mn)
    r = _round(hv, ROUND_IN)
    tl.store(nsq_ptr + pid, tl.sum(tl.where(mn, r * r, 0.0), axis=0))
    tl.debug_barrier()  # every thread's stores are issued before the ticket is taken
    ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == NGRID - 1:
        tot = tl.zeros((RB,), tl.float32)
        for g0 in range(0, NGRID, RB):
            g = g0 + tl.arange(0, RB)
            tot += tl.load(nsq_ptr + g, mask=g < NGRID, other=0.0, cache_modifier=".cg")
        tl.store(rs_ptr, tl.rsqrt(tl.sum(tot, axis=0) / N + eps))
        tl.atomic_xchg(cnt_ptr, 0)


@triton.jit
def _reduce_kernel(part_ptr, N, y_ptr, cst_ptr, cw_ptr, cb_ptr, xc_ptr, D, s_ck, s_cw,
                   SPLIT: tl.constexpr, BLOCK: tl.constexpr, ROUND_OUT: tl.constexpr, CONV: tl.constexpr,
                   CK: tl.constexpr, HAS_CB: tl.constexpr, PDL: tl.constexpr):
    dep_sync(PDL)
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mn = n < N
    tot = tl.zeros((BLOCK,), tl.float32)
    for s in tl.static_range(SPLIT):
        tot += tl.load(part_ptr + s * N + n, mask=mn, other=0.0)
    _finish(tot, n, mn, y_ptr, cst_ptr, cw_ptr, cb_ptr, xc_ptr, D, s_ck, s_cw, ROUND_OUT, CONV, CK, HAS_CB)


# ---- weights and configs -----------------------------------------------------------------------

@dataclass(frozen=True)
class GemvWeight:
    """A projection's weight as the kernel reads it. bits 0: dense ``w`` (N, K); 8: int8 ``w`` (N, K)
    + fp32 ``scales`` (N,); 4: packed ``w`` (N, Kp/2) uint8 + ``scales``/``zeros`` (N, Kp/G)."""

    w: torch.Tensor
    bits: int = 0
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    group: int = 0
    K: int = 0  # in_features (the unpadded width)

    @property
    def N(self) -> int:
        return self.w.shape[0]

    @property
    def fmt(self) -> str:
        return {0: "dense", 8: "int8", 4: f"int4g{self.group}"}[self.bits]

    @classmethod
    def dense(cls, w_NK: torch.Tensor) -> GemvWeight:
        assert w_NK.stride(1) == 1
        return cls(w=w_NK, K=w_NK.shape[1])

    @classmethod
    def from_module(cls, mod) -> GemvWeight | None:
        """A bias-free nn.Linear or QuantLinear (bias outside its forward is fine: dt_proj), else None."""
        from falcon_mamba.quant.qlinear import QuantLinear

        if isinstance(mod, QuantLinear):
            if mod.bias is not None and mod.bias_in_forward:
                return None
            return cls(w=mod.qweight, bits=mod.bits, scales=mod.scales, zeros=mod.zeros,
                       group=mod.group_size or 0, K=mod.in_features)
        if (isinstance(mod, torch.nn.Linear) and mod.bias is None
                and mod.weight.dtype in (torch.float32, torch.bfloat16, torch.float16)
                and mod.weight.stride(1) == 1):
            return cls.dense(mod.weight)
        return None


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters. bn rows x bk columns per tile; split: K slices (1 = none); reduce: how the
    split partials are summed ("last" program of a row block, or a separate "kernel");
    norm_bk: block of the prologue's sum-of-squares pass; xsplit (int4, int8 words): read the tile's
    input once as a contiguous block and split it by code position, instead of one strided gather
    per position (dense weights ignore it); i4x2 (int4, plain GEMV): the packed-bf16 kernel of
    triton_gemv_i4.py with this many words chained per accumulator (1, 2 or 4; 0 = off); pre (that
    kernel): its first weight block loaded before the PDL wait (False: after it)."""

    bn: int = 8
    bk: int = 512
    warps: int = 4
    stages: int = 4
    split: int = 1
    reduce: str = "last"
    norm_bk: int = 1024
    xsplit: bool = False
    i4x2: int = 0
    pre: bool = True


# (format, N, K, prologue) -> config: the fastest of benchmarks/sweep_decode.py on the H100
# (CUDA-graph timing, weights from HBM; benchmarks/results/h100-sweep-decode-*.json); other shapes
# get default_config's heuristic. The prologue (add+RMSNorm) changes the best tile: every program
# re-reads the input row, so wide row blocks win there. The int tiles read their input contiguously
# (xsplit) wherever both were timed it won or tied; the fused-prologue int tiles take it untimed (the
# same kernel path, bit-identical results, tested at 7B shapes on the H100).
_T = lambda bn, bk, warps=4, stages=4, split=1, xs=False: GemvConfig(  # noqa: E731
    bn=bn, bk=bk, warps=warps, stages=stages, split=split, xsplit=xs)
TUNED: dict[tuple[str, int, int, bool], GemvConfig] = {
    # bf16 (dense): in_proj 45.0 us = 2.98 TB/s, fused 52.6; out_proj 24.4; x_proj 5.4; lm_head 174
    ("dense", 16384, 4096, False): _T(4, 1024),
    ("dense", 16384, 4096, True): _T(64, 128, 8, 3),
    ("dense", 4096, 8192, False): _T(2, 1024),
    ("dense", 288, 8192, False): _T(2, 1024, split=2),
    ("dense", 65024, 4096, False): _T(4, 1024),
    ("dense", 65024, 4096, True): _T(4, 1024),
    # int8: in_proj 25.3 us (xsplit; strided input 25.8), fused 32.0; out_proj 14.4 (xsplit; 15.7);
    # x_proj 5.4; lm_head 94.6 (sweeps of commits 5237907 and 11409a1)
    ("int8", 16384, 4096, False): _T(16, 512, xs=True),
    ("int8", 16384, 4096, True): _T(16, 512, xs=True),
    ("int8", 4096, 8192, False): _T(4, 2048, xs=True),
    ("int8", 288, 8192, False): _T(8, 1024, split=8),
    ("int8", 65024, 4096, False): _T(16, 512, xs=True),
    ("int8", 65024, 4096, True): _T(16, 512, xs=True),  # 95.0 us (strided input 95.7)
    # int4 group 128: plain in_proj, out_proj and lm_head by the packed-bf16 kernel (triton_gemv_i4.py;
    # sweep of commit 4ace7e3, reading x's pair layout as the decode step gives it): in_proj 14.4 us
    # (fp32 kernel 20.9), out_proj 8.7 (12.3), lm_head 48.8 (67.1); the prologue tiles (fused mode)
    # and x_proj stay on the fp32 kernel: fused in_proj 38.7, x_proj 5.1, lm_head with norm_f 89.7.
    # out_proj and lm_head load their first block after the PDL wait (pre=False): ~0.2 us less per
    # layer / ~4 us per token in the graphed step (early loads compete with the previous kernel's;
    # results/archive/dev-runs/h100-sweep-xproj-94ceb06.json, -e5d3771.json)
    ("int4g128", 16384, 4096, False): GemvConfig(bn=8, bk=1024, i4x2=4),
    ("int4g128", 16384, 4096, True): _T(16, 1024, xs=True),
    ("int4g128", 4096, 8192, False): GemvConfig(bn=4, bk=2048, i4x2=4, pre=False),
    ("int4g128", 288, 8192, False): _T(16, 1024, split=8, xs=True),  # 5.1 us (5.8)
    ("int4g128", 65024, 4096, False): GemvConfig(bn=8, bk=1024, i4x2=4, pre=False),
    ("int4g128", 65024, 4096, True): _T(16, 1024, xs=True),  # 89.7 us (strided input 128.3)
}
NUM_SMS_FALLBACK = 132  # interpreter runs: any value works


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return NUM_SMS_FALLBACK
    return torch.cuda.get_device_properties(device).multi_processor_count


# (format, N, K) -> config of the conv-step-input (CIN) GEMV (x_proj of the triton_cx and chain
# modes), from the sweep of commit 11409a1: bf16 6.4 us, int8 6.1, int4 g128 7.7.
TUNED_CONV_IN: dict[tuple[str, int, int], GemvConfig] = {
    ("dense", 288, 8192): _T(16, 512, 8, 3, split=16),
    ("int8", 288, 8192): _T(16, 512, split=16, xs=True),
    ("int4g128", 288, 8192): _T(16, 1024, split=8, xs=True),
}
CONV_IN_MIN_BN = 16  # every program recomputes xc for its K slice: amortise over at least 16 rows


def default_config(weight: GemvWeight, device: torch.device, prologue: bool = False,
                   conv_in: bool = False) -> GemvConfig:
    """The tuned config of this shape, else ~32 bytes of weight per row per iteration x 8-16 rows,
    split K until ~2 programs per SM. conv_in (the CIN input): at least CONV_IN_MIN_BN rows."""
    N, K = weight.N, weight.K
    if conv_in:
        hit = TUNED_CONV_IN.get((weight.fmt, N, K)) if device.type == "cuda" else None
    else:
        hit = TUNED.get((weight.fmt, N, K, prologue)) if device.type == "cuda" else None
    if hit is not None:
        return hit
    if weight.bits == 0:
        cfg = GemvConfig(bn=8, bk=256 if weight.w.element_size() == 4 else 512)
    elif weight.bits == 8:
        cfg = GemvConfig(bn=16, bk=512)
    else:
        cfg = GemvConfig(bn=16, bk=max(256, weight.group))
    if conv_in:
        cfg = replace(cfg, bn=max(cfg.bn, CONV_IN_MIN_BN))
    split = 1
    want = 2 * _num_sms(device)
    while triton.cdiv(N, cfg.bn) * split < want and split * 2 * cfg.bk <= K:
        split *= 2
    return replace(cfg, split=split)


def packed_int4(weight: GemvWeight, device: torch.device) -> bool:
    """Whether the plain GEMV of this weight runs the packed-bf16 int4 kernel (triton_gemv_i4.py):
    its tuned plain tile asks for it and fits. That kernel has no norm prologue, so callers that
    would fuse one (lm_head's norm_f) run the norm apart instead."""
    if weight.bits != 4:
        return False
    from falcon_mamba.ops import triton_gemv_i4

    cfg = default_config(weight, device)
    return bool(cfg.i4x2) and triton_gemv_i4.fits(weight, cfg)


_tickets: dict[torch.device, torch.Tensor] = {}


def _ticket_buffer(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 tickets shared by every "last" split launch on the device: each launch leaves them
    at zero. Allocated outside graph capture (a buffer from a freed trial graph's pool would dangle)."""
    buf = _tickets.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("run the split GEMV once before CUDA-graph capture (ticket buffer)")
        buf = _tickets[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf


def _check_cfg(cfg: GemvConfig, weight: GemvWeight) -> None:
    for v in (cfg.bn, cfg.bk, cfg.norm_bk):
        assert v & (v - 1) == 0, f"block sizes must be powers of two: {cfg}"
    if weight.bits == 4:  # at least one 8-nibble word per row per block
        assert cfg.bk >= 8 and (cfg.bk % weight.group == 0 or weight.group % cfg.bk == 0), cfg
    if weight.bits == 8:
        assert cfg.bk >= 4, cfg
    assert cfg.reduce in ("last", "kernel"), cfg.reduce


def _weight_words(weight: GemvWeight) -> tuple[torch.Tensor, bool]:
    """(the weight argument, whether it is int32 words). Quantized rows are read 4 bytes per load
    and decoded with shifts and masks; int4 rows always hold whole words (Kp / 2 bytes, Kp a multiple
    of G >= 32: formats.py), int8 rows only when K % 4 == 0 (7B widths are; tiny test models may not)."""
    w = weight.w
    if weight.bits == 0:
        return w, False
    ok = (w.shape[1] % 4 == 0 and w.stride(1) == 1 and w.stride(0) % 4 == 0
          and w.storage_offset() % 4 == 0 and w.data_ptr() % 4 == 0)
    if weight.bits == 4:
        assert ok, f"int4 weight rows must be whole int32 words: {tuple(w.shape)}, stride {w.stride()}"
    return (w.view(torch.int32), True) if ok else (w, False)


# ---- launcher ----------------------------------------------------------------------------------

def fused_gemv(weight: GemvWeight, x: torch.Tensor, *, residual: torch.Tensor | None = None,
               norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
               h_out: torch.Tensor | None = None, round_in=None, round_y=None,
               conv: tuple | None = None, out_dtype: torch.dtype | None = None, round_to=None,
               conv_in: tuple | None = None, rstd: torch.Tensor | None = None,
               norm_out: tuple | None = None, config: GemvConfig | None = None,
               x_pairs: torch.Tensor | None = None, xproj: GemvWeight | None = None):
    """y (N,) = W @ input, input (K,) = x, or with norm_weight set (the prologue)
    rms_rows(x, norm_weight, eps, residual=residual, x_out=h_out, round_in, round_y) computed in the
    kernel, rounded to norm_weight's dtype. x, residual: one row (K,) or (1, K); h_out (fp32, K
    elements, not x's memory) receives x + residual.

    conv = (state (CK-1, D) updated in place, weight (D, CK), bias (D,) or None): the epilogue conv
    step on rows < D; then returns (y, xc (D,)), else y. out_dtype: y's dtype (default x's, or the
    norm weight's with the prologue); round_to: round the fp32 sum to this dtype before storing
    (e.g. fp32 logits that equal bf16 ones). The input width must equal weight.K.

    conv_in = (state (CK-1, K), weight (K, CK), bias (K,) or None): the input is the conv step of
    x (in_proj's x half, K = D): xc = silu(conv(state, x) + bias) rounded to x's dtype, as
    triton_decode.conv_step returns it; the state is NOT updated (the SSM step's conv option does
    that). Not combined with the prologue or the conv epilogue.

    The norm split across two launches (the batch-1 "chain" decode step):
    norm_out = (h (N,) fp32, h_next (N,) fp32, eps, round_in): epilogue of a GEMV whose output is the
    residual branch (out_proj): h_next = h + y (y rounded to its dtype, as stored) and the 1/rms of
    round_in(h_next) for the next RMSNorm; returns (y, rstd (1,) fp32). h_next must not be h's memory.
    rstd = that (1,) tensor: the prologue (norm_weight set, no residual) uses it instead of summing
    the row's squares in every program; x is then h_next.

    x_pairs: x again in the pair layout of triton_decode._pair_index (the producer kernel's
    pairs_out), read by the packed int4 kernel (triton_gemv_i4.py) when that kernel runs; else unused.

    xproj (with conv): x_proj's weight (XN, D); returns (y, xc, xdbl (XN,) in xc's dtype) with
    xdbl = x_proj(xc): by extra programs of the packed int4 launch where it runs and the weight
    fits (triton_gemv_i4.xproj_fits), else by a second GEMV launch.
    """
    x = x.reshape(-1)
    K, N = weight.K, weight.N
    assert x.numel() == K and x.stride(0) == 1, (x.shape, K)
    dev = x.device
    # the given-rstd prologue reads the input like the plain GEMV does: the plain tiles fit it
    cfg = config or default_config(weight, dev, norm_weight is not None and rstd is None, conv_in is not None)
    if norm_out is not None:  # the epilogue needs whole rows in one program
        cfg = replace(cfg, split=1)
    _check_cfg(cfg, weight)
    pro = norm_weight is not None
    if pro:
        assert h_out is None or h_out.data_ptr() != x.data_ptr(), "h_out must not alias x"
        u_dtype = norm_weight.dtype
    else:
        u_dtype = x.dtype
    out_dtype = out_dtype or u_dtype
    res = residual.reshape(-1) if residual is not None else None
    y = torch.empty(N, dtype=out_dtype, device=dev)
    ho = h_out.reshape(-1) if h_out is not None else None
    if conv_in is not None:
        assert conv is None and not pro, "conv_in excludes the prologue and the conv epilogue"
        cst, cw, cb = conv_in
        assert cst.stride(-1) == 1 and cw.stride(1) == 1 and cst.shape == (cw.shape[1] - 1, K)
        assert cw.shape[0] == K
        cargs = (cst, cw, cb if cb is not None else cw, y, 0, cst.stride(0), cw.stride(0))
        CK = cw.shape[1]
    elif conv is not None:
        cst, cw, cb = conv
        D = cw.shape[0]
        assert cst.stride(-1) == 1 and cw.stride(1) == 1 and cst.shape[-1] == D and N >= D
        xc = torch.empty(D, dtype=u_dtype, device=dev)
        cargs = (cst, cw, cb if cb is not None else cw, xc, D, cst.stride(0), cw.stride(0))
        CK = cw.shape[1]
    else:
        xc = None
        cargs = (y, y, y, y, 0, 0, 0)
        CK = 2
    has_cb = (conv is not None and conv[2] is not None) or (conv_in is not None and conv_in[2] is not None)
    packable = not pro and conv_in is None and norm_out is None and rstd is None
    if cfg.i4x2 and packable and (x.dtype == torch.bfloat16 or pdl._interpreting()):
        from falcon_mamba.ops import triton_gemv_i4

        if triton_gemv_i4.fits(weight, cfg):  # the packed-bf16 int4 kernel (plain, or + conv epilogue)
            rnd = _ROUND.get(round_to, 0) if round_to is not None else 0
            xp = None
            if xproj is not None and conv is not None and triton_gemv_i4.xproj_fits(weight, cfg, xproj):
                xp = (xproj, torch.empty(xproj.N, dtype=u_dtype, device=dev))
            triton_gemv_i4.gemv_i4x2(weight, x, y, rnd, cfg, x_pairs,
                                     conv=(cargs, CK, has_cb) if conv is not None else None, xproj=xp)
            if xp is not None:
                return y, xc, xp[1]
            if xproj is not None and conv is not None:
                return y, xc, fused_gemv(xproj, xc)
            return (y, xc) if conv is not None else y
    bits = weight.bits
    KL = weight.w.shape[1] * 2 if bits == 4 else K
    w_arg, words = _weight_words(weight)
    k_per_split = triton.cdiv(triton.cdiv(KL, cfg.split), cfg.bk) * cfg.bk
    split = triton.cdiv(KL, k_per_split)
    grid_n = triton.cdiv(N, cfg.bn)
    even_k = k_per_split * split == KL  # every block of every slice lies inside the weight
    last = split > 1 and cfg.reduce == "last"
    part = torch.empty(split, N, dtype=torch.float32, device=dev) if split > 1 else y
    cnt = _ticket_buffer(dev, grid_n) if last else y
    sc = weight.scales if weight.scales is not None else weight.w
    zp = weight.zeros if weight.zeros is not None else sc
    round_out = _ROUND.get(round_to, 0) if round_to is not None else 0
    cin = conv_in is not None
    if norm_out is not None:
        hin, hnx, neps, nround = norm_out
        assert not pro and conv is None and split == 1, "norm_out: a plain GEMV with one K slice"
        assert hin.dtype == hnx.dtype == torch.float32 and hin.numel() == hnx.numel() == N
        assert hin.data_ptr() != hnx.data_ptr(), "norm_out: h_next must not alias h"
        rs = torch.empty(1, dtype=torch.float32, device=dev)
        nargs = (rs, hin.reshape(-1), hnx.reshape(-1), torch.empty(grid_n, dtype=torch.float32, device=dev),
                 float(neps))
        cnt = _ticket_buffer(dev, 1)
        round_in = nround
    elif rstd is not None:
        assert pro and res is None and ho is None, "rstd: the prologue without residual or h_out"
        nargs = (rstd, x, x, x, 0.0)
    else:
        nargs = (y, y, y, y, 0.0)
    _gemv_kernel[(grid_n, split)](
        x, res if res is not None else x, norm_weight if pro else x, ho if ho is not None else x, float(eps),
        w_arg, sc, zp, w_arg.stride(0), sc.stride(0) if bits == 4 else 0,
        y, part, cnt, *cargs, *nargs,
        N, K, KL, k_per_split,
        FMT=bits, WORDS=words, GROUP=weight.group or 1, BN=cfg.bn, BK=cfg.bk,
        EVEN_N=N % cfg.bn == 0, EVEN_K=even_k, MASK_X=not (even_k and KL == K),
        PRO=pro, HAS_RES=res is not None, WRITE_H=ho is not None, NORM_BK=cfg.norm_bk,
        ROUND_IN=_ROUND[round_in] if round_in is not None else 0,
        ROUND_Y=_ROUND[round_y] if round_y is not None else 0,
        ROUND_U=_ROUND.get(u_dtype, 0) if pro or cin else 0,
        CONV=conv is not None, CK=CK, HAS_CB=has_cb, CIN=cin,
        SPLIT=split, LAST=last, ROUND_OUT=round_out, XSPLIT=cfg.xsplit and words,
        RSTD_IN=rstd is not None, NEPI=norm_out is not None, NGRID=grid_n if norm_out is not None else 1,
        num_warps=cfg.warps, num_stages=cfg.stages, **pdl.launch_kwargs(dev), **LAUNCH_OPTIONS,
    )
    if split > 1 and not last:
        RB = 1024
        _reduce_kernel[(triton.cdiv(N, RB),)](part, N, y, *cargs, SPLIT=split, BLOCK=RB, ROUND_OUT=round_out,
                                              CONV=conv is not None, CK=CK,
                                              HAS_CB=conv is not None and has_cb, num_warps=4,
                                              **pdl.launch_kwargs(dev), **LAUNCH_OPTIONS)
    if norm_out is not None:
        return y, nargs[0]
    if xproj is not None and conv is not None:
        return y, xc, fused_gemv(xproj, xc)
    return (y, xc) if conv is not None else y
