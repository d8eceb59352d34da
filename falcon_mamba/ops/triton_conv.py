"""Triton causal depthwise conv1d with a carried state, and its autograd Function.

Legend: B batch, L length, D channels, K taps; BL x BD the tile one program computes.

y[b, t, d] = sum_m w[d, K-1-m] * x[b, t-m, d] + bias[d] (then silu), where positions before the
chunk come from the conv state (B, K-1, D) and, with ``reset`` (B, L) bool, a tap is dropped when
a document starts between its source position and t (the source belongs to an earlier document).
The forward is one Triton kernel (memory bound: x read once through L1/L2 for all K taps). The
backward is one Triton kernel too (triton_conv_bwd.py); ``conv_bwd_reference`` here, fp32 PyTorch
over K shifted slices, is its spec and the tests' twin.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from falcon_mamba.ops.triton_conv_bwd import conv_bwd
from falcon_mamba.ops.triton_helpers import LAUNCH_OPTIONS

BLOCK_L = 32
BLOCK_D = 128
WARPS = 4
log = logging.getLogger("falcon_mamba.ops")
# The backward kernel was tested in Triton's interpreter, not yet on a GPU (issue 18): if a Triton
# cannot compile or launch it, training falls back to the PyTorch twin (once, with a warning)
# rather than stopping.
_BWD_KERNEL_FAILED = False


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, rst_ptr, y_ptr,
    L, D,
    sx_b, sx_l, ss_b, ss_k, sy_b, sy_l, sr_b, sr_l, sw_d,
    K: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RST: tl.constexpr, SILU: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t = pid_l * BL + tl.arange(0, BL)
    d = pid_d * BD + tl.arange(0, BD)
    mt = t < L
    md = d < D
    acc = tl.zeros((BL, BD), tl.float32)
    keep = mt  # lag m's source is still in t's document
    for m in tl.static_range(K):
        s = (t - m).to(tl.int64)
        w = tl.load(w_ptr + d * sw_d + (K - 1 - m), mask=md, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + b * sx_b + s[:, None] * sx_l + d[None, :],
                     mask=(keep & (s >= 0))[:, None] & md[None, :], other=0.0).to(tl.float32)
        if HAS_STATE:
            xs = tl.load(s_ptr + b * ss_b + (s + K - 1)[:, None] * ss_k + d[None, :],
                         mask=(keep & (s < 0))[:, None] & md[None, :], other=0.0).to(tl.float32)
            xv += xs
        acc += w[None, :] * xv
        if HAS_RST:
            if m < K - 1:
                # the next lag reaches before s: only if s did not start a new document
                r = tl.load(rst_ptr + b * sr_b + s * sr_l, mask=mt & (s >= 0), other=0)
                keep = keep & (r == 0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=md, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    t64 = t.to(tl.int64)
    tl.store(y_ptr + b * sy_b + t64[:, None] * sy_l + d[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mt[:, None] & md[None, :])


def _keep_masks(reset_BL: torch.Tensor | None, Bsz: int, L: int, K: int, device) -> list:
    """keep[m] (B, L) bool: lag m's source t-m is in t's document (no reset in (t-m, t])."""
    keeps = [torch.ones(Bsz, L, dtype=torch.bool, device=device)]
    for m in range(1, K):
        k = keeps[-1].clone()
        if reset_BL is not None:
            # reset at t-(m-1) cuts lag m
            k[:, m - 1:] &= ~reset_BL[:, : L - (m - 1)]
        keeps.append(k)
    return keeps


@triton.jit
def _final_state_kernel(x_ptr, rst_ptr, out_ptr, L, D, sx_b, sx_l, sr_b, sr_l,
                        K: tl.constexpr, BD: tl.constexpr):
    # out[b, j] = x[b, L-(K-1)+j], zero when a document starts after that position: walking from
    # the last entry (always kept) back, entry j is dropped from the first reset at p_j + 1 on.
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    d = pid_d * BD + tl.arange(0, BD)
    md = d < D
    dropped = tl.zeros((), tl.int32)
    for i in tl.static_range(K - 1):
        j = K - 2 - i
        p = (L - (K - 1) + j).to(tl.int64)
        if i > 0:
            dropped = dropped | (tl.load(rst_ptr + b * sr_b + (p + 1) * sr_l) != 0).to(tl.int32)
        xv = tl.load(x_ptr + b * sx_b + p * sx_l + d, mask=md, other=0.0)
        xv = tl.where(dropped == 0, xv, tl.zeros_like(xv))
        tl.store(out_ptr + (b * (K - 1) + j) * D + d, xv, mask=md)


FINAL_BLOCK_D = 1024


def final_state(x_BLD, conv_state_BKD, reset_BL, K: int) -> torch.Tensor:
    """The last K-1 inputs (B, K-1, D) in x's dtype; with resets, entries before the last document
    start are zero (the next chunk's conv must not see them). With resets and a chunk of at least
    K-1 positions: one kernel (in PyTorch, a copy and a suffix "any" over the resets took six small
    launches a layer: ~15 us a layer of a batched prompt graph's replay on the H200,
    results/h200-prefill-batches-16layers-35a8ab0.txt); otherwise final_state_torch."""
    Bsz, L, D = x_BLD.shape
    if reset_BL is None or K <= 2 or L < K - 1 or x_BLD.stride(-1) != 1:
        return final_state_torch(x_BLD, conv_state_BKD, reset_BL, K)
    out = torch.empty(Bsz, K - 1, D, dtype=x_BLD.dtype, device=x_BLD.device)
    rst = reset_BL.contiguous().view(torch.uint8)
    _final_state_kernel[(triton.cdiv(D, FINAL_BLOCK_D), Bsz)](
        x_BLD, rst, out, L, D, x_BLD.stride(0), x_BLD.stride(1), rst.stride(0), rst.stride(1),
        K=K, BD=FINAL_BLOCK_D, num_warps=4, **LAUNCH_OPTIONS)
    return out


def final_state_torch(x_BLD, conv_state_BKD, reset_BL, K: int) -> torch.Tensor:
    """final_state in PyTorch: any length (a chunk shorter than K-1 keeps part of the carried state)."""
    Bsz, L, D = x_BLD.shape
    if L >= K - 1:  # the state is the last K-1 inputs: one copy (no zeros, no concatenation)
        new = x_BLD[:, L - (K - 1):].clone(memory_format=torch.contiguous_format)
        if reset_BL is not None and K > 2:
            # entry j (position L-(K-1)+j) is dropped if a reset lies after it, in the last K-2
            # positions from its own + 1: a suffix "any" over them (the last entry always stays)
            dropped = reset_BL[:, L - (K - 2):].flip(1).cummax(dim=1).values.flip(1)
            new[:, :K - 2].mul_(~dropped[:, :, None])  # in place on the view: no copy back
        return new
    prev = (conv_state_BKD.to(x_BLD.dtype) if conv_state_BKD is not None
            else x_BLD.new_zeros(Bsz, K - 1, D))
    new = torch.cat([prev, x_BLD], dim=1)[:, -(K - 1):].clone()
    if reset_BL is not None and L > 0:
        for j in range(K - 1):  # entry j is position p = L-(K-1)+j; dropped if a reset lies in (p, L-1]
            p = L - (K - 1) + j
            after = reset_BL[:, max(p + 1, 0):]
            if after.shape[1]:
                new[:, j] *= (~after.any(dim=1)).to(new.dtype)[:, None]
    return new


def conv_fwd(x_BLD, weight_DK, bias_D, conv_state_BKD=None, silu=True, reset_BL=None) -> torch.Tensor:
    """Launch the forward kernel: y (B, L, D) in x's dtype. x may have any row strides."""
    Bsz, L, D = x_BLD.shape
    K = weight_DK.shape[1]
    assert x_BLD.stride(-1) == 1, "x must have a contiguous last dim"
    y = torch.empty(Bsz, L, D, dtype=x_BLD.dtype, device=x_BLD.device)
    if L == 0:
        return y
    st = conv_state_BKD
    if st is not None and (st.stride(-1) != 1 or st.dtype != x_BLD.dtype):
        st = st.to(x_BLD.dtype).contiguous()
    rst = reset_BL.contiguous().view(torch.uint8) if reset_BL is not None else None
    w = weight_DK.contiguous()
    grid = (triton.cdiv(L, BLOCK_L), triton.cdiv(D, BLOCK_D), Bsz)
    _conv_fwd_kernel[grid](
        x_BLD, w, bias_D if bias_D is not None else w, st if st is not None else x_BLD,
        rst if rst is not None else x_BLD, y,
        L, D,
        x_BLD.stride(0), x_BLD.stride(1),
        st.stride(0) if st is not None else 0, st.stride(1) if st is not None else 0,
        y.stride(0), y.stride(1),
        rst.stride(0) if rst is not None else 0, rst.stride(1) if rst is not None else 0,
        w.stride(0),
        K=K, BL=BLOCK_L, BD=BLOCK_D, HAS_BIAS=bias_D is not None, HAS_STATE=st is not None,
        HAS_RST=rst is not None, SILU=silu, num_warps=WARPS, **LAUNCH_OPTIONS,
    )
    return y


def conv_bwd_reference(x, w, bias, state, reset, silu, dy, dstate):
    """The spec of the backward (triton_conv_bwd.conv_bwd is its fast twin, same signature and
    returns): fp32 PyTorch over the K shifted slices. Returns (dx (B, L, D) in x's dtype,
    dweight (D, K), dbias (D) or None, dstate_in (B, K-1, D) or None, in their inputs' dtypes)."""
    Bsz, L, D = x.shape
    K = w.shape[1]
    prev = state.float() if state is not None else x.new_zeros(Bsz, K - 1, D, dtype=torch.float32)
    xx = torch.cat([prev, x.float()], dim=1)  # (B, K-1+L, D)
    wf = w.float()
    keeps = [k[..., None].float() for k in _keep_masks(reset, Bsz, L, K, x.device)]
    taps = [xx[:, K - 1 - m: K - 1 - m + L] * keeps[m] for m in range(K)]
    dpre = dy.float() if dy is not None else x.new_zeros(Bsz, L, D, dtype=torch.float32)
    if silu:
        pre = sum(wf[:, K - 1 - m] * taps[m] for m in range(K))
        if bias is not None:
            pre = pre + bias.float()
        sig = torch.sigmoid(pre)
        dpre = dpre * sig * (1 + pre * (1 - sig))
    dxx = torch.zeros_like(xx)
    dw = torch.zeros_like(wf)
    for m in range(K):
        dxx[:, K - 1 - m: K - 1 - m + L] += dpre * keeps[m] * wf[:, K - 1 - m]
        dw[:, K - 1 - m] = (dpre * taps[m]).sum((0, 1))
    if dstate is not None:
        # new_state = last K-1 of xx, masked by the resets after each entry
        keep_final = final_state_torch(torch.ones(Bsz, L, 1, device=x.device), None if state is None else
                                 torch.ones(Bsz, K - 1, 1, device=x.device), reset, K)
        dxx[:, L:] += dstate.float() * keep_final
    dbias = dpre.sum((0, 1)) if bias is not None else None
    dx = dxx[:, K - 1:].to(x.dtype)
    dstate_in = dxx[:, : K - 1].to(state.dtype) if state is not None else None
    return dx, dw.to(w.dtype), dbias.to(bias.dtype) if bias is not None else None, dstate_in


class CausalConv1dFn(torch.autograd.Function):
    """Forward: the Triton kernel. Backward: the Triton backward kernel (triton_conv_bwd)."""

    @staticmethod
    def forward(ctx, x, weight, bias, state, reset, silu):
        K = weight.shape[1]
        y = conv_fwd(x, weight, bias, state, silu, reset)
        new_state = final_state(x, state, reset, K)
        ctx.save_for_backward(x, weight, bias, state, reset)
        ctx.silu = silu
        # an unused output's gradient stays None (training drops the final state: no zeros
        # tensor to build and read back); the backward handles dy or dstate None
        ctx.set_materialize_grads(False)
        return y, new_state

    @staticmethod
    def backward(ctx, dy, dstate):
        x, w, bias, state, reset = ctx.saved_tensors
        return (*conv_backward(x, w, bias, state, reset, ctx.silu, dy, dstate), None, None)


def conv_backward(x, w, bias, state, reset, silu, dy, dstate, dx_out=None):
    """triton_conv_bwd.conv_bwd (same arguments and returns), or its PyTorch twin once a Triton
    could not build the kernel. Also the conv step of the fused mixer's backward (mixer_autograd)."""
    global _BWD_KERNEL_FAILED
    if not _BWD_KERNEL_FAILED:
        try:
            return conv_bwd(x, w, bias, state, reset, silu, dy, dstate, dx_out)
        except Exception as e:  # noqa: BLE001 - a Triton that cannot build it: the twin
            if not (type(e).__module__ or "").startswith("triton"):
                raise
            _BWD_KERNEL_FAILED = True
            first = (str(e).strip().splitlines() or [""])[0]
            log.warning("the Triton conv backward cannot run here (%s: %s); training uses its "
                        "PyTorch twin", type(e).__name__, first)
    dx, dw, db, dstate_in = conv_bwd_reference(x, w, bias, state, reset, silu, dy, dstate)
    if dx_out is not None:
        dx = dx_out.copy_(dx)
    return dx, dw, db, dstate_in
