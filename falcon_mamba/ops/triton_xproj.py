"""x_proj of a many-row decode step as split-K partial products, and the kernel that sums them and
norms dt's rank-R input.

Legend: M rows, D inner width (x_proj's K), E = R + 2N x_proj outputs [dt_r, B, C], R dt rank, N
state size, S splits of D.

Why: x_proj is a skinny product (E = 288 outputs of D = 8192 for the 7B) that cuBLAS runs as one
split-K kernel plus a split-K reduce kernel, and the step then norms dt_r in a third launch. In
the 64-row decode step on the H200 those three took 6.7 + 2.4 + 1.8 us a layer for 4.7 MB of
weight (1.1 us at the copy rate; results/h200-profile-decode-b64-b256-e1fa430.txt): the split-K
kernel walks a long K loop per program, so it is bound by load latency, not bytes. Here:
- ``_xproj_part_kernel``: program (n tile, split s, m tile) multiplies x[m, s-th D slice] by that
  slice of W's n rows, one tl.dot per BK-wide piece, and stores its fp32 partial P[s, m, n]. The
  slice is short (XPROJ_BLOCK_K), so there are enough programs to pull the weight at the copy rate,
  and the first piece of the weight is loaded before the PDL wait (no kernel of the step writes W).
- ``_xproj_finish_kernel``: a program per row sums its S partials in a fixed order
  (deterministic: a row's result never depends on timing or on the other rows), rounds to the
  model dtype as cuBLAS's output would be, and for dt_r's R columns applies the weightless
  RMSNorm (rounded as triton_decode.rms_rows rounds it). B and C are left raw: the SSM kernel
  norms them.
The result equals F.linear(x, W) then rms_rows on the first R columns, to the summation order.
Measured in the server (H200, 7B): the bucket timing keeps it at 8-120 rows; the 64-row step's GPU
time 6.92 -> 6.61 ms against cuBLAS's x_proj in the same call (results/h200-serve-0caa448.json).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falcon_mamba.ops import pdl
from falcon_mamba.ops.pdl import dep_sync
from falcon_mamba.ops.triton_decode import _ROUND, _round
from falcon_mamba.ops.triton_helpers import LAUNCH_OPTIONS

# D per program (S = D / XPROJ_BLOCK_K splits) and its pieces per tl.dot; output columns per
# program; warps. Timed inside the 16-layer decode step on the H200 (benchmarks/
# sweep_step_kernels.py --kernel xproj, results/h200-sweep-xproj-b3a1f2f.txt): 256 x one piece
# was the fastest of seven at 64 rows (both kernels 10.8 us a layer by their profiled durations,
# which under PDL include the wait for the conv step) and second at 256 rows (17.9 against 15.6
# for 64 columns a program, a row count where the bucket autotune keeps cuBLAS's x_proj anyway).
XPROJ_BLOCK_K = 256
XPROJ_PIECE_K = 256
XPROJ_BLOCK_N = 32
XPROJ_WARPS = 4
XPROJ_MAX_BLOCK_M = 64  # rows per program (at least 16: tl.dot's smallest M)


@triton.jit
def _xproj_part_kernel(x_ptr, w_ptr, p_ptr, M, E, K, sx_m, sw_e,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PIECES: tl.constexpr,
                       F32_DOT: tl.constexpr, PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    s = tl.program_id(1)
    pid_m = tl.program_id(2)
    n = pid_n * BN + tl.arange(0, BN)
    m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    kk = tl.arange(0, BK)
    mn = n < E
    mm = m < M
    k0 = s * (BK * PIECES)
    w_rows = w_ptr + n[None, :].to(tl.int64) * sw_e  # (1, BN): W is (E, K) row-major
    x_rows = x_ptr + m[:, None] * sx_m  # (BM, 1)
    mk = (k0 + kk) < K
    w = tl.load(w_rows + (k0 + kk)[:, None], mask=mn[None, :] & mk[:, None], other=0.0)  # (BK, BN)
    dep_sync(PDL)  # x comes from the conv step
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for i in tl.static_range(PIECES):
        k = k0 + i * BK + kk
        mk = k < K
        xv = tl.load(x_rows + k[None, :], mask=mm[:, None] & mk[None, :], other=0.0)  # (BM, BK)
        if F32_DOT:  # fp32 inputs, or the interpreter (Triton 3.9's returns garbage for a bf16 dot)
            acc = tl.dot(xv.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xv, w, acc)
        if i + 1 < PIECES:
            kn = k + BK
            w = tl.load(w_rows + kn[:, None], mask=mn[None, :] & (kn < K)[:, None], other=0.0)
    tl.store(p_ptr + (s * M + m[:, None]) * E + n[None, :], acc, mask=mm[:, None] & mn[None, :])


@triton.jit
def _xproj_finish_kernel(p_ptr, y_ptr, M, E, R, S, eps, sy_m,
                         SP: tl.constexpr, BE: tl.constexpr, NORM: tl.constexpr, RMODE: tl.constexpr,
                         PDL: tl.constexpr):
    # One program per row: its S partials as one (SP, BE) tile (independent loads, not a chain of
    # S dependent ones), summed by tl.sum's fixed tree (the same bits whatever runs beside it).
    dep_sync(PDL)
    r = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, SP)
    cols = tl.arange(0, BE)
    mc = cols < E
    part = tl.load(p_ptr + (sp[:, None] * M + r) * E + cols[None, :], mask=(sp < S)[:, None] & mc[None, :],
                   other=0.0)
    v = _round(tl.sum(part, axis=0), RMODE)  # the product as a matmul's output in the model dtype
    if NORM:  # dt_r's weightless RMSNorm over its R columns
        is_dt = cols < R
        rstd = tl.rsqrt(tl.sum(tl.where(is_dt, v * v, 0.0), axis=0) / R + eps)
        v = tl.where(is_dt, _round(v * rstd, RMODE), v)
    tl.store(y_ptr + r * sy_m + cols, v.to(y_ptr.dtype.element_ty), mask=mc)


def supported(weight: torch.Tensor) -> bool:
    """A weight this path takes: a 2-D floating (E, K) tensor, rows contiguous."""
    return weight.dim() == 2 and weight.is_floating_point() and weight.stride(1) == 1


def xproj_rows(x_MK: torch.Tensor, w_EK: torch.Tensor, rank: int, norm_eps: float | None) -> torch.Tensor:
    """x (M, K) @ w (E, K)^T -> (M, E) in x's dtype; with norm_eps, columns [0, rank) (dt's
    rank-R input) through the weightless RMSNorm (rounded to x's dtype); the rest raw."""
    M, K = x_MK.shape
    E = w_EK.shape[0]
    assert w_EK.shape[1] == K and supported(w_EK) and x_MK.stride(1) == 1 and 0 < rank <= E
    y = torch.empty(M, E, dtype=x_MK.dtype, device=x_MK.device)
    if M == 0:
        return y
    BK = min(XPROJ_PIECE_K, triton.next_power_of_2(K))
    pieces = max(1, min(XPROJ_BLOCK_K, K) // BK)
    S = triton.cdiv(K, BK * pieces)
    BM = min(XPROJ_MAX_BLOCK_M, max(16, triton.next_power_of_2(M)))
    BN = XPROJ_BLOCK_N
    part = torch.empty(S, M, E, dtype=torch.float32, device=x_MK.device)
    _xproj_part_kernel[(triton.cdiv(E, BN), S, triton.cdiv(M, BM))](
        x_MK, w_EK, part, M, E, K, x_MK.stride(0), w_EK.stride(0),
        BM=BM, BN=BN, BK=BK, PIECES=pieces, F32_DOT=x_MK.dtype == torch.float32 or pdl._interpreting(),
        num_warps=XPROJ_WARPS,
        **pdl.launch_kwargs(x_MK.device), **LAUNCH_OPTIONS)
    SP, BE = triton.next_power_of_2(S), triton.next_power_of_2(E)
    _xproj_finish_kernel[(M,)](
        part, y, M, E, rank, S, float(norm_eps or 0.0), y.stride(0),
        SP=SP, BE=BE, NORM=norm_eps is not None, RMODE=_ROUND.get(y.dtype, 0),
        num_warps=8 if SP * BE >= 8192 else 4, **pdl.launch_kwargs(x_MK.device), **LAUNCH_OPTIONS)
    return y
