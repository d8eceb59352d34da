"""RMSNorm's backward as one Triton kernel (training): the block norms on the fp32 residual stream
and the fused mixer's weightless dt/B/C norms.

Legend: M rows, H the normalised width, BM rows per tile, BH = next_power_of_2(H), P programs.

For rows x (M, H), the output gradient g (M, H) and weight w (H,) or None, with 1/rms recomputed
from x (norm_autograd saves x only):
    rstd = 1 / sqrt(mean(x^2) + eps);  xhat = x rstd                       (fp32)
    dw   = sum over rows of g * round_g(round_x(xhat))                      (fp32 partials per program)
    gx   = round_x(g w)   (the reference's cast-then-multiply order: g w rounded to x's dtype)
    dx   = rstd (gx - xhat mean(gx xhat))                                  (rounded to dx's dtype)
norm_autograd.rms_norm_backward is the spec (its PyTorch twin). That one runs ~12 elementwise
passes over (M, H): on the 1.5B training shape's block norm (16,384 x 2048 fp32 rows, 134 MB a
tensor) ~3.4 GB of traffic a layer, ~0.8 ms, 6% of the training step over 48 layers, where this
kernel reads x and g once and writes dx once (~0.4 GB). The dt/B/C norms are small tensors
(16,384 x 128 and x 16), for which the twin's ~36 launches a layer cost more than their bytes.

The weight's gradient is summed per program in fp32 over its rows (programs walk the row tiles
with a stride of P), and the (P, H) partials are summed once by torch in a fixed order: the
result does not depend on timing (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falcon_mamba.ops.triton_decode import _ROUND, _round  # v stored in a dtype and read back
from falcon_mamba.ops.triton_helpers import LAUNCH_OPTIONS

TILE = 4096  # elements of a (BM, BH) tile: two fp32 tiles (x, g) in registers at 8 warps
PROGRAMS_PER_SM = 4  # 528 programs on the H200: each walks ~8 of the 1.5B block norm's 4,096 tiles


@triton.jit
def _rms_bwd_kernel(x_ptr, g_ptr, w_ptr, dx_ptr, dw_ptr, res_ptr, dx2_ptr, M, H, eps, sx, sg, sdx,
                    sres, sdx2, BM: tl.constexpr, BH: tl.constexpr, HAS_W: tl.constexpr,
                    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, ROUND_X: tl.constexpr,
                    ROUND_G: tl.constexpr, HAS_RES: tl.constexpr, HAS_DX2: tl.constexpr):
    # Program p takes the row tiles p, p + P, p + 2P, ...; writes dx (rows with stride sdx) and,
    # with NEED_DW, its (H,) partial of dw at dw_ptr + p * H. HAS_RES: dx += res (the gradient
    # that reached x by the residual stream); HAS_DX2: dx also in dx2's dtype (the residual
    # branch's input gradient).
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BH)
    mc = cols < H
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=mc, other=0.0).to(tl.float32)
    dw = tl.zeros((BH,), tl.float32)
    ntiles = tl.cdiv(M, BM)
    tile = pid
    while tile < ntiles:
        rows = (tile * BM + tl.arange(0, BM)).to(tl.int64)
        m = (rows < M)[:, None] & mc[None, :]
        xv = tl.load(x_ptr + rows[:, None] * sx + cols[None, :], mask=m, other=0.0).to(tl.float32)
        gv = tl.load(g_ptr + rows[:, None] * sg + cols[None, :], mask=m, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xv * xv, axis=1) / H + eps)
        xhat = xv * rstd[:, None]
        if HAS_W:
            if NEED_DW:  # y as the forward stored it (x's dtype), then in g's dtype
                dw += tl.sum(gv * _round(_round(xhat, ROUND_X), ROUND_G), axis=0)
            gv = gv * w[None, :]
        if NEED_DX:
            gx = _round(gv, ROUND_X)
            c = tl.sum(gx * xhat, axis=1) / H
            dxv = rstd[:, None] * (gx - xhat * c[:, None])
            if HAS_RES:
                rv = tl.load(res_ptr + rows[:, None] * sres + cols[None, :], mask=m, other=0.0)
                dxv += rv.to(tl.float32)
            tl.store(dx_ptr + rows[:, None] * sdx + cols[None, :], dxv.to(dx_ptr.dtype.element_ty), mask=m)
            if HAS_DX2:
                tl.store(dx2_ptr + rows[:, None] * sdx2 + cols[None, :], dxv.to(dx2_ptr.dtype.element_ty),
                         mask=m)
        tile += nprog
    if NEED_DW:
        tl.store(dw_ptr + pid * H + cols, dw, mask=mc)


def _rows(t: torch.Tensor, H: int) -> torch.Tensor:
    """(..., H) -> an (M, H) view with unit column stride (a copy only where no view exists)."""
    t2 = t.reshape(-1, H)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm_backward(x: torch.Tensor, weight: torch.Tensor | None, eps: float, g: torch.Tensor,
                      need_dx: bool = True, need_dw: bool = True, dx_out: torch.Tensor | None = None,
                      residual_grad: torch.Tensor | None = None, dx_dtype: torch.dtype | None = None,
                      y_dtype: torch.dtype | None = None):
    """norm_autograd.rms_norm_backward's contract on Triton: (dx in x's dtype or None, dweight in
    weight's dtype or None) for y = reference.rms_norm(x, weight, eps) and the output gradient g.
    x, g (..., H), any dtypes, rows of any stride with the last dim contiguous; dx_out (..., H),
    optional: where dx goes (a slice of a wider buffer, the fused mixer's d(x_proj output)).
    residual_grad (..., H), optional: added to dx (x also fed the residual stream: the training
    add + norm, norm_autograd.add_rms_norm); dx_dtype: then also returns dx in that dtype, as a
    third value (the residual branch's output gradient), from the same fp32 sum. y_dtype: the
    norm's output dtype where g arrives rounded to another (default g's): dw takes y in it."""
    H = x.shape[-1]
    x2, g2 = _rows(x, H), _rows(g, H)
    r2 = _rows(residual_grad, H) if residual_grad is not None else None
    M = x2.shape[0]
    need_dw = need_dw and weight is not None
    dx = None
    if need_dx:
        dx = dx_out if dx_out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
        assert dx.shape == x.shape and dx.dtype == x.dtype and dx.stride(-1) == 1, \
            "dx_out: x's shape and dtype, last dim contiguous"
        dxr = dx.view(-1, H)  # raises where the rows are no (M, H) view: the kernel writes in place
    dx2 = (torch.empty(x.shape, dtype=dx_dtype, device=x.device)
           if dx_dtype is not None and need_dx else None)
    if M == 0 or not (need_dx or need_dw):
        dw0 = torch.zeros_like(weight) if need_dw else None
        return (dx, dw0) if dx_dtype is None else (dx, dw0, dx2)
    BH = triton.next_power_of_2(H)
    BM = max(1, min(256, TILE // BH))
    tiles = triton.cdiv(M, BM)
    sms = (torch.cuda.get_device_properties(x.device).multi_processor_count
           if x.device.type == "cuda" else 4)  # 4 "SMs" in the CPU interpreter: the tests' programs
    P = max(1, min(tiles, sms * PROGRAMS_PER_SM))
    partial = torch.empty(P, H, dtype=torch.float32, device=x.device) if need_dw else None
    d2 = dx2.view(-1, H) if dx2 is not None else None
    _rms_bwd_kernel[(P,)](
        x2, g2, weight if weight is not None else x2, dxr if need_dx else x2,
        partial if partial is not None else x2, r2 if r2 is not None else x2, d2 if d2 is not None else x2,
        M, H, float(eps), x2.stride(0), g2.stride(0), dxr.stride(0) if need_dx else 0,
        r2.stride(0) if r2 is not None else 0, d2.stride(0) if d2 is not None else 0,
        BM=BM, BH=BH, HAS_W=weight is not None, NEED_DX=need_dx, NEED_DW=need_dw,
        ROUND_X=_ROUND[x.dtype], ROUND_G=_ROUND[y_dtype or g.dtype], HAS_RES=r2 is not None and need_dx,
        HAS_DX2=d2 is not None, num_warps=8 if BM * BH >= 2048 else 4, **LAUNCH_OPTIONS)
    dw = partial.sum(0).to(weight.dtype) if need_dw else None
    return (dx, dw) if dx_dtype is None else (dx, dw, dx2)
