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
