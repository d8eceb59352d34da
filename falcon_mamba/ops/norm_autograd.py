"""RMSNorm with a hand-written backward, for training: the forward is the backend's no-grad norm
(Triton: one pass over the rows), and only x is saved for the backward, which recomputes 1/rms.

Autograd through reference.rms_norm saves, besides x, the fp32 normalised x (and, for a weighted
norm, the product's other operand): for the block norm on the fp32 residual stream that is one
more (B, L, H) fp32 tensor per layer (134 MB at 8 x 2048 tokens and H 2048; 6.4 GB over 48 layers)
that the backward does not need. The gradient is the reference's to rounding, with its casts:
the output gradient times the weight is rounded to x's dtype before the fp32 math (as the
cast-then-multiply order of reference.rms_norm makes autograd do).

Legend: H the normalised (last) dim; "..." any leading dims.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float, fwd: Callable,
                bwd: Callable) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.bwd = eps, bwd
        return fwd(x, weight, eps)  # autograd is off inside forward: the backend's inference kernel

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight = ctx.saved_tensors
        dx, dw = ctx.bwd(x, weight, ctx.eps, g, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dx, dw, None, None, None


def rms_norm_backward(x: torch.Tensor, weight: torch.Tensor | None, eps: float, g: torch.Tensor,
                      need_dx: bool = True, need_dw: bool = True):
    """The gradients (dx in x's dtype or None, dweight in weight's dtype or None) of
    reference.rms_norm(x, weight, eps) for the output gradient g, from x alone (1/rms recomputed).
    Also the backward of the fused mixer's weightless dt/B/C norms (mixer_autograd.py)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * rstd  # (..., H) fp32: lives only inside the backward
    dw = None
    if weight is not None:
        if need_dw:
            y = xhat.to(x.dtype).to(g.dtype)
            dw = (g * y).reshape(-1, g.shape[-1]).sum(0).to(weight.dtype)
        g = g * weight
    gf = g.to(x.dtype).float()
    dx = None
    if need_dx:
        dx = (rstd * (gf - xhat * (gf * xhat).mean(-1, keepdim=True))).to(x.dtype)
    return dx, dw


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, fwd: Callable,
             bwd: Callable | None = None) -> torch.Tensor:
    """reference.rms_norm(x, weight, eps) with the forward computed by ``fwd`` (a backend's
    rms_norm, same signature, run without autograd) and the lean backward: ``bwd`` (a backend's
    rms_norm_backward, this module's signature; the Triton kernel on a GPU), else the one above.
    x (..., H); weight (H,) or None -> (..., H) in x's dtype promoted with weight's."""
    return _RMSNormFn.apply(x, weight, eps, fwd, bwd or rms_norm_backward)


class _AddRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, out: torch.Tensor, weight: torch.Tensor, eps: float,
                u_dtype: torch.dtype, fwd: Callable, bwd: Callable):
        h_new = torch.empty(h.shape, dtype=torch.float32, device=h.device)
        u = fwd(h, out, weight, eps, round_to=None, h_out=h_new, out_dtype=u_dtype)
        ctx.save_for_backward(h_new, weight)
        ctx.eps, ctx.bwd, ctx.out_dtype = eps, bwd, out.dtype
        return h_new, u

    @staticmethod
    def backward(ctx, dh_new: torch.Tensor | None, du: torch.Tensor | None):
        h_new, weight = ctx.saved_tensors
        if du is None:  # only the stream was used: the norm contributes nothing
            du = torch.zeros_like(h_new)
        if dh_new is None:
            dh_new = torch.zeros_like(h_new)
        # du arrives in u's dtype; the norm's own output (before that rounding) is fp32
        dh, dw, dout = ctx.bwd(h_new, weight, ctx.eps, du, True, ctx.needs_input_grad[2],
                               residual_grad=dh_new, dx_dtype=ctx.out_dtype,
                               y_dtype=torch.promote_types(h_new.dtype, weight.dtype))
        return dh, dout, dw, None, None, None, None


def add_rms_norm_backward(x: torch.Tensor, weight: torch.Tensor | None, eps: float, g: torch.Tensor,
                          need_dx: bool = True, need_dw: bool = True, *, residual_grad: torch.Tensor,
                          dx_dtype: torch.dtype, y_dtype: torch.dtype):
    """The PyTorch twin of the Triton backward of add_rms_norm (triton_norm_bwd.rms_norm_backward
    with residual_grad, dx_dtype and y_dtype): (dx + residual_grad in x's dtype, dweight, the same
    sum in dx_dtype); g is taken in y_dtype, the norm's output dtype."""
    dx, dw = rms_norm_backward(x, weight, eps, g.to(y_dtype), need_dx, need_dw)
    dx = dx.float() + residual_grad.float()
    return dx.to(x.dtype), dw, dx.to(dx_dtype)


def add_rms_norm(h: torch.Tensor, out: torch.Tensor, weight: torch.Tensor, eps: float,
                 u_dtype: torch.dtype, fwd: Callable, bwd: Callable | None = None):
    """The training residual add and block norm as one Function: (h_new = h + out in fp32, u =
    reference.rms_norm(h_new, weight, eps) rounded to u_dtype), as ``h_new = h.float() + out;
    u = rms_norm(h_new, weight, eps).to(u_dtype)`` computes them, forward and backward. h (..., H)
    the fp32 residual stream, out (..., H) the previous block's output, weight (H,) fp32.
    u_dtype: autocast's dtype under autocast (the mixer casts its input to it first thing, so the
    fp32 u and its casts both ways are skipped), else the weight's. fwd: the backend's add_rms_norm
    (triton_backend's signature), bwd: its rms_norm_backward taking residual_grad and dx_dtype
    (default: the twin above). Saves h_new only (the norm's x), as the unfused pair does.

    One kernel each way instead of the add, the norm, and in the backward the norm's, the sum of
    the two gradients of h_new and the cast of the branch's gradient (~1.0 -> 0.6 GB of traffic a
    layer at the 1.5B shape, ~0.1 ms)."""
    return _AddRMSNormFn.apply(h, out, weight, eps, u_dtype, fwd, bwd or add_rms_norm_backward)
