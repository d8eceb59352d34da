"""Every Triton kernel launch of the package at the Falcon Mamba 7B shapes, recorded, not run.

Legend: B batch, L length, H hidden 4096, D inner 8192, N state 16, R dt rank 256, K conv taps 4,
V vocab 65024, XN = R + 2N = 288 (x_proj's rows), fmt a weight format (dense bf16, int8, int4 g128).

Each case calls the package's own launcher (triton_scan.scan_fwd, triton_decode.ssm_step,
triton_gemv.fused_gemv, ...) the way the model, decode_step.py and decode_chain.py call it, with
CPU tensors from torch.empty (never touched, so a 7B-sized weight costs no memory) while
``JITFunction.run`` only records its arguments. The constexprs, the specialisation of every
argument and the launch options are then exactly what the launcher computes for those shapes;
benchmarks/inspect_kernels.py compiles each recorded launch for sm_90a. Three things are set as
on the lent H200: GEMV configs come from the CUDA tables (triton_gemv.default_config as on a GPU,
132 SMs), and the decode kernels launch with programmatic dependent launch on (the graphed decoder
keeps it where it is faster). The composition of the decode modes is written out here (the mode
functions themselves check for a CUDA device): keep it in step with decode_step.py / decode_chain.py.

    from benchmarks.kernel_cases import recorded_launches   # TRITON_INTERPRET must be unset
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, replace

import torch

H, D, N, R, K, V = 4096, 8192, 16, 256, 4, 65024
XN = R + 2 * N
EPS, MIX_EPS = 1e-5, 1e-6
BF, F32 = torch.bfloat16, torch.float32
FORMATS = ("dense", "int8", "int4g128")
GROUP = 128
H200_SMS = 132


@dataclass
class Launch:
    """One recorded launch: kernel[grid](*args, **kwargs) as the launcher made it."""

    case: str
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple = field(default=())

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


def E(*shape, dtype=BF):
    return torch.empty(*shape, dtype=dtype)


def weight(fmt: str, n: int, k: int):
    """A GemvWeight of shape (n, k) in fmt (quant/formats.py layouts)."""
    from falcon_mamba.ops.triton_gemv import GemvWeight

    if fmt == "dense":
        return GemvWeight.dense(E(n, k))
    if fmt == "int8":
        return GemvWeight(w=E(n, k, dtype=torch.int8), bits=8, scales=E(n, dtype=F32), K=k)
    kp = -(-k // GROUP) * GROUP
    return GemvWeight(w=E(n, kp // 2, dtype=torch.uint8), bits=4,
                      scales=E(n, kp // GROUP, dtype=torch.float16),
                      zeros=E(n, kp // GROUP, dtype=torch.uint8), group=GROUP, K=k)


def dt_weight(fmt: str):
    """dt_proj's weight as the fused SSM step takes it: the dense tensor, else the GemvWeight."""
    w = weight(fmt, D, R)
    return w.w if fmt == "dense" else w


class _Mixer:
    """One layer's tensors at batch B (fresh per case)."""

    def __init__(self, B: int):
        self.B = B
        self.ssm = E(B, D, N, dtype=F32)
        self.conv = E(B, K - 1, D)
        self.cw, self.cb = E(D, K), E(D)
        self.A_log, self.Dskip, self.dtb = E(D, N, dtype=F32), E(D, dtype=F32), E(D, dtype=F32)
        self.xz = E(B, 2 * D)  # in_proj's output: x half, z half
        self.xc = E(B, D)
        self.xdbl = E(B, XN)  # x_proj's output [dt_r, B, C]

    def ssm_step(self, W_dt, **kw):
        from falcon_mamba.ops import triton_decode

        x = kw.pop("x", self.xc)
        return triton_decode.ssm_step(self.ssm, x, self.xdbl[:, :R], self.A_log, self.xdbl[:, R:R + N],
                                      self.xdbl[:, R + N:], self.Dskip, self.xz[:, D:], self.dtb, W_dt=W_dt,
                                      norm_eps=MIX_EPS, a_is_log=True, **kw)


CASES: list[tuple[str, bool, object]] = []  # (name, decode: PDL on, thunk)


def case(name: str, decode: bool = True):
    def deco(fn):
        CASES.append((name, decode, fn))
        return fn
    return deco


# ---- prefill and training (model.forward through ops.triton_backend) --------------------------

def _prefill_cases(L: int = 16384) -> None:
    from falcon_mamba.ops import (
        triton_ce,
        triton_conv,
        triton_conv_bwd,
        triton_decode,
        triton_norm_bwd,
        triton_scan,
    )

    def scan_args(Lx):
        x, z = E(1, Lx, 2 * D)[..., :D], E(1, Lx, 2 * D)[..., D:]
        xdbl = E(1, Lx, XN)
        return dict(x=x, dt=E(1, Lx, D), A=E(D, N, dtype=F32), Bm=E(1, Lx, N), Cm=E(1, Lx, N),
                    Dv=E(D, dtype=F32), z=z, dt_bias=E(D, dtype=F32)), xdbl

    @case("prefill norm, first block (embeddings bf16)", decode=False)
    def _():
        triton_decode.rms_rows(E(1, L, H), E(H), EPS, x_out=E(1, L, H, dtype=F32), round_in=BF, round_y=BF,
                               out_dtype=BF)

    @case("prefill add+norm (fp32 stream + bf16 out)", decode=False)
    def _():
        h = E(1, L, H, dtype=F32)
        triton_decode.rms_rows(h, E(H), EPS, residual=E(1, L, H), x_out=h, round_in=BF, round_y=BF,
                               out_dtype=BF)

    @case("prefill dt_r norm (L, 256)", decode=False)
    def _():
        triton_decode.rms_rows(E(1, L, XN)[..., :R], None, MIX_EPS, round_y=BF, out_dtype=BF)

    @case("prefill B/C norm (L, 16)", decode=False)
    def _():
        triton_decode.rms_rows(E(1, L, XN)[..., R:R + N], None, MIX_EPS, round_y=BF, out_dtype=BF)

    @case("prefill norm_f, last position (fp32)", decode=False)
    def _():
        triton_decode.rms_rows(E(1, 1, H, dtype=F32), E(H), EPS, round_y=F32, out_dtype=F32)

    @case("prefill conv", decode=False)
    def _():
        triton_conv.conv_fwd(E(1, L, 2 * D)[..., :D], E(D, K), E(D), None)

    @case("prefill conv, continued (conv state)", decode=False)
    def _():
        triton_conv.conv_fwd(E(1, L, 2 * D)[..., :D], E(D, K), E(D), E(1, K - 1, D))

    @case("train conv (document resets)", decode=False)
    def _():
        triton_conv.conv_fwd(E(1, 2048, 2 * D)[..., :D], E(D, K), E(D), None,
                             reset_BL=E(1, 2048, dtype=torch.bool))

    @case("prompt batch conv final state (document resets)", decode=False)
    def _():
        triton_conv.final_state(E(16, 32, 2 * D)[..., :D], None, E(16, 32, dtype=torch.bool), K)

    @case("train conv bwd (document resets, final state dropped)", decode=False)
    def _():
        triton_conv_bwd.conv_bwd(E(1, 2048, 2 * D)[..., :D], E(D, K, dtype=F32), E(D, dtype=F32), None,
                                 E(1, 2048, dtype=torch.bool), True, E(1, 2048, D), None)

    @case("train conv bwd, continued (conv state in and out)", decode=False)
    def _():
        triton_conv_bwd.conv_bwd(E(1, 2048, 2 * D)[..., :D], E(D, K, dtype=F32), E(D, dtype=F32),
                                 E(1, K - 1, D), None, True, E(1, 2048, D), E(1, K - 1, D, dtype=F32))

    @case(f"prefill scan L={L} (chunked: local, carry, final)", decode=False)
    def _():
        triton_scan.scan_fwd(**scan_args(L)[0])

    @case(f"prefill scan L={L}, continued (h0)", decode=False)
    def _():
        triton_scan.scan_fwd(**scan_args(L)[0], h0=E(1, D, N, dtype=F32))

    @case("prefill scan L=200 (one pass)", decode=False)
    def _():
        triton_scan.scan_fwd(**scan_args(200)[0])

    @case("train scan fwd L=2048 (saved states, resets)", decode=False)
    def _():
        triton_scan.scan_fwd(**scan_args(2048)[0], reset=E(1, 2048, dtype=torch.bool), save_chk=True)

    @case("train scan fwd L=2048 (saved states)", decode=False)
    def _():
        triton_scan.scan_fwd(**scan_args(2048)[0], save_chk=True)

    for rst in (False, True):
        @case(f"train scan bwd L=2048{' (resets)' if rst else ''}", decode=False)
        def _(rst=rst):
            a = scan_args(2048)[0]
            chk = E(1, 2048 // triton_scan.CHK, D, N, dtype=F32)
            triton_scan.scan_bwd(a["x"], a["dt"], a["A"], a["Bm"], a["Cm"], a["Dv"], a["z"], a["dt_bias"],
                                 E(1, 2048, dtype=torch.bool) if rst else None, chk, E(1, 2048, D), None,
                                 triton_scan.CHK)

    @case("train scan bwd L=2048 (resets; the fused mixer's: y out, dz into d(xz))", decode=False)
    def _():
        a = scan_args(2048)[0]
        chk = E(1, 2048 // triton_scan.CHK, D, N, dtype=F32)
        triton_scan.scan_bwd(a["x"], a["dt"], a["A"], a["Bm"], a["Cm"], a["Dv"], a["z"], a["dt_bias"],
                             E(1, 2048, dtype=torch.bool), chk, E(1, 2048, D), None, triton_scan.CHK,
                             y_out=E(1, 2048, D), dz_out=E(1, 2048, 2 * D)[..., D:])


    @case("train block norm bwd (fp32 rows, the norm alone: the first block)", decode=False)
    def _():
        triton_norm_bwd.rms_norm_backward(E(1, 2048, H, dtype=F32), E(H, dtype=F32), EPS,
                                          E(1, 2048, H, dtype=F32))

    @case("train add + block norm bwd (stream gradient added, the branch's in bf16)", decode=False)
    def _():
        triton_norm_bwd.rms_norm_backward(E(1, 2048, H, dtype=F32), E(H, dtype=F32), EPS, E(1, 2048, H),
                                          residual_grad=E(1, 2048, H, dtype=F32), dx_dtype=BF, y_dtype=F32)

    @case("train dt / B norm bwd into x_proj's gradient slices (weightless)", decode=False)
    def _():
        xdbl, dxdbl = E(1, 2048, XN), E(1, 2048, XN)
        triton_norm_bwd.rms_norm_backward(xdbl[..., :R], None, MIX_EPS, E(1, 2048, R), True, False,
                                          dx_out=dxdbl[..., :R])
        triton_norm_bwd.rms_norm_backward(xdbl[..., R:R + N], None, MIX_EPS, E(1, 2048, N, dtype=F32),
                                          True, False, dx_out=dxdbl[..., R:R + N])

    @case("train loss softmax rows (2048 x V, gradient over the logits)", decode=False)
    def _():
        triton_ce.ce_rows_(E(2048, V), torch.empty(2048, dtype=torch.int64), True)

    for cap in (128, 168, 200):
        @case(f"train scan bwd L=2048 (resets; fused mixer's) maxnreg={cap}", decode=False)
        def _(cap=cap):
            from falcon_mamba.ops import triton_scan_bwd as tsb
            a = scan_args(2048)[0]
            chk = E(1, 2048 // triton_scan.CHK, D, N, dtype=F32)
            saved, tsb.BWD_MAXNREG = tsb.BWD_MAXNREG, cap
            try:
                triton_scan.scan_bwd(a["x"], a["dt"], a["A"], a["Bm"], a["Cm"], a["Dv"], a["z"], a["dt_bias"],
                                     E(1, 2048, dtype=torch.bool), chk, E(1, 2048, D), None, triton_scan.CHK,
                                     y_out=E(1, 2048, D), dz_out=E(1, 2048, 2 * D)[..., D:])
            finally:
                tsb.BWD_MAXNREG = saved


# ---- decode at batch B (fast_step without the GEMV modes, model.step) -------------------------

def _batched_decode_cases(B: int = 64) -> None:
    from falcon_mamba.ops import triton_decode, triton_sample
    from falcon_mamba.ops.sample import SamplerRows

    @case(f"decode B={B} embeddings gather + first norm")
    def _():
        triton_decode.rms_rows(E(V, H), E(H), EPS, x_out=E(B, H, dtype=F32), round_in=BF, round_y=BF,
                               out_dtype=BF, rows=E(B, dtype=torch.int64))

    @case(f"decode B={B} add+norm")
    def _():
        h = E(B, H, dtype=F32)
        triton_decode.rms_rows(h, E(H), EPS, residual=E(B, H), x_out=h, round_in=BF, round_y=BF, out_dtype=BF)

    @case(f"decode B={B} conv step")
    def _():
        m = _Mixer(B)
        triton_decode.conv_step(m.conv, m.xz[:, :D], m.cw, m.cb)

    @case(f"decode B={B} ssm step (dt_proj by GEMM; dt_r norm + plain step)")
    def _():
        _Mixer(B).ssm_step(dt_weight("dense"))

    @case(f"decode B={B} split x_proj (split_x modes): partials, then their sum with dt_r's norm")
    def _():
        from falcon_mamba.ops import triton_xproj

        triton_xproj.xproj_rows(E(B, D), E(XN, D), R, MIX_EPS)

    for bd, w in ((512, 8), (128, 4)):
        @case(f"decode B={B} ssm step, {bd} channels, {w} warps")
        def _(bd=bd, w=w):
            _Mixer(B).ssm_step(dt_weight("dense"), block_d=bd, num_warps=w)

    @case("decode B=4 ssm step, dense dt_proj fused")
    def _():
        _Mixer(4).ssm_step(dt_weight("dense"))

    @case(f"decode B={B} add+norm_f")
    def _():
        triton_decode.rms_rows(E(B, H, dtype=F32), E(H), EPS, residual=E(B, H), out_dtype=BF)

    def sample(Bs, seen=False, **kw):
        rows = SamplerRows(temperature=E(Bs, dtype=F32), top_k=E(Bs, dtype=torch.int32),
                           top_p=E(Bs, dtype=F32), min_p=E(Bs, dtype=F32), penalty=E(Bs, dtype=F32),
                           seed=E(Bs, dtype=torch.int64), pos=E(Bs, dtype=torch.int64),
                           seen=E(Bs, V, dtype=torch.uint8) if seen else None)
        triton_sample.sample_rows_triton(E(Bs, V, dtype=F32), rows, E(Bs, dtype=torch.int64),
                                         E(Bs, dtype=F32), E(Bs, dtype=torch.int32), **kw)

    @case("decode B=1 sampler (one program per row, 16 warps)")
    def _():
        sample(1)

    @case(f"decode B={B} sampler with repetition penalties (seen table)")
    def _():
        sample(B, seen=True)

    @case("decode B=256 sampler (more rows than SMs: two programs per SM)")
    def _():
        sample(256, block=triton_sample.BLOCK_WIDE_BATCH, num_warps=triton_sample.NUM_WARPS_WIDE_BATCH)


# ---- batch-1 GEMV modes (decode_step.fast_step gemv / fused / conv_fold / xproj_merge, chain) ---

def _batch1_cases() -> None:
    from falcon_mamba.decode.step import XP_SSM_BLOCK_D
    from falcon_mamba.ops import triton_decode
    from falcon_mamba.ops.triton_gemv import fused_gemv, packed_int4

    cuda = torch.device("cuda")
    for fmt in FORMATS:
        w_in, w_x = weight(fmt, 2 * D, H), weight(fmt, XN, D)
        w_out, w_lm = weight(fmt, H, D), weight(fmt, V, H)
        # where a GEMV is the packed int4 kernel, its input's producer also writes the pair layout
        packed, packed_out = packed_int4(w_in, cuda), packed_int4(w_out, cuda)
        pairs = (lambda n: E(n)) if packed else (lambda n: None)
        pairs_out = (lambda n: E(n)) if packed_out else (lambda n: None)

        @case(f"b1 {fmt} gemv: embeddings gather + first norm{' (+pairs)' if packed else ''}")
        def _(pairs=pairs):
            triton_decode.rms_rows(E(V, H), E(H), EPS, x_out=E(1, H, dtype=F32), round_in=BF, round_y=BF,
                                   out_dtype=BF, rows=E(1, dtype=torch.int64), pairs_out=pairs(H))

        @case(f"b1 {fmt} gemv: add+norm{' (+pairs)' if packed else ''}")
        def _(pairs=pairs):
            h = E(1, H, dtype=F32)
            triton_decode.rms_rows(h, E(H), EPS, residual=E(1, H), x_out=h, round_in=BF, round_y=BF,
                                   out_dtype=BF, pairs_out=pairs(H))

        if packed:
            @case(f"b1 {fmt} gemv: in_proj + conv epilogue (packed int4, pairs in)")
            def _(w_in=w_in):
                m = _Mixer(1)
                fused_gemv(w_in, E(H), x_pairs=E(H), conv=(m.conv[0], m.cw, m.cb))

            @case(f"b1 {fmt} gemv xproj_merge: in_proj + conv + x_proj programs (packed int4)")
            def _(w_in=w_in, w_x=w_x):
                m = _Mixer(1)
                fused_gemv(w_in, E(H), x_pairs=E(H), conv=(m.conv[0], m.cw, m.cb), xproj=w_x)

            @case(f"b1 {fmt} gemv xproj_merge: ssm step (block_d {XP_SSM_BLOCK_D}, +pairs)")
            def _(fmt=fmt):
                _Mixer(1).ssm_step(dt_weight(fmt), pairs_out=E(D), block_d=XP_SSM_BLOCK_D)
        else:
            @case(f"b1 {fmt} gemv: in_proj")
            def _(w_in=w_in):
                fused_gemv(w_in, E(H))

            @case(f"b1 {fmt} gemv: conv step")
            def _():
                m = _Mixer(1)
                triton_decode.conv_step(m.conv, m.xz[:, :D], m.cw, m.cb)

        @case(f"b1 {fmt} gemv: x_proj (split-K)")
        def _(w_x=w_x):
            fused_gemv(w_x, E(D))

        @case(f"b1 {fmt} gemv: ssm step, {fmt} dt_proj fused{' (+pairs)' if packed_out else ''}")
        def _(fmt=fmt, pairs_out=pairs_out):
            _Mixer(1).ssm_step(dt_weight(fmt), pairs_out=pairs_out(D))

        @case(f"b1 {fmt} gemv: out_proj{' (packed int4, pairs in)' if packed_out else ''}")
        def _(w_out=w_out, pairs_out=pairs_out):
            fused_gemv(w_out, E(D), x_pairs=pairs_out(D))

        if packed_int4(w_lm, cuda):
            @case(f"b1 {fmt} gemv: add+norm_f (+pairs)")
            def _():
                triton_decode.rms_rows(E(1, H, dtype=F32), E(H), EPS, residual=E(1, H), out_dtype=BF,
                                       pairs_out=E(H))

            @case(f"b1 {fmt} gemv: lm_head (packed int4, pairs in)")
            def _(w_lm=w_lm):
                fused_gemv(w_lm, E(H), out_dtype=F32, round_to=BF, x_pairs=E(H))
        else:
            @case(f"b1 {fmt} gemv: lm_head with add+norm_f prologue")
            def _(w_lm=w_lm):
                fused_gemv(w_lm, E(H, dtype=F32), residual=E(H), norm_weight=E(H), eps=EPS, out_dtype=F32,
                           round_to=BF)

        # fused mode (decode_step._fused_step)
        @case(f"b1 {fmt} fused: add+norm prologue + in_proj + conv epilogue")
        def _(w_in=w_in):
            m = _Mixer(1)
            fused_gemv(w_in, E(H, dtype=F32), residual=E(H), norm_weight=E(H), eps=EPS, h_out=E(H, dtype=F32),
                       round_in=BF, round_y=BF, out_dtype=BF, conv=(m.conv[0], m.cw, m.cb))

        @case(f"b1 {fmt} fused: ssm step")
        def _(fmt=fmt):
            _Mixer(1).ssm_step(dt_weight(fmt))

        @case(f"b1 {fmt} fused: out_proj (no pairs)")
        def _(w_out=w_out):
            fused_gemv(w_out, E(D))

        @case(f"b1 {fmt} fused: lm_head with add+norm_f prologue")
        def _(w_lm=w_lm):
            fused_gemv(w_lm, E(H, dtype=F32), residual=E(H), norm_weight=E(H), eps=EPS, out_dtype=F32,
                       round_to=BF)

        # conv folded into x_proj and the SSM step (decode_step._conv_folded: gemv_cx and chain)
        @case(f"b1 {fmt} conv_fold: x_proj with the conv step as input")
        def _(w_x=w_x):
            m = _Mixer(1)
            fused_gemv(w_x, m.xz[0, :D], conv_in=(m.conv[0], m.cw, m.cb))

        @case(f"b1 {fmt} conv_fold: ssm step with the conv step{' (+pairs)' if packed_out else ''}")
        def _(fmt=fmt, pairs_out=pairs_out):
            m = _Mixer(1)
            m.ssm_step(dt_weight(fmt), x=m.xz[:, :D], conv=(m.conv, m.cw, m.cb), pairs_out=pairs_out(D))

        # chain mode (decode_chain.chain_step)
        @case(f"b1 {fmt} chain: in_proj of layer 0 (plain)")
        def _(w_in=w_in):
            fused_gemv(w_in, E(H), out_dtype=BF)

        @case(f"b1 {fmt} chain: in_proj with the norm from a given 1/rms")
        def _(w_in=w_in):
            fused_gemv(w_in, E(H, dtype=F32), norm_weight=E(H), eps=EPS, rstd=E(1, dtype=F32), round_in=BF,
                       round_y=BF, out_dtype=BF)

        @case(f"b1 {fmt} chain: out_proj + residual add + next norm's 1/rms")
        def _(w_out=w_out):
            fused_gemv(w_out, E(D), norm_out=(E(H, dtype=F32), E(H, dtype=F32), EPS, BF))

        @case(f"b1 {fmt} chain: lm_head with norm_f from a given 1/rms")
        def _(w_lm=w_lm):
            fused_gemv(w_lm, E(H, dtype=F32), norm_weight=E(H), eps=EPS, rstd=E(1, dtype=F32), out_dtype=F32,
                       round_to=BF)

    @case("b1 dense x_proj, split-K summed by a second kernel (GemvConfig reduce='kernel', sweeps)")
    def _():
        from falcon_mamba.ops.triton_gemv import default_config

        w = weight("dense", XN, D)
        fused_gemv(w, E(D), config=replace(default_config(w, cuda), reduce="kernel"))

    @case("b1 triton_decode.gemv (dense bf16, benchmarks' baseline)")
    def _():
        triton_decode.gemv(E(1, H), E(2 * D, H))


# ---- quantized linears outside the GEMV modes (QuantLinear -> quant/triton_qmm.py) -------------

def _qmm_cases() -> None:
    from falcon_mamba.quant import triton_qmm as q

    for fmt, bits in (("int8", 8), ("int4g128", 4)):
        w = weight(fmt, 2 * D, H)
        group = GROUP if bits == 4 else None
        args = lambda M, w=w, bits=bits, group=group: (E(M, H), w.w, w.scales, w.zeros, bits, group, H)  # noqa: E731
        # the default (used in CUDA-graph capture) and every candidate the first-call tuner times
        cpu = torch.device("cpu")  # 132 SMs assumed there too, as on the H200
        default = q._gemv_default(2 * D, H, bits, group, cpu)
        for cfg in dict.fromkeys([default] + q._gemv_candidates(2 * D, H, bits, group, cpu)):
            bn, bk, warps, split = cfg

            @case(f"qmm {fmt} M=1 in_proj gemv bn{bn} bk{bk} w{warps} split{split}"
                  f"{' (default)' if cfg == default else ''}")
            def _(cfg=cfg, args=args):
                q._gemv_launch(*args(1), cfg)
        default = q._dot_default(64, bits, group)
        for cfg in dict.fromkeys([default] + q._dot_candidates(64, bits, group)):
            bm, bn, bk, warps = cfg

            @case(f"qmm {fmt} M=64 in_proj dot bm{bm} bn{bn} bk{bk} w{warps}"
                  f"{' (default)' if cfg == default else ''}")
            def _(cfg=cfg, args=args):
                q._dot_launch(*args(64), cfg)


# ---- recording ---------------------------------------------------------------------------------

@contextlib.contextmanager
def _gpu_choices():
    """Launchers choose as on the H200: CUDA config tables (132 SMs), PDL supported."""
    from falcon_mamba.ops import pdl, triton_gemv

    real_cfg, real_sms, real_sup = triton_gemv.default_config, triton_gemv._num_sms, pdl.supported
    cuda = torch.device("cuda")
    triton_gemv.default_config = lambda w, dev, prologue=False, conv_in=False: real_cfg(w, cuda, prologue,
                                                                                       conv_in)
    triton_gemv._num_sms = lambda dev: H200_SMS
    pdl.supported = lambda dev: True
    try:
        yield
    finally:
        triton_gemv.default_config, triton_gemv._num_sms, pdl.supported = real_cfg, real_sms, real_sup


def recorded_launches(only: str | None = None) -> list[Launch]:
    """Run every case (name containing ``only``) with launches recorded: the kernels' list."""
    assert not os.environ.get("TRITON_INTERPRET"), "record with compiled kernels (TRITON_INTERPRET unset)"
    from triton.runtime.jit import JITFunction

    from falcon_mamba.ops import pdl

    if not CASES:
        _prefill_cases()
        _batched_decode_cases()
        _batch1_cases()
        _qmm_cases()
    out: list[Launch] = []
    current = [""]

    def record(self, *args, grid, warmup, **kwargs):
        out.append(Launch(current[0], self, args, kwargs, grid))

    real_run = JITFunction.run
    JITFunction.run = record
    try:
        with _gpu_choices(), torch.no_grad():
            for name, decode, thunk in CASES:
                if only and only not in name:
                    continue
                current[0] = name
                with pdl.enabled(decode):
                    thunk()
    finally:
        JITFunction.run = real_run
    return out
