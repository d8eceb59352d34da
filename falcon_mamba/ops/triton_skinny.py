"""A skinny matmul for the batched decode step: y (M, N) = x (M, K) @ W (N, K)^T, M <= 64 rows.

Legend: M rows (the decode bucket), N output features, K input width, BN output columns per
program, BK inner block, S split-K slices.

At 16-64 rows a decode projection is a weight read: 64 rows of out_proj (K 8192, N 4096) are 4.3
GFLOP against 64 MB of bf16 weight, 16 us at the copy rate and 5 us at the matmul rate. cuBLAS's
heuristic splits K for it and reduces in a second kernel (25.5 + 2.4 us a layer at 64 rows on the
H200, 58% of the copy rate: results/h200-profile-decode-b64-b256-2449ead.txt). Here every program
holds all M rows (one BM = next_pow2(M) tile, at least 16 for the tensor cores) and streams one
(BN, K / S) slab of the weight once, so the weight is read once in all; with S > 1 each slice
writes an fp32 partial (S, M, N) and a second kernel sums the slices in order (deterministic, as a
row's result must not depend on the timing of other programs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from falcon_mamba.ops.triton_helpers import LAUNCH_OPTIONS


@dataclass(frozen=True)
class SkinnyConfig:
    """One launch shape: BN output columns per program, BK inner block, at most ``splits`` split-K
    slices (K is cut into slices of whole BK blocks: fewer run where K is short, e.g. 2 for K 200
    at BK 64 and splits 3), warps and software-pipeline stages."""

    bn: int = 64
    bk: int = 128
    splits: int = 1
    warps: int = 4
    stages: int = 4

    @property
    def name(self) -> str:
        return f"bn{self.bn}-bk{self.bk}-s{self.splits}-w{self.warps}-st{self.stages}"


# The decode step's projections that take this kernel (fast_step's skinny option) and their launch
# shapes: the fastest of 18 at the 7B shapes on the H200 (benchmarks/bench_skinny.py,
# results/h200-skinny-be6f849.txt): out_proj 20.8 against cuBLAS's 24.4 us at 64 rows (19.6 / 22.1
# at 16), lm_head 129.9 against 141.2 (122.7 / 129.3), x_proj 6.9 against 8.1 at 64 rows but 7.0
# against 6.8 at 16 (a tie). in_proj stays on cuBLAS (35.3 against 35.1: a tie at 92% of the
# weight-read floor) unless it takes the conv step (IN_PROJ_CONV below).
DECODE_CONFIGS = {"out_proj": SkinnyConfig(32, 256, 1), "x_proj": SkinnyConfig(32, 128, 4),
                  "lm_head": SkinnyConfig(128, 128, 1)}
# in_proj with the conv step as its epilogue (skinny_in_proj_conv): the matmul alone ties with
# cuBLAS; fused, it saves the conv-step launch (4.7 us a layer at 64 rows,
# results/h200-profile-decode-b64-b256-2449ead.txt). Not measured yet.
IN_PROJ_CONV = SkinnyConfig(128, 128, 1)
MAX_ROWS = 64


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, y_ptr, M, N, K, KS, sxm, swn, sym, syn, sys,
                   cs_ptr, cw_ptr, cb_ptr, xc_ptr, D, scs_b, scs_k, sxc,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
                   UPCAST: tl.constexpr, IEEE: tl.constexpr, CONV: tl.constexpr, CK: tl.constexpr,
                   HAS_CB: tl.constexpr):
    # Program (n block, k slice): y[s, :, n block] = x[:, slice] @ W[n block, slice]^T, fp32
    # accumulation; KS: the slice length (a multiple of BK, the last slice may be shorter).
    # CONV (one slice; D a multiple of BN): columns n < D are in_proj's x half, and their values,
    # rounded to y's dtype as stored, go through the conv step (triton_decode._conv_step_kernel's
    # math and order): the conv state cs (M, CK-1, D) shifts in place, xc (M, D) gets the output.
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    m = tl.arange(0, BM)
    n = pid_n * BN + tl.arange(0, BN)
    kk = tl.arange(0, BK)
    mm = m < M
    mn = n < N
    k_beg = pid_s * KS
    k_end = tl.minimum(k_beg + KS, K)
    x_p = x_ptr + m[:, None] * sxm + kk[None, :]
    w_p = w_ptr + n.to(tl.int64)[:, None] * swn + kk[None, :]
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in tl.range(k_beg, k_end, BK, num_stages=STAGES):
        mk = (k0 + kk) < k_end
        a = tl.load(x_p + k0, mask=mm[:, None] & mk[None, :], other=0.0)
        b = tl.load(w_p + k0, mask=mn[:, None] & mk[None, :], other=0.0)
        if UPCAST:  # the interpreter (CPU tests): its bf16 dot returns garbage (Triton 3.9)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:  # fp32 inputs: full fp32 products, as cuBLAS's default (no TF32 rounding)
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    out = y_ptr + pid_s * sys + m[:, None] * sym + n[None, :] * syn
    m2 = mm[:, None] & mn[None, :]
    yv = acc.to(y_ptr.dtype.element_ty)
    tl.store(out, yv, mask=m2)
    if CONV:
        if pid_n * BN < D:  # an x-half block (BN divides D: no block straddles the halves)
            s0 = cs_ptr + m[:, None].to(tl.int64) * scs_b + n[None, :]
            cacc = tl.load(cw_ptr + n * CK + (CK - 1), mask=mn, other=0.0).to(tl.float32)[None, :] \
                * yv.to(tl.float32)
            for k in tl.static_range(CK - 1):
                sk = tl.load(s0 + k * scs_k, mask=m2, other=0.0)
                wk = tl.load(cw_ptr + n * CK + k, mask=mn, other=0.0).to(tl.float32)
                cacc += wk[None, :] * sk.to(tl.float32)
                if k > 0:
                    tl.store(s0 + (k - 1) * scs_k, sk, mask=m2)  # shift left by one
            tl.store(s0 + (CK - 2) * scs_k, yv.to(cs_ptr.dtype.element_ty), mask=m2)
            if HAS_CB:
                cacc += tl.load(cb_ptr + n, mask=mn, other=0.0).to(tl.float32)[None, :]
            cacc = cacc * tl.sigmoid(cacc)
            tl.store(xc_ptr + m[:, None] * sxc + n[None, :], cacc.to(xc_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _sum_slices_kernel(p_ptr, y_ptr, MN, S: tl.constexpr, BLOCK: tl.constexpr):
    # y (MN,) = sum over s of p (S, MN), in slice order
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < MN
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in tl.static_range(S):
        acc += tl.load(p_ptr + s * MN + i, mask=ok, other=0.0)
    tl.store(y_ptr + i, acc.to(y_ptr.dtype.element_ty), mask=ok)


def skinny_linear(x: torch.Tensor, w: torch.Tensor, cfg: SkinnyConfig = SkinnyConfig(),
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T -> (M, N) in x's dtype (fp32 accumulation); M <= 64, last dims
    contiguous. out: an (M, N) contiguous result buffer of x's dtype (allocated when None)."""
    M, K = x.shape
    N = w.shape[0]
    assert w.shape[1] == K and x.stride(1) == 1 and w.stride(1) == 1, "x (M, K), w (N, K), K contiguous"
    assert M <= MAX_ROWS, "skinny_linear takes at most 64 rows"
    BM = max(16, triton.next_power_of_2(M))
    if out is not None:
        assert out.shape == (M, N) and out.is_contiguous() and out.dtype == x.dtype, \
            "out must be (M, N) contiguous, of x's dtype"
    y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    S = max(1, cfg.splits)
    KS = triton.cdiv(triton.cdiv(K, S), cfg.bk) * cfg.bk
    S = triton.cdiv(K, KS)
    part = y if S == 1 else torch.empty(S, M, N, dtype=torch.float32, device=x.device)
    _skinny_kernel[(triton.cdiv(N, cfg.bn), S)](
        x, w, part, M, N, K, KS, x.stride(0), w.stride(0), N, 1, M * N, x, x, x, x, 0, 0, 0, 0,
        BM=BM, BN=cfg.bn, BK=cfg.bk, STAGES=cfg.stages, UPCAST=x.device.type != "cuda",
        IEEE=x.dtype == torch.float32, CONV=False, CK=2, HAS_CB=False, num_warps=cfg.warps,
        **LAUNCH_OPTIONS)
    if S > 1:
        BLOCK = 1024
        _sum_slices_kernel[(triton.cdiv(M * N, BLOCK),)](part, y, M * N, S=S, BLOCK=BLOCK, num_warps=4,
                                                         **LAUNCH_OPTIONS)
    return y


def conv_fits(D: int, cfg: SkinnyConfig) -> bool:
    """skinny_in_proj_conv can run with this config: one slice, no block across the two halves."""
    return cfg.splits <= 1 and D % cfg.bn == 0


def skinny_in_proj_conv(x: torch.Tensor, w: torch.Tensor, conv_state: torch.Tensor, conv_w: torch.Tensor,
                        conv_b: torch.Tensor | None, cfg: SkinnyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """in_proj with the conv step as its epilogue: x (M, H) @ w (2D, H)^T -> xz (M, 2D) in x's dtype,
    and for its x half the conv step (triton_decode.conv_step's math) -> xc (M, D); conv_state
    (M, CK-1, D), last dim contiguous, is shifted in place. conv_w (D, CK), conv_b (D,) or None.
    Needs conv_fits(D, cfg) and M <= MAX_ROWS."""
    M, H = x.shape
    N = w.shape[0]
    D, CK = conv_w.shape
    assert N == 2 * D and conv_fits(D, cfg) and M <= MAX_ROWS
    assert x.stride(1) == 1 and w.stride(1) == 1 and conv_state.stride(2) == 1
    assert conv_w.stride() == (CK, 1), "conv_w must be (D, CK) contiguous"
    assert conv_state.shape == (M, CK - 1, D), "conv_state must be (M, CK-1, D)"
    xz = torch.empty(M, N, dtype=x.dtype, device=x.device)
    xc = torch.empty(M, D, dtype=x.dtype, device=x.device)
    _skinny_kernel[(triton.cdiv(N, cfg.bn), 1)](
        x, w, xz, M, N, H, triton.cdiv(H, cfg.bk) * cfg.bk, x.stride(0), w.stride(0), N, 1, M * N,
        conv_state, conv_w, conv_b if conv_b is not None else conv_w, xc, D,
        conv_state.stride(0), conv_state.stride(1), D,
        BM=max(16, triton.next_power_of_2(M)), BN=cfg.bn, BK=cfg.bk, STAGES=cfg.stages,
        UPCAST=x.device.type != "cuda", IEEE=x.dtype == torch.float32, CONV=True, CK=CK,
        HAS_CB=conv_b is not None, num_warps=cfg.warps, **LAUNCH_OPTIONS)
    return xz, xc
