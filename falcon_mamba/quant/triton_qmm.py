"""Triton kernels for y = x @ W^T with W stored quantized (formats.py): nothing dense is materialised.

Two kernels, picked by the number of rows M of x:
- ``_qgemv``: M == 1 (batch-1 decode, the case that is bound by reading the weights). Each program
  owns BLOCK_N output features and one slice of K (split-K when N alone gives too few programs, e.g.
  x_proj's 288 rows); it streams the int8/int4 bytes once and multiplies in fp32 registers. The int4
  group scale is applied after the per-group dot product, so a weight costs an unpack, a convert and
  an FMA, never a dequantisation to memory.
- ``_qmm_dot``: 2 <= M <= DOT_MAX_M (batched decode, short prompts): tiles of BLOCK_M rows, the weight
  tile dequantised in registers and fed to tl.dot.
Larger M (prefill) goes to dequantise + cuBLAS in qlinear.py: there the matmul is compute bound and
one dequantisation per call is noise.

Launch parameters are chosen per shape by a small timing search on the first call outside CUDA
graph capture (``_tune``); during capture, or after ``configure(tune=False)``, a fixed heuristic is
used. The choices are kept on disk per GPU and shape (decode/tuning.py) once ``configure(cache_dir=)``
names the folder (the decoder does, from its DecodeOptions), so a restarted process does not time
them again.
Index arithmetic on weight rows is 64-bit (lm_head: 65024 x 4096 bytes is past 2^31 nibbles).

Legend: M rows of x, N out features, K in features, Kp padded K, G group size.
"""

from __future__ import annotations

from pathlib import Path

import torch
import triton
import triton.language as tl

from falcon_mamba.ops.triton_helpers import LAUNCH_OPTIONS

DOT_MAX_M = 64


@triton.jit
def _qgemv(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
           N, K, KP, K_PER_SPLIT, stride_wn, stride_sn, stride_os,
           BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    row = offs_n.to(tl.int64) * stride_wn
    k_start = pid_s * K_PER_SPLIT
    if BITS == 8:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for kk in range(0, K_PER_SPLIT, BLOCK_K):
            k0 = k_start + kk
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + row[:, None] + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                        other=0)
            acc2 += w.to(tl.float32) * x[None, :]
        acc = tl.sum(acc2, axis=1)
        acc = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
    else:
        HALF: tl.constexpr = BLOCK_K // 2
        NG: tl.constexpr = BLOCK_K // GROUP
        acc_g = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
        for kk in range(0, K_PER_SPLIT, BLOCK_K):
            k0 = k_start + kk
            offs_b = k0 // 2 + tl.arange(0, HALF)  # byte b holds k = 2b (low) and 2b+1 (high)
            p = tl.load(w_ptr + row[:, None] + offs_b[None, :],
                        mask=n_mask[:, None] & (offs_b < KP // 2)[None, :], other=0)
            ke = 2 * offs_b
            xe = tl.load(x_ptr + ke, mask=ke < K, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + ke + 1, mask=ke + 1 < K, other=0.0).to(tl.float32)
            prod = (p & 0xF).to(tl.float32) * xe[None, :] + (p >> 4).to(tl.float32) * xo[None, :]
            dot = tl.sum(tl.reshape(prod, (BLOCK_N, NG, GROUP // 2)), axis=2)  # (BLOCK_N, NG)
            xsum = tl.sum(tl.reshape(xe + xo, (NG, GROUP // 2)), axis=1)  # (NG,)
            offs_g = k0 // GROUP + tl.arange(0, NG)
            g_mask = n_mask[:, None] & (offs_g < KP // GROUP)[None, :]
            sg = offs_n.to(tl.int64)[:, None] * stride_sn + offs_g[None, :]
            s = tl.load(s_ptr + sg, mask=g_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + sg, mask=g_mask, other=0).to(tl.float32)
            acc_g += s * (dot - z * xsum[None, :])
        acc = tl.sum(acc_g, axis=1)
    tl.store(out_ptr + pid_s * stride_os + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _qmm_dot(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
             M, N, K, KP, stride_xm, stride_wn, stride_sn, stride_om,
             BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    row = offs_n.to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if BITS == 8:
            w = tl.load(w_ptr + row[:, None] + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                        other=0).to(x.dtype)  # |code| <= 127 is exact in bf16/fp16
        else:
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            p = tl.load(w_ptr + row[:, None] + offs_b[None, :],
                        mask=n_mask[:, None] & (offs_b < KP // 2)[None, :], other=0)
            codes = tl.reshape(tl.join(p & 0xF, p >> 4), (BLOCK_N, BLOCK_K))  # k order restored
            g = offs_k // GROUP
            sg = offs_n.to(tl.int64)[:, None] * stride_sn + g[None, :]
            g_mask = n_mask[:, None] & (offs_k < KP)[None, :]
            s = tl.load(s_ptr + sg, mask=g_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + sg, mask=g_mask, other=0).to(tl.float32)
            w = ((codes.to(tl.float32) - z) * s).to(x.dtype)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    if BITS == 8:
        acc = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _sum_splits(part_ptr, out_ptr, N, S: tl.constexpr, BLOCK: tl.constexpr):
    """out (N,) = sum of the S split-K partial rows (S, N) fp32, cast to out's dtype: one kernel."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(S):
        acc += tl.load(part_ptr + s * N + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---- launch ------------------------------------------------------------------------------------

def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # interpreter runs (tests on the CPU): any number works
    return torch.cuda.get_device_properties(device).multi_processor_count


def _gemv_split(N: int, K: int, block_n: int, block_k: int, device) -> int:
    """Enough programs to cover every SM about twice, without slicing K thinner than one block."""
    programs = triton.cdiv(N, block_n)
    want = 2 * _num_sms(device)
    split = 1
    while programs * split < want and split * 2 * block_k <= K:
        split *= 2
    return split


def _gemv_launch(x, qweight, scales, zeros, bits, group, K, cfg):
    N = qweight.shape[0]
    block_n, block_k, warps, split = cfg
    KP = qweight.shape[1] * (2 if bits == 4 else 1)
    k_per_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    split = triton.cdiv(K, k_per_split)
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    # With split-K, fp32 partial sums per K slice, then one reduction kernel (deterministic,
    # unlike atomics).
    out = y if split == 1 else torch.empty(split, N, dtype=torch.float32, device=x.device)
    zp = zeros if zeros is not None else scales
    stride_sn = scales.stride(0) if bits == 4 else 0
    _qgemv[(triton.cdiv(N, block_n), split)](
        x, qweight, scales, zp, out, N, K, KP, k_per_split, qweight.stride(0), stride_sn, out.stride(0),
        BITS=bits, GROUP=group or 1, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        **LAUNCH_OPTIONS)
    if split > 1:
        _sum_splits[(triton.cdiv(N, 1024),)](out, y, N, S=split, BLOCK=1024, num_warps=4, **LAUNCH_OPTIONS)
    return y


def _dot_launch(x, qweight, scales, zeros, bits, group, K, cfg):
    M = x.shape[0]
    N = qweight.shape[0]
    block_m, block_n, block_k, warps = cfg
    KP = qweight.shape[1] * (2 if bits == 4 else 1)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    zp = zeros if zeros is not None else scales
    stride_sn = scales.stride(0) if bits == 4 else 0
    _qmm_dot[(triton.cdiv(N, block_n), triton.cdiv(M, block_m))](
        x, qweight, scales, zp, out, M, N, K, KP, x.stride(0), qweight.stride(0), stride_sn, out.stride(0),
        BITS=bits, GROUP=group or 1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        IEEE=x.dtype == torch.float32, num_warps=warps, **LAUNCH_OPTIONS)
    return out


# (BLOCK_N, BLOCK_K, warps) tried by the tuner: few rows x long K slices for narrow outputs (x_proj's
# 288 rows fill the GPU without split-K at BLOCK_N 2), more rows for wide ones, and K slices of
# exactly one int4 group (BLOCK_K = group: no per-group reshape); at most 64 fp32 accumulators per
# thread. Each is compiled once per (bits, group, dtype) and cached by Triton.
_GEMV_SHAPES = ((2, 1024, 4), (4, 512, 4), (4, 1024, 8), (8, 256, 4), (8, 512, 4), (8, 512, 8),
                (16, 256, 4), (16, 512, 8), (32, 128, 4), (32, 256, 8), (64, 64, 4), (64, 128, 8),
                (128, 32, 4))


def _gemv_candidates(N, K, bits, group, device):
    out = []
    for block_n, block_k, warps in _GEMV_SHAPES:
        if bits == 4 and block_k < group:
            continue
        split = _gemv_split(N, K, block_n, block_k, device)
        out.append((block_n, block_k, warps, 1))
        if split > 1:
            out.append((block_n, block_k, warps, split))
    return out


def _gemv_default(N, K, bits, group, device):
    block_k = max(256, group or 0)
    return (16, block_k, 4, _gemv_split(N, K, 16, block_k, device))


def _dot_candidates(M, bits, group):
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    out = []
    for block_n in (32, 64, 128):
        for block_k in (64, 128):
            for warps in (4, 8):
                out.append((block_m, block_n, block_k, warps))
    return out


def _dot_default(M, bits, group):
    return (16 if M <= 16 else (32 if M <= 32 else 64), 64, 64, 4)


_tuned: dict[tuple, tuple] = {}
_settings: dict = {"tune": True, "cache_dir": None}


def configure(tune: bool | None = None, cache_dir: Path | None = None) -> None:
    """Set once at the edge: whether to time launch configs (False: the fixed heuristic) and the
    folder of the on-disk tuning cache (None leaves it as it is)."""
    if tune is not None:
        _settings["tune"] = tune
    if cache_dir is not None:
        _settings["cache_dir"] = cache_dir


def _disk_key(key) -> str:
    import triton as _t

    return "qmm|" + "|".join(str(k) for k in key) + f"|triton={_t.__version__}"


def _tune(key, launch, candidates, default, args):
    """Pick the fastest candidate for this shape once (timed with CUDA events), then reuse it."""
    if key in _tuned:
        return _tuned[key]
    x = args[0]
    if x.device.type != "cuda" or not _settings["tune"] or torch.cuda.is_current_stream_capturing():
        return default
    from falcon_mamba.decode import tuning

    folder = _settings["cache_dir"]
    hit = tuning.load(folder, x.device, _disk_key(key))
    if hit is not None and tuple(hit.get("config", ())) in {tuple(c) for c in candidates}:
        _tuned[key] = tuple(hit["config"])
        return _tuned[key]
    best, best_t = default, float("inf")
    for cfg in candidates:
        try:
            for _ in range(2):
                launch(*args, cfg)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                launch(*args, cfg)
            end.record()
            end.synchronize()
            t = start.elapsed_time(end)
        except Exception:  # a config the compiler rejects (e.g. out of shared memory) is just skipped
            continue
        if t < best_t:
            best, best_t = cfg, t
    _tuned[key] = best
    tuning.store(folder, x.device, _disk_key(key), {"config": list(best), "ms_per_10": best_t})
    return best


def qmatmul(x_MK: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
            bits: int, group_size: int | None, in_features: int) -> torch.Tensor:
    """x (M, K) contiguous, M <= DOT_MAX_M -> y (M, N) in x's dtype."""
    M, K = x_MK.shape
    N = qweight.shape[0]
    args = (x_MK, qweight, scales, zeros, bits, group_size, K)
    key = (M if M > 1 else 1, N, K, bits, group_size, x_MK.dtype, x_MK.device.index)
    if M == 1:
        dev = x_MK.device
        cfg = _tune(key, _gemv_launch, _gemv_candidates(N, K, bits, group_size, dev),
                    _gemv_default(N, K, bits, group_size, dev), args)
        return _gemv_launch(*args, cfg)
    # Tune per power-of-two bucket of M so that a growing batch does not retune at every size.
    bucket = 1 << (M - 1).bit_length()
    key = (bucket,) + key[1:]
    cfg = _tune(key, _dot_launch, _dot_candidates(M, bits, group_size), _dot_default(M, bits, group_size),
                args)
    return _dot_launch(*args, cfg)
