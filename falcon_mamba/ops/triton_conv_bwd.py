"""Triton backward of the causal depthwise conv1d (ops/triton_conv.py), one fused kernel.

Legend: B batch, L length, D channels, K taps; BL x BD the tile one program computes per step,
CHUNK the rows one program walks (BL at a time) before it writes its weight/bias partial sums.

The spec is ``triton_conv.conv_bwd_reference`` (fp32 PyTorch over K shifted slices). With
pre[t] = sum_m w[K-1-m] x[t-m] keep_m[t] + bias, keep_m[t] = no reset in (t-m, t], and
dpre = dy * silu'(pre) (dy itself without silu):
  dx[s]      = sum_j dpre[s+j] keep_j[s+j] w[K-1-j]      (+ dstate[s-(L-(K-1))], masked, at the end)
  dw[K-1-j]  = sum_{b,s} x[s] dpre[s+j] keep_j[s+j]      (x[s] from the state for s < 0)
  dbias      = sum_{b,t} dpre[t]
Rows s run over [-(K-1), L) with a state (the rows s < 0 are the state's gradient) and [0, L)
without. Writing dw in the "source row" form above lets one masked dpre block serve dx, dw and
dbias; only x[s] is needed beside it.

Why one kernel that recomputes dpre for its K-1 halo rows instead of a dpre buffer: per element
the fused kernel moves x + dy in and dx out (3 x 2 bytes in bf16). A first kernel writing dpre in
fp32 and a second reading it back adds 8 bytes per element (2.3x the traffic); the halo recompute
costs K extra evaluations of pre per row (K^2 FMAs and K sigmoids from L1/L2-resident x), which
is cheap next to HBM. dweight/dbias are per-program partial sums reduced by torch.sum afterwards:
deterministic (no atomics), so a training step is reproducible bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falcon_mamba.ops.triton_helpers import LAUNCH_OPTIONS

# Tiles timed on the H200 at the 1.5B training shape (bench_conv_bwd.py --quick,
# results/h200-conv-bwd-f274a49.txt): 16 rows x 32 channels, 2 warps 0.588 ms; 16 x 64 x 4 warps
# 0.645 ms (chunk 128: 0.687, 512: 0.650); 8 x 64 0.635 ms; 32 x 64 0.83 ms; 16 x 128 x 8 warps
# 1.10 ms. Reduced per tap and step instead of TAP_ACC's per-tap sums: 2.98 ms (16 x 128), 1.86 ms
# (16 x 64). Still ~17% of the copy rate: the K^2 recompute of pre is the cost now (NOTES.md).
BLOCK_L = 16
BLOCK_D = 32
CHUNK = 256  # rows per program: fewer, larger dw partials (B * L / CHUNK of them, (D, K) each)
WARPS = 2


@triton.jit
def _x_rows(x_ptr, s_ptr, b, src, ok, d, md, sx_b, sx_l, ss_b, ss_k,
            K: tl.constexpr, HAS_STATE: tl.constexpr):
    """x at rows src (BL,) for channels d (BD,), fp32: from the state for src < 0; 0 where not ok."""
    src = src.to(tl.int64)
    xv = tl.load(x_ptr + b * sx_b + src[:, None] * sx_l + d[None, :],
                 mask=(ok & (src >= 0))[:, None] & md[None, :], other=0.0).to(tl.float32)
    if HAS_STATE:
        xv += tl.load(s_ptr + b * ss_b + (src + K - 1)[:, None] * ss_k + d[None, :],
                      mask=(ok & (src < 0))[:, None] & md[None, :], other=0.0).to(tl.float32)
    return xv


@triton.jit
def _not_reset(rst_ptr, b, pos, ok, sr_b, sr_l):
    """(BL,) bool: no document starts at pos (positions where not ok count as no reset)."""
    r = tl.load(rst_ptr + b * sr_b + pos.to(tl.int64) * sr_l, mask=ok, other=0)
    return r == 0


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, rst_ptr, dy_ptr, dst_ptr,
    dx_ptr, dsin_ptr, dw_ptr, db_ptr,
    L, D, S0, n_chunks,
    sx_b, sx_l, ss_b, ss_k, sr_b, sr_l, sdy_b, sdy_l, sds_b, sds_k, sdx_b, sdx_l, sdi_b, sdi_k,
    sw_d,
    K: tl.constexpr, KP: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr, CH: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RST: tl.constexpr, HAS_DY: tl.constexpr,
    HAS_DSTATE: tl.constexpr, SILU: tl.constexpr, TAP_ACC: tl.constexpr,
):
    # TAP_ACC (K <= 4, every Mamba): dw and db summed per tap in (BL, BD) tiles over the chunk and
    # reduced over the rows once at its end (2.7-5x faster on the H200: the constants above). Wider
    # convs reduce over BL (across the warps) per tap and step instead.
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    d = pid_d * BD + tl.arange(0, BD)
    md = d < D
    kcol = tl.arange(0, KP)
    dw_acc = tl.zeros((BD, KP), tl.float32)
    db_acc = tl.zeros((BD,), tl.float32)
    t0 = tl.zeros((BL, BD), tl.float32)
    t1 = tl.zeros((BL, BD), tl.float32)
    t2 = tl.zeros((BL, BD), tl.float32)
    t3 = tl.zeros((BL, BD), tl.float32)
    tb = tl.zeros((BL, BD), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=md, other=0.0).to(tl.float32)
    c0 = S0 + pid_c * CH
    # a runtime bound: the last chunk stops at L instead of walking masked steps
    for it in range(0, tl.minimum(CH, L - c0), BL):
        s = c0 + it + tl.arange(0, BL)  # the rows whose gradient this step writes
        rows = s < L
        dxa = tl.zeros((BL, BD), tl.float32)
        if HAS_DY:
            x_s = _x_rows(x_ptr, s_ptr, b, s, rows, d, md, sx_b, sx_l, ss_b, ss_k, K, HAS_STATE)
            keep_dx = rows  # keep_j[s+j]: no reset in (s, s+j]
            for j in tl.static_range(K):
                u = s + j  # the output row whose tap j reads row s
                valid = (u >= 0) & (u < L)
                if HAS_RST:
                    if j > 0:
                        keep_dx = keep_dx & _not_reset(rst_ptr, b, u, valid, sr_b, sr_l)
                u64 = u.to(tl.int64)
                dp = tl.load(dy_ptr + b * sdy_b + u64[:, None] * sdy_l + d[None, :],
                             mask=valid[:, None] & md[None, :], other=0.0).to(tl.float32)
                if SILU:
                    # recompute pre[u] exactly as the forward kernel does (same tap order)
                    pre = tl.zeros((BL, BD), tl.float32)
                    keep = valid
                    for m in tl.static_range(K):
                        w = tl.load(w_ptr + d * sw_d + (K - 1 - m), mask=md, other=0.0).to(tl.float32)
                        pre += w[None, :] * _x_rows(x_ptr, s_ptr, b, u - m, keep, d, md, sx_b, sx_l,
                                                    ss_b, ss_k, K, HAS_STATE)
                        if HAS_RST:
                            if m < K - 1:
                                keep = keep & _not_reset(rst_ptr, b, u - m, keep & (u - m >= 0),
                                                         sr_b, sr_l)
                    if HAS_BIAS:
                        pre += bias[None, :]
                    sig = tl.sigmoid(pre)
                    dp = dp * sig * (1 + pre * (1 - sig))
                dpm = tl.where(keep_dx[:, None], dp, 0.0)
                wj = tl.load(w_ptr + d * sw_d + (K - 1 - j), mask=md, other=0.0).to(tl.float32)
                dxa += dpm * wj[None, :]
                if TAP_ACC:
                    if j == 0:
                        t0 += dpm * x_s
                        tb += dpm
                    if j == 1:
                        t1 += dpm * x_s
                    if j == 2:
                        t2 += dpm * x_s
                    if j == 3:
                        t3 += dpm * x_s
                else:
                    dw_acc += tl.where(kcol[None, :] == K - 1 - j, tl.sum(dpm * x_s, axis=0)[:, None], 0.0)
                    if j == 0:
                        db_acc += tl.sum(dpm, axis=0)
        if HAS_DSTATE:
            # the returned state's entry jj holds row L-(K-1)+jj, zeroed when a document starts
            # after it: the rows s+1 .. L-1 (at most K-2 of them) must hold no reset
            jj = s - (L - (K - 1))
            fin = rows & (jj >= 0)
            if HAS_RST:
                for i in tl.static_range(1, K - 1):
                    pos = s + i
                    fin = fin & _not_reset(rst_ptr, b, pos, fin & (pos >= 0) & (pos < L), sr_b, sr_l)
            dxa += tl.load(dst_ptr + b * sds_b + jj.to(tl.int64)[:, None] * sds_k + d[None, :],
                           mask=fin[:, None] & md[None, :], other=0.0).to(tl.float32)
        s64 = s.to(tl.int64)
        tl.store(dx_ptr + b * sdx_b + s64[:, None] * sdx_l + d[None, :],
                 dxa.to(dx_ptr.dtype.element_ty), mask=(rows & (s >= 0))[:, None] & md[None, :])
        if HAS_STATE:
            tl.store(dsin_ptr + b * sdi_b + (s64 + K - 1)[:, None] * sdi_k + d[None, :],
                     dxa.to(dsin_ptr.dtype.element_ty), mask=(rows & (s < 0))[:, None] & md[None, :])
    if TAP_ACC:
        dw_acc += tl.where(kcol[None, :] == K - 1, tl.sum(t0, axis=0)[:, None], 0.0)
        if K > 1:
            dw_acc += tl.where(kcol[None, :] == K - 2, tl.sum(t1, axis=0)[:, None], 0.0)
        if K > 2:
            dw_acc += tl.where(kcol[None, :] == K - 3, tl.sum(t2, axis=0)[:, None], 0.0)
        if K > 3:
            dw_acc += tl.where(kcol[None, :] == K - 4, tl.sum(t3, axis=0)[:, None], 0.0)
        db_acc = tl.sum(tb, axis=0)
    if HAS_DY:
        p = (b * n_chunks + pid_c) * D  # this program's partial-sum row block
        tl.store(dw_ptr + (p + d)[:, None] * K + kcol[None, :], dw_acc,
                 mask=md[:, None] & (kcol[None, :] < K))
        if HAS_BIAS:
            tl.store(db_ptr + p + d, db_acc, mask=md)


def _last_dim_contiguous(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def conv_bwd(x_BLD, weight_DK, bias_D, conv_state_BKD, reset_BL, silu: bool, dy_BLD, dstate_BKD,
             dx_out=None):
    """Gradients of (y, new_state) = CausalConv1dFn(x, weight, bias, state, reset, silu).

    x (B, L, D) any float dtype, last dim contiguous, any row strides; weight (D, K); bias (D) or
    None; conv_state (B, K-1, D) or None; reset (B, L) bool or None; dy (B, L, D) or None (only the
    state path then); dstate (B, K-1, D) or None. Returns (dx (B, L, D) in x's dtype, dweight
    (D, K), dbias (D) or None in their dtypes, dstate_in (B, K-1, D) in the state's dtype or None).
    dx_out (B, L, D) in x's dtype, last dim contiguous, any row strides, optional: where dx goes.
    """
    Bsz, L, D = x_BLD.shape
    K = weight_DK.shape[1]
    assert x_BLD.stride(-1) == 1, "x must have a contiguous last dim"
    dev = x_BLD.device
    st, dy, dst = (_last_dim_contiguous(t) for t in (conv_state_BKD, dy_BLD, dstate_BKD))
    rst = reset_BL.contiguous().view(torch.uint8) if reset_BL is not None else None
    w = weight_DK.contiguous()
    dx = dx_out if dx_out is not None else torch.empty(Bsz, L, D, dtype=x_BLD.dtype, device=dev)
    assert dx.shape == x_BLD.shape and dx.stride(-1) == 1, "dx_out must be (B, L, D), last dim contiguous"
    dsin = torch.empty(Bsz, K - 1, D, dtype=st.dtype, device=dev) if st is not None else None
    S0 = -(K - 1) if st is not None else 0  # rows below 0 are the state's gradient
    n_chunks = triton.cdiv(L - S0, CHUNK)
    has_dy = dy is not None and L > 0
    dw_part = torch.empty(Bsz * n_chunks if has_dy else 0, D, K, dtype=torch.float32, device=dev)
    db_part = torch.empty(Bsz * n_chunks if has_dy and bias_D is not None else 0, D,
                          dtype=torch.float32, device=dev)
    if n_chunks > 0 and Bsz > 0 and D > 0:
        grid = (n_chunks, triton.cdiv(D, BLOCK_D), Bsz)
        _conv_bwd_kernel[grid](
            x_BLD, w, bias_D if bias_D is not None else w, st if st is not None else x_BLD,
            rst if rst is not None else x_BLD, dy if dy is not None else x_BLD,
            dst if dst is not None else x_BLD,
            dx, dsin if dsin is not None else dx, dw_part, db_part,
            L, D, S0, n_chunks,
            x_BLD.stride(0), x_BLD.stride(1),
            st.stride(0) if st is not None else 0, st.stride(1) if st is not None else 0,
            rst.stride(0) if rst is not None else 0, rst.stride(1) if rst is not None else 0,
            dy.stride(0) if dy is not None else 0, dy.stride(1) if dy is not None else 0,
            dst.stride(0) if dst is not None else 0, dst.stride(1) if dst is not None else 0,
            dx.stride(0), dx.stride(1),
            dsin.stride(0) if dsin is not None else 0, dsin.stride(1) if dsin is not None else 0,
            w.stride(0),
            K=K, KP=triton.next_power_of_2(K), BL=BLOCK_L, BD=BLOCK_D, CH=CHUNK,
            HAS_BIAS=bias_D is not None, HAS_STATE=st is not None, HAS_RST=rst is not None,
            HAS_DY=has_dy, HAS_DSTATE=dst is not None, SILU=silu, TAP_ACC=K <= 4,
            num_warps=WARPS,
            **LAUNCH_OPTIONS,
        )
    dw = dw_part.sum(0).to(weight_DK.dtype)
    db = db_part.sum(0).to(bias_D.dtype) if bias_D is not None else None
    return dx, dw, db, dsin
