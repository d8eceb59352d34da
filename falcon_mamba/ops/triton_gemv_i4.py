"""Batch-1 int4 GEMV with packed bf16 arithmetic: y (N,) = W (N, Kp) @ x (K,), W int4 group-wise.

Legend: N output rows, K input width, Kp K padded to the group size G, BW = BK / 8 int32 words of
8 codes per row per block, NG groups per block, CH words chained per bf16x2 accumulator.

Why: the fp32 int4 path (triton_gemv._gemv_kernel, FMT 4) spends ~4.8 SASS instructions per 4-bit
code (mask, magic-number FADD, FFMA, offsets) and runs at ~1.7 TB/s of weight bytes on the H100,
instruction bound. Here two codes share every instruction: per int32 word of 8 codes (the
quant/formats.py layout: code 8w + j at bits 4j, so bits 0-3 and 16-19 of word >> 4j hold codes j
and j + 4), one shift and one LOP3 make the bf16 pair (128 + c_j, 128 + c_{j+4}) (0x4300 | c is
128 + c exactly in bf16), one packed subtract makes it (c - 8) exactly, and one packed FMA adds
(c - 8) * x to a bf16x2 accumulator whose x pair (x[8w + j], x[8w + j + 4]) is built once per
program block and shared by all its rows: ~2 instructions per code, 4 of them per word (inline PTX,
sm_90: sub/fma .bf16x2). Each accumulator lane sums CH * 4 products in bf16 and then goes to fp32;
per group the dot product is completed exactly as formats.py defines the weight,
    sum_k (c_k - z) x_k s = s * (sum_k (c_k - 8) x_k + (8 - z) * sum_k x_k),
with sum_k x_k per group computed in fp32 once per block.

Numerics: the products and the CH * 4-term lane sums round to bf16 (8 significant bits). On random
7B-shaped data the GEMV's relative error against the fp32 dequantized product is ~0.3-0.45%
(CH 2-4; the bf16 rounding of y alone is ~0.2%), far below int4's own quantization error (~10-20%
relative logit error): tests/test_triton_gemv_i4.py bounds it. The interpreter (CPU tests) runs the
same data flow with fp32 products and sums (ASM False): inline PTX cannot run there.

Only the plain GEMV (no norm prologue, conv epilogue or split-K): in_proj and out_proj of the
"triton_gemv" decode modes, and lm_head when called plain. triton_gemv.fused_gemv dispatches here for
int4 weights when GemvConfig.i4x2 is set and x is bf16 (or the interpreter runs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falcon_mamba.ops import pdl
from falcon_mamba.ops.pdl import dep_sync
from falcon_mamba.ops.triton_decode import _round
from falcon_mamba.ops.triton_gemv import _split8

# one word of 8 codes against its 4 x pairs, accumulated into a bf16x2 (as int32 bits):
# $0 = acc out; $1 word; $2..$5 x pairs j = 0..3; $6 acc in
_WORD_FMA = tl.constexpr("""
{
.reg .b32 t, q, m, o;
mov.b32 m, 0x43004300;
mov.b32 o, 0x43084308;
mov.b32 $0, $6;
lop3.b32 q, $1, 0x000F000F, m, 0xEA;
sub.rn.bf16x2 q, q, o;
fma.rn.bf16x2 $0, q, $2, $0;
shr.u32 t, $1, 4;
lop3.b32 q, t, 0x000F000F, m, 0xEA;
sub.rn.bf16x2 q, q, o;
fma.rn.bf16x2 $0, q, $3, $0;
shr.u32 t, $1, 8;
lop3.b32 q, t, 0x000F000F, m, 0xEA;
sub.rn.bf16x2 q, q, o;
fma.rn.bf16x2 $0, q, $4, $0;
shr.u32 t, $1, 12;
lop3.b32 q, t, 0x000F000F, m, 0xEA;
sub.rn.bf16x2 q, q, o;
fma.rn.bf16x2 $0, q, $5, $0;
}
""")


@triton.jit
def _split_last(v, CH: tl.constexpr):
    # (..., CH) -> CH slices v[..., i] (a tuple), by layout only; CH in 1, 2, 4
    if CH == 1:
        return (tl.reshape(v, v.shape[:-1]),)
    elif CH == 2:
        a, b = tl.split(v)
        return (a, b)
    else:
        c0, c1 = tl.split(tl.reshape(v, v.shape[:-1] + [2, 2]))
        a, c = tl.split(c0)
        b, d = tl.split(c1)
        return (a, b, c, d)


@triton.jit
def _bf16_lo(v):
    # the bf16 in the low half of int32 bits, as fp32
    return (v << 16).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_hi(v):
    return (v & -65536).to(tl.float32, bitcast=True)  # -65536 = 0xFFFF0000


@triton.jit
def _gemv_i4x2_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, s_wn, s_sn, y_ptr, N,
    K: tl.constexpr, KL: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    CH: tl.constexpr, EVEN_N: tl.constexpr, MASK_X: tl.constexpr, ROUND_OUT: tl.constexpr,
    ASM: tl.constexpr, PDL: tl.constexpr,
):
    # w_ptr: the packed codes as int32 words (N, KL / 8), row stride s_wn words; scales (N, KL / G)
    # fp16 and zeros uint8 with row stride s_sn. KL (= Kp) is a multiple of BK (the launcher's check).
    dep_sync(PDL)
    BW: tl.constexpr = BK // 8
    GW: tl.constexpr = BK if BK < GROUP else GROUP  # codes per scale within one block
    NG: tl.constexpr = BK // GW
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    mn = n < N
    row = n.to(tl.int64) * s_wn
    acc = tl.zeros((BN, NG), tl.float32)
    for k0 in range(0, KL, BK):
        wf = k0 // 8 + tl.arange(0, BW)
        if EVEN_N:
            wd = tl.load(w_ptr + row[:, None] + wf[None, :])
        else:
            wd = tl.load(w_ptr + row[:, None] + wf[None, :], mask=mn[:, None], other=0)
        kx = k0 + 8 * tl.arange(0, BW)[:, None] + tl.arange(0, 8)[None, :]  # (BW, 8): k = 8w + i
        if MASK_X:
            xv = tl.load(x_ptr + kx, mask=kx < K, other=0.0)
        else:
            xv = tl.load(x_ptr + kx)
        xs = tl.sum(tl.reshape(xv.to(tl.float32), (NG, GW)), axis=1)  # (NG,) sum of x per group
        # x pieces by code position j of a word, chained words split off the last axis
        w3 = _split_last(tl.reshape(wd, (BN, BW // CH, CH)), CH)
        if ASM:
            xb = xv.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            lo, hi = tl.split(tl.permute(tl.reshape(xb, (BW, 2, 4)), (0, 2, 1)))  # x[8w+j], x[8w+4+j]
            xp = tl.reshape(lo | (hi << 16), (BW, 2, 2))  # (BW, 4) pairs, j = 2a + b
            p0, p1 = tl.split(xp)
            x0, x2 = tl.split(p0)
            x1, x3 = tl.split(p1)
            xq0 = _split_last(tl.reshape(x0, (BW // CH, CH)), CH)
            xq1 = _split_last(tl.reshape(x1, (BW // CH, CH)), CH)
            xq2 = _split_last(tl.reshape(x2, (BW // CH, CH)), CH)
            xq3 = _split_last(tl.reshape(x3, (BW // CH, CH)), CH)
            bits = tl.zeros((BN, BW // CH), tl.int32)  # bf16x2 (+0, +0)
            for c in tl.static_range(CH):
                bits = tl.inline_asm_elementwise(
                    _WORD_FMA, "=r,r,r,r,r,r,r",
                    [w3[c], xq0[c][None, :], xq1[c][None, :], xq2[c][None, :], xq3[c][None, :], bits],
                    dtype=tl.int32, is_pure=True, pack=1)
            part = _bf16_lo(bits) + _bf16_hi(bits)  # (BN, BW // CH) fp32
        else:  # the same data flow in fp32 (the interpreter cannot run PTX)
            x8 = _split8(tl.reshape(xv.to(tl.float32), (BW, 2, 2, 2)))  # x[8w + i], i = 0..7
            part = tl.zeros((BN, BW // CH), tl.float32)
            for i in tl.static_range(8):
                xc = _split_last(tl.reshape(x8[i], (BW // CH, CH)), CH)
                for c in tl.static_range(CH):
                    code = (w3[c] >> (4 * i)) & 0xF
                    part += (code.to(tl.float32) - 8.0) * xc[c][None, :]
        dot = tl.sum(tl.reshape(part, (BN, NG, BW // CH // NG)), axis=2)  # (BN, NG)
        g = k0 // GROUP + tl.arange(0, NG)
        sg = n.to(tl.int64)[:, None] * s_sn + g[None, :]
        sc = tl.load(s_ptr + sg, mask=mn[:, None], other=0.0).to(tl.float32)
        zp = tl.load(z_ptr + sg, mask=mn[:, None], other=0).to(tl.float32)
        acc += sc * (dot + (8.0 - zp) * xs[None, :])
    yv = _round(tl.sum(acc, axis=1), ROUND_OUT)
    tl.store(y_ptr + n, yv.to(y_ptr.dtype.element_ty), mask=mn)


def fits(weight, cfg) -> bool:
    """Whether this kernel takes the int4 weight with cfg's tile: whole blocks along Kp, whole words
    per group slice, and CH (cfg.i4x2) chained words inside each group slice of a block."""
    KL = weight.w.shape[1] * 2
    gw = min(cfg.bk, weight.group)
    return (weight.bits == 4 and cfg.i4x2 in (1, 2, 4) and KL % cfg.bk == 0 and cfg.bk >= 8
            and (cfg.bk % weight.group == 0 or weight.group % cfg.bk == 0) and (gw // 8) % cfg.i4x2 == 0)


def gemv_i4x2(weight, x: torch.Tensor, y: torch.Tensor, round_out: int, cfg) -> torch.Tensor:
    """y (N,) = dequant(W) @ x (K,) into the given y; x bf16 on a GPU (any float in the interpreter).
    The caller (triton_gemv.fused_gemv) checked ``fits``."""
    w = weight.w.view(torch.int32)
    N, K, KL = weight.N, weight.K, weight.w.shape[1] * 2
    dev = x.device
    asm = not pdl._interpreting()
    assert not asm or x.dtype == torch.bfloat16, "the packed int4 GEMV takes a bf16 input on a GPU"
    _gemv_i4x2_kernel[(triton.cdiv(N, cfg.bn),)](
        x, w, weight.scales, weight.zeros, w.stride(0), weight.scales.stride(0), y, N,
        K=K, KL=KL, GROUP=weight.group, BN=cfg.bn, BK=cfg.bk, CH=cfg.i4x2, EVEN_N=N % cfg.bn == 0,
        MASK_X=KL != K, ROUND_OUT=round_out, ASM=asm,
        num_warps=cfg.warps, num_stages=cfg.stages, **pdl.launch_kwargs(dev),
    )
    return y
