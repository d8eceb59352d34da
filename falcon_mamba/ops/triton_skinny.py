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
# weight-read floor).
DECODE_CONFIGS = {"out_proj": SkinnyConfig(32, 256, 1), "x_proj": SkinnyConfig(32, 128, 4),
                  "lm_head": SkinnyConfig(128, 128, 1)}
MAX_ROWS = 64


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, y_ptr, M, N, K, KS, sxm, swn, sym, syn, sys,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
                   UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # Program (n block, k slice): y[s, :, n block] = x[:, slice] @ W[n block, slice]^T, fp32
    # accumulation; KS: the slice length (a multiple of BK, the last slice may be shorter).
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
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


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
        x, w, part, M, N, K, KS, x.stride(0), w.stride(0), N, 1, M * N,
        BM=BM, BN=cfg.bn, BK=cfg.bk, STAGES=cfg.stages, UPCAST=x.device.type != "cuda",
        IEEE=x.dtype == torch.float32, num_warps=cfg.warps,
        **LAUNCH_OPTIONS)
    if S > 1:
        BLOCK = 1024
        _sum_slices_kernel[(triton.cdiv(M * N, BLOCK),)](part, y, M * N, S=S, BLOCK=BLOCK, num_warps=4,
                                                         **LAUNCH_OPTIONS)
    return y
