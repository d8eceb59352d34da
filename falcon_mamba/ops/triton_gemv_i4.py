"""Batch-1 int4 GEMV with packed bf16 arithmetic: y (N,) = W (N, Kp) @ x (K,), W int4 group-wise.

Legend: N output rows, K input width, Kp K padded to the group size G, BW = BK / 8 int32 words of
8 codes per row per block, NG groups per block, CH words chained per bf16x2 accumulator (1 or 4).

Why: the fp32 int4 path (triton_gemv._gemv_kernel, FMT 4) spends ~4.8 SASS instructions per 4-bit
code (mask, magic-number FADD, FFMA, offsets) and runs at ~1.7 TB/s of weight bytes on the H100,
instruction bound. Here two codes share every instruction: per int32 word of 8 codes (the
quant/formats.py layout: code 8w + j at bits 4j, so bits 0-3 and 16-19 of word >> 4j hold codes j
and j + 4), one shift and one LOP3 make the bf16 pair (128 + c_j, 128 + c_{j+4}) (0x4300 | c is
128 + c exactly in bf16), one packed subtract of (128 + z, 128 + z) makes (c - z) exactly, and one
packed FMA adds (c - z) * x to a bf16x2 accumulator (inline PTX, sm_90: sub/fma .bf16x2). With
CH = 4 one accumulator runs over the 4 consecutive words a thread holds (tl.inline_asm_elementwise
with pack=4: its 4 elements are a row's consecutive words in the tiles this kernel is tuned and
tested with; the cuda tests check every code position bit-exactly) and returns (lo, hi, 0, 0) in
fp32; the caller scales by the group's scale and sums.

The x pairs (x[8w + j], x[8w + j + 4]) come either from x itself (split and repacked in every block:
layout changes through shared memory) or, faster, from the "pair layout" copy of x that the
producer kernel stored (triton_decode._pair_index: the norm and SSM-step kernels can write it),
read in the weight tile's own layout.

Numerics: the products and the CH * 4-term lane sums round to bf16 (8 significant bits). On random
7B-shaped data the GEMV's relative error against the exact dequantized product is 0.46% (CH 4) /
0.25% (CH 1); the bf16 rounding of y alone is 0.17%; int4's own quantization error is ~20% on
logits (benchmarks/results/h100-i4x2-sweep-*.json). tests/test_triton_gemv_i4.py bounds it. The
interpreter (CPU tests) runs the same data flow with fp32 products and sums (ASM False): inline
PTX cannot run there.

The plain GEMV and the conv-step epilogue (in_proj of the "triton_gemv" decode mode); no norm
prologue and no split-K. triton_gemv.fused_gemv dispatches here for int4 weights when
GemvConfig.i4x2 is set, the tile fits and x is bf16 (or the interpreter runs). The first block's
weights are loaded before the PDL wait.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falcon_mamba.ops import pdl
from falcon_mamba.ops.pdl import dep_sync
from falcon_mamba.ops.triton_decode import _pair_index
from falcon_mamba.ops.triton_gemv import _finish, _split8
from falcon_mamba.ops.triton_helpers import LAUNCH_OPTIONS


def _word_asm(pack: int) -> str:
    """PTX for ``pack`` consecutive words of one row (pack 1 or 4): per word, 4 x (shift, LOP3 to the
    bf16 pair (128 + c_j, 128 + c_{j+4}), packed subtract of (128 + z, 128 + z), packed FMA with the x
    pair into one bf16x2 accumulator chained over the pack's words); out: fp32 (lo, hi, 0, 0) of the
    accumulator for pack 4, lo + hi for pack 1. Operands: $0..$(P-1) out, then P each of word, x
    pairs j = 0..3 and zero-point pairs."""
    P = pack
    w, xp, zz = P, 2 * P, 6 * P  # first operand of each input
    lines = ["{", ".reg .b32 t, q, m, a;", "mov.b32 m, 0x43004300;", "mov.b32 a, 0;"]
    for e in range(P):
        for j in range(4):
            src = f"${w + e}"
            if j:
                lines.append(f"shr.u32 t, ${w + e}, {4 * j};")
                src = "t"
            lines += [f"lop3.b32 q, {src}, 0x000F000F, m, 0xEA;", f"sub.rn.bf16x2 q, q, ${zz + e};",
                      f"fma.rn.bf16x2 a, q, ${xp + j * P + e}, a;"]
    if P == 1:
        lines += ["shl.b32 t, a, 16;", "and.b32 q, a, 0xFFFF0000;", "add.f32 $0, t, q;"]
    else:
        lines += ["shl.b32 $0, a, 16;", "and.b32 $1, a, 0xFFFF0000;", "mov.b32 $2, 0;", "mov.b32 $3, 0;"]
    return "\n".join(lines + ["}"])


_ASM1 = tl.constexpr(_word_asm(1))
_ASM4 = tl.constexpr(_word_asm(4))
_CONS1 = tl.constexpr("=r," + ",".join(["r"] * 6))
_CONS4 = tl.constexpr(",".join(["=r"] * 4) + "," + ",".join(["r"] * 24))


@triton.jit
def _wtile(w_ptr, s_ptr, z_ptr, row, n, mn, s_sn, k0, GROUP: tl.constexpr, BN: tl.constexpr,
           BK: tl.constexpr, EVEN_N: tl.constexpr, ASM: tl.constexpr):
    # One block's weight data (reads nothing another kernel writes, so it may run before the PDL
    # wait): the (BN, BW) words, each word's scale (fp32) and zero point, (128 + z) as a bf16x2
    # for the PTX (ASM), else z as fp32. Scale and zero point are built per (row, group), then
    # repeated over the group's words.
    BW: tl.constexpr = BK // 8
    GW: tl.constexpr = BK if BK < GROUP else GROUP  # codes per scale within one block
    NG: tl.constexpr = BK // GW
    WPG: tl.constexpr = GW // 8  # words per group within a block
    wf = k0 // 8 + tl.arange(0, BW)
    if EVEN_N:
        wd = tl.load(w_ptr + row[:, None] + wf[None, :])
    else:
        wd = tl.load(w_ptr + row[:, None] + wf[None, :], mask=mn[:, None], other=0)
    g = k0 // GROUP + tl.arange(0, NG)
    sg = n.to(tl.int64)[:, None] * s_sn + g[None, :]
    sc = tl.load(s_ptr + sg, mask=mn[:, None], other=0.0).to(tl.float32)
    zp = tl.load(z_ptr + sg, mask=mn[:, None], other=0).to(tl.int32)
    if ASM:
        zp = (zp | 0x4300) * 0x10001  # bf16x2 (128 + z, 128 + z)
    else:
        zp = zp.to(tl.float32)
    sc = tl.reshape(tl.broadcast_to(sc[:, :, None], (BN, NG, WPG)), (BN, BW))
    zp = tl.reshape(tl.broadcast_to(zp[:, :, None], (BN, NG, WPG)), (BN, BW))
    return wd, sc, zp


@triton.jit
def _block_dot(wd, sc, zp, x_ptr, xp_ptr, n, k0, K: tl.constexpr, KL: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr, CH: tl.constexpr, MASK_X: tl.constexpr, ASM: tl.constexpr,
               PAIRS: tl.constexpr, XCG: tl.constexpr = False):
    # (BN, BW) fp32: each word's scaled dot product with x (packs of 4 words: the pack's sum in the
    # first two slots, zeros after; the caller sums them all)
    BW: tl.constexpr = BK // 8
    if ASM and PAIRS:
        # the producer wrote x as pair planes (4, KL / 8) int32: loaded in the weight tile's shape
        # (same addresses on every row: a layout the compiler shares with the weight tile)
        xo = k0 // 8 + tl.arange(0, BW)[None, :] + 0 * n[:, None]
        if XCG:  # written by other programs of this launch: from L2, not L1
            x0 = tl.load(xp_ptr + xo, cache_modifier=".cg")
            x1 = tl.load(xp_ptr + KL // 8 + xo, cache_modifier=".cg")
            x2 = tl.load(xp_ptr + 2 * (KL // 8) + xo, cache_modifier=".cg")
            x3 = tl.load(xp_ptr + 3 * (KL // 8) + xo, cache_modifier=".cg")
        else:
            x0 = tl.load(xp_ptr + xo)
            x1 = tl.load(xp_ptr + KL // 8 + xo)
            x2 = tl.load(xp_ptr + 2 * (KL // 8) + xo)
            x3 = tl.load(xp_ptr + 3 * (KL // 8) + xo)
    else:
        kx = k0 + 8 * tl.arange(0, BW)[:, None] + tl.arange(0, 8)[None, :]  # (BW, 8): k = 8w + i
        if MASK_X:
            xv = tl.load(x_ptr + kx, mask=kx < K, other=0.0)
        elif XCG:  # x written by other programs of this same launch: read it from L2, not L1
            xv = tl.load(x_ptr + kx, cache_modifier=".cg")
        else:
            xv = tl.load(x_ptr + kx)
        if ASM:
            xb = xv.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            lo, hi = tl.split(tl.permute(tl.reshape(xb, (BW, 2, 4)), (0, 2, 1)))  # x[8w+j], x[8w+4+j]
            xp = tl.reshape(lo | (hi << 16), (BW, 2, 2))  # (BW, 4) pairs, j = 2a + b
            p0, p1 = tl.split(xp)
            x0, x2 = tl.split(p0)
            x1, x3 = tl.split(p1)
            x0, x1, x2, x3 = x0[None, :], x1[None, :], x2[None, :], x3[None, :]
    if ASM:
        args = [wd, x0, x1, x2, x3, zp]
        if CH == 4:
            part = tl.inline_asm_elementwise(_ASM4, _CONS4, args, dtype=tl.float32, is_pure=True, pack=4)
        else:
            part = tl.inline_asm_elementwise(_ASM1, _CONS1, args, dtype=tl.float32, is_pure=True, pack=1)
    else:  # the same data flow in fp32 (the interpreter cannot run PTX)
        x8 = _split8(tl.reshape(xv.to(tl.float32), (BW, 2, 2, 2)))  # x[8w + i], i = 0..7
        part = tl.zeros((BN, BW), tl.float32)
        for i in tl.static_range(8):
            code = (wd >> (4 * i)) & 0xF
            part += (code.to(tl.float32) - zp) * x8[i][None, :]
    return sc * part


@triton.jit
def _gemv_i4x2_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, s_wn, s_sn, y_ptr, N,
    K: tl.constexpr, KL: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    CH: tl.constexpr, EVEN_N: tl.constexpr, MASK_X: tl.constexpr, ROUND_OUT: tl.constexpr,
    ASM: tl.constexpr, PDL: tl.constexpr, xp_ptr=None, PAIRS: tl.constexpr = False,
    cst_ptr=None, cw_ptr=None, cb_ptr=None, xc_ptr=None, D=0, s_ck=0, s_cw=0,
    CONV: tl.constexpr = False, CK: tl.constexpr = 2, HAS_CB: tl.constexpr = False,
    xw_ptr=None, xs_ptr=None, xz_ptr=None, xs_wn=0, xs_sn=0, xpart_ptr=None, xcnt_ptr=None, xy_ptr=None,
    XP: tl.constexpr = False, XN: tl.constexpr = 1, XK: tl.constexpr = 8, XGROUP: tl.constexpr = 32,
    XBN: tl.constexpr = 16, XBK: tl.constexpr = 1024, NXH: tl.constexpr = 1, xcp_ptr=None,
    PRE: tl.constexpr = True,
):
    # w_ptr: the packed codes as int32 words (N, KL / 8), row stride s_wn words; scales (N, KL / G)
    # fp16 and zeros uint8 with row stride s_sn. KL (= Kp) is a multiple of BK (the launcher's check).
    # PRE: the first block's weights are loaded before the PDL wait: a program launched early (while
    # the previous kernel finishes) has them in registers when x becomes readable (out_proj and
    # lm_head load it after: their early loads slowed the kernel before them).
    pid = tl.program_id(0)
    # with XP the grid is [x half of the GEMV][x_proj programs][z half of the GEMV]: the x_proj
    # programs are dispatched right after the x half they wait for and run while the z half streams
    NXP: tl.constexpr = ((XN + XBN - 1) // XBN) * (XK // XBK) if XP else 0
    if XP and pid >= NXH and pid < NXH + NXP:
        _xproj_program(pid - NXH, xw_ptr, xs_ptr, xz_ptr, xs_wn, xs_sn, xc_ptr, xcp_ptr, xpart_ptr, xcnt_ptr,
                       xy_ptr, XN, XK, XGROUP, XBN, XBK, NXH, ASM, PDL)
    else:
        if XP and pid >= NXH:
            pid -= NXP
        n = pid * BN + tl.arange(0, BN)
        mn = n < N
        row = n.to(tl.int64) * s_wn
        if not PRE:
            dep_sync(PDL)
        wd, sc, zp = _wtile(w_ptr, s_ptr, z_ptr, row, n, mn, s_sn, 0, GROUP, BN, BK, EVEN_N, ASM)
        if PRE:  # the first block's weights were loaded before the PDL wait
            dep_sync(PDL)
        acc = _block_dot(wd, sc, zp, x_ptr, xp_ptr, n, 0, K, KL, BN, BK, CH, MASK_X, ASM, PAIRS)
        for k0 in range(BK, KL, BK):
            wd, sc, zp = _wtile(w_ptr, s_ptr, z_ptr, row, n, mn, s_sn, k0, GROUP, BN, BK, EVEN_N, ASM)
            acc += _block_dot(wd, sc, zp, x_ptr, xp_ptr, n, k0, K, KL, BN, BK, CH, MASK_X, ASM, PAIRS)
        # y, then (CONV) the conv step on rows < D (in_proj's x half), as the fp32 kernel's epilogue
        _finish(tl.sum(acc, axis=1), n, mn, y_ptr, cst_ptr, cw_ptr, cb_ptr, xc_ptr, D, s_ck, s_cw, ROUND_OUT,
                CONV, CK, HAS_CB)
        if XP:
            if pid < NXH:  # this program's xc is stored: count it for the x_proj programs
                tl.debug_barrier()
                if ASM:  # and again in the pair layout the x_proj programs' packed products read
                    mx = mn & (n < D)
                    xcv = tl.load(xc_ptr + n, mask=mx, other=0.0)
                    tl.store(xcp_ptr + _pair_index(n, XK // 8), xcv, mask=mx)
                    tl.debug_barrier()
                tl.atomic_add(xcnt_ptr + (XN + XBN - 1) // XBN, 1, sem="release", scope="gpu")


@triton.jit
def _xproj_program(q, xw_ptr, xs_ptr, xz_ptr, xs_wn, xs_sn, xc_ptr, xcp_ptr, xpart_ptr, xcnt_ptr, xy_ptr,
                   XN: tl.constexpr, XK: tl.constexpr, XGROUP: tl.constexpr, XBN: tl.constexpr,
                   XBK: tl.constexpr, NXH: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    # x_proj program q: rows rb * XBN.., K block s of xdbl (XN,) = W_x (XN, XK) @ xc (XK,), W_x int4.
    # It loads its weight block, waits until the NXH in_proj programs of the x half have stored xc
    # (a counter they release-increment; these programs come after them in the grid, so the ones
    # they wait for were dispatched before them), takes its block's products (on a GPU packed bf16
    # products of single words, CH 1, from the pair copy of xc those programs also store: 0.25% of
    # the output norm, against int4 g128's own ~14% on a random 7B-shaped layer; fp32 products
    # from xc in the interpreter), stores the partial sum, and the last program of a row block
    # (ticket) adds the XK / XBK partials in order and stores the rows. The last x_proj program
    # resets the counters: every launch leaves them zero.
    SPL: tl.constexpr = XK // XBK
    NRB: tl.constexpr = (XN + XBN - 1) // XBN
    rb = q // SPL
    s = q % SPL
    n = rb * XBN + tl.arange(0, XBN)
    mn = n < XN
    wd, sc, zp = _wtile(xw_ptr, xs_ptr, xz_ptr, n.to(tl.int64) * xs_wn, n, mn, xs_sn, s * XBK, XGROUP, XBN,
                        XBK, False, ASM)
    dep_sync(PDL)
    c = tl.atomic_add(xcnt_ptr + NRB, 0, sem="acquire", scope="gpu")
    while c < NXH:
        c = tl.atomic_add(xcnt_ptr + NRB, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()
    # GPU: packed products of single words (CH 1: 0.25% of the output norm) from xc's pair copy;
    # the interpreter: the fp32 data flow from xc
    k0 = s * XBK
    if ASM:
        xpi = xcp_ptr.to(tl.pointer_type(tl.int32))
        acc = _block_dot(wd, sc, zp, xc_ptr, xpi, n, k0, XK, XK, XBN, XBK, 1, False, True, True, True)
    else:
        acc = _block_dot(wd, sc, zp, xc_ptr, xc_ptr, n, k0, XK, XK, XBN, XBK, 1, False, False, False, True)
    tl.store(xpart_ptr + s * XN + n, tl.sum(acc, axis=1), mask=mn)
    tl.debug_barrier()  # every thread's partial is stored before the ticket is taken
    ticket = tl.atomic_add(xcnt_ptr + rb, 1, sem="acq_rel", scope="gpu")
    if ticket == SPL - 1:
        tot = tl.zeros((XBN,), tl.float32)
        for t in tl.static_range(SPL):
            tot += tl.load(xpart_ptr + t * XN + n, mask=mn, other=0.0, cache_modifier=".cg")
        tl.store(xy_ptr + n, tot.to(xy_ptr.dtype.element_ty), mask=mn)
        tl.atomic_xchg(xcnt_ptr + rb, 0)
    done = tl.atomic_add(xcnt_ptr + NRB + 1, 1, sem="acq_rel", scope="gpu")
    if done == NRB * SPL - 1:
        tl.atomic_xchg(xcnt_ptr + NRB, 0)
        tl.atomic_xchg(xcnt_ptr + NRB + 1, 0)


def fits(weight, cfg) -> bool:
    """Whether this kernel takes the int4 weight with cfg's tile: whole blocks along Kp, whole words
    per group slice, and CH (cfg.i4x2) chained words inside each group slice of a block."""
    KL = weight.w.shape[1] * 2
    gw = min(cfg.bk, weight.group)
    return (weight.bits == 4 and cfg.i4x2 in (1, 4) and KL % cfg.bk == 0 and cfg.bk >= 8
            and (cfg.bk % weight.group == 0 or weight.group % cfg.bk == 0) and (gw // 8) % cfg.i4x2 == 0)


XP_BN = 8  # x_proj rows per program of the merged launch (16: 80 registers instead of 63)
XP_BK = 1024  # and its K block (one per program: split-K over XK / XP_BK programs per row block)


def xproj_fits(weight, cfg, xweight) -> bool:
    """Whether the x_proj weight can run as extra programs of this in_proj launch (gemv_i4x2's
    xproj): int4 with whole unpadded blocks over in_proj's x half (xweight.K = D = N / 2) and
    whole in_proj row blocks in that half."""
    if xweight is None or xweight.bits != 4 or weight.N % 2:
        return False
    D = weight.N // 2
    bk = min(XP_BK, D)
    return (xweight.K == D and xweight.w.shape[1] * 2 == D and D % cfg.bn == 0 and bk & (bk - 1) == 0
            and D % bk == 0 and bk >= 8 and (bk % xweight.group == 0 or xweight.group % bk == 0))


def gemv_i4x2(weight, x: torch.Tensor, y: torch.Tensor, round_out: int, cfg,
              x_pairs: torch.Tensor | None = None, conv: tuple | None = None,
              xproj: tuple | None = None) -> torch.Tensor:
    """y (N,) = dequant(W) @ x (K,) into the given y; x bf16 on a GPU (any float in the interpreter).
    x_pairs: x again in the pair layout (triton_decode._pair_index, written by the producer kernel):
    the kernel then reads the bf16 pairs as int32 planes instead of building them from x (which
    costs layout changes through shared memory in every block); used on a GPU where K == Kp.
    conv = (the conv-epilogue arguments of triton_gemv.fused_gemv (state, weight, bias, xc, D and
    strides), CK, has bias): the conv step on rows < D after the GEMV (xc written, state updated).
    xproj = (x_proj's int4 GemvWeight (XN, D), xdbl (XN,) out), with conv: x_proj of the xc this
    launch writes, by extra programs between the GEMV's x and z halves (_xproj_program;
    ``xproj_fits``): they run while the z half streams, instead of a launch after this one.
    The caller (triton_gemv.fused_gemv) checked ``fits``."""
    from falcon_mamba.ops.triton_gemv import _ticket_buffer

    w = weight.w.view(torch.int32)
    N, K, KL = weight.N, weight.K, weight.w.shape[1] * 2
    dev = x.device
    asm = not pdl._interpreting()
    assert not asm or x.dtype == torch.bfloat16, "the packed int4 GEMV takes a bf16 input on a GPU"
    pairs = asm and x_pairs is not None and KL == K
    if pairs:
        assert x_pairs.dtype == torch.bfloat16 and x_pairs.numel() == K and x_pairs.is_contiguous()
    ngemv = triton.cdiv(N, cfg.bn)
    grid = ngemv
    xargs = {}
    if xproj is not None:
        xw, xy = xproj
        assert conv is not None and xproj_fits(weight, cfg, xw), "xproj: an int4 x_proj over the conv's xc"
        D = N // 2
        bk = min(XP_BK, D)
        nrb = triton.cdiv(xw.N, XP_BN)
        xwords = xw.w.view(torch.int32)
        grid += nrb * (D // bk)
        part = torch.empty(D // bk, xw.N, dtype=torch.float32, device=dev)
        xargs = dict(xw_ptr=xwords, xcp_ptr=torch.empty(D, dtype=x.dtype, device=dev) if asm else None,
                     xs_ptr=xw.scales, xz_ptr=xw.zeros, xs_wn=xwords.stride(0),
                     xs_sn=xw.scales.stride(0), xpart_ptr=part,
                     xcnt_ptr=_ticket_buffer(dev, nrb + 2), xy_ptr=xy, XP=True, XN=xw.N, XK=D,
                     XGROUP=xw.group, XBN=XP_BN, XBK=bk, NXH=D // cfg.bn)
    _gemv_i4x2_kernel[(grid,)](
        x, w, weight.scales, weight.zeros, w.stride(0), weight.scales.stride(0), y, N,
        K=K, KL=KL, GROUP=weight.group, BN=cfg.bn, BK=cfg.bk, CH=cfg.i4x2, EVEN_N=N % cfg.bn == 0,
        MASK_X=KL != K, ROUND_OUT=round_out, ASM=asm,
        xp_ptr=x_pairs.view(torch.int32) if pairs else None, PAIRS=pairs,
        **(dict(zip(("cst_ptr", "cw_ptr", "cb_ptr", "xc_ptr", "D", "s_ck", "s_cw"), conv[0]), CONV=True,
                    CK=conv[1], HAS_CB=conv[2]) if conv is not None else {}),
        **xargs, PRE=cfg.pre,
        num_warps=cfg.warps, num_stages=cfg.stages, **pdl.launch_kwargs(dev), **LAUNCH_OPTIONS,
    )
    return y
