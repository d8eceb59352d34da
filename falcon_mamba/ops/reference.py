"""Reference implementations of every op: plain PyTorch, fp32 math, one time step at a time.

This file is the spec. Every fast backend (chunked torch on the CPU, Triton on CUDA) has a twin of
each function here with the same signature, and is tested against it on random inputs.

Legend: B batch, L length, D inner width (intermediate_size), N state size, K conv width.
Activations are laid out (B, L, D): a time step's channels are contiguous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32 and cast back to x.dtype, then times weight.

    weight=None is the weightless norm Falcon Mamba applies to dt, B and C. With a weight the result
    is ``weight * rms(x)`` in the promoted dtype (HF's order: cast back first, then multiply).
    """
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else weight * y


def softplus(x: torch.Tensor) -> torch.Tensor:
    """softplus with threshold 20, as the CUDA kernels compute it (identity above 20)."""
    return F.softplus(x, beta=1.0, threshold=20.0)


def causal_conv1d(
    x_BLD: torch.Tensor,
    weight_DK: torch.Tensor,
    bias_D: torch.Tensor | None,
    conv_state_BKD: torch.Tensor | None = None,
    silu: bool = True,
    reset_BL: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv1d over the length, optionally followed by silu.

    y[b, t, d] = sum_k weight[d, k] * x[b, t - (K-1) + k, d] + bias[d]; weight[:, K-1] multiplies
    the current token. Positions before the start come from ``conv_state_BKD`` (B, K-1, D), the last
    K-1 pre-conv inputs of the previous chunk (zeros when None).
    ``reset_BL`` (B, L) bool, True at the first token of a new document (packed training rows): the
    conv sees zeros for every position before the latest reset at or before t, the conv state
    included, so nothing crosses a document boundary. None means no resets.
    Returns (y_BLD in x's dtype, new conv state (B, K-1, D) = the last K-1 inputs, x's dtype; with
    resets, the entries before the last document start are zero).
    """
    Bsz, L, D = x_BLD.shape
    K = weight_DK.shape[1]
    if conv_state_BKD is None:
        conv_state_BKD = x_BLD.new_zeros(Bsz, K - 1, D)
    xx = torch.cat([conv_state_BKD.to(x_BLD.dtype), x_BLD], dim=1).float()  # (B, K-1+L, D)
    w = weight_DK.float()
    t_L = torch.arange(L, device=x_BLD.device)
    if reset_BL is not None:
        # start[b, t]: position of the latest reset at or before t; -(K-1) (the whole state) if none.
        start_BL = torch.where(reset_BL, t_L, -(K - 1)).cummax(dim=1).values
    y = torch.zeros(Bsz, L, D, dtype=torch.float32, device=x_BLD.device)
    for k in range(K):
        tap = xx[:, k:k + L, :] * w[:, k]
        if reset_BL is not None:  # tap k reads position t - (K-1) + k
            tap = tap * (t_L - (K - 1) + k >= start_BL).float()[:, :, None]
        y = y + tap
    if bias_D is not None:
        y = y + bias_D.float()
    if silu:
        y = F.silu(y)
    new_state = xx[:, L:, :].to(x_BLD.dtype).clone()
    if reset_BL is not None and L > 0:
        pos_K = torch.arange(L - (K - 1), L, device=x_BLD.device)  # positions the state holds
        new_state = new_state * (pos_K >= start_BL[:, -1:]).to(new_state.dtype)[:, :, None]
    return y.to(x_BLD.dtype), new_state


def selective_scan(
    x_BLD: torch.Tensor,
    dt_BLD: torch.Tensor,
    A_DN: torch.Tensor,
    B_BLN: torch.Tensor,
    C_BLN: torch.Tensor,
    D_D: torch.Tensor | None = None,
    z_BLD: torch.Tensor | None = None,
    dt_bias_D: torch.Tensor | None = None,
    state_BDN: torch.Tensor | None = None,
    reset_BL: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1 selective scan with an initial state in and the final state out.

    dt = softplus(dt + dt_bias) (fp32, threshold 20); per step t:
        h = exp(dt_t * A) * h + (dt_t * x_t)[:, None] * B_t[None, :]      (D, N)
        y_t = h @ C_t + D * x_t;  y_t *= silu(z_t) when z is given
    A is the (negative) continuous-time matrix, i.e. -exp(A_log). All math is in fp32; y is
    rounded once to x's dtype. state_BDN (fp32, zeros when None) is not modified.
    ``reset_BL`` (B, L) bool, True at the first token of a new document: the state before that token
    is dropped (h = 0 before the update; the initial state too when the reset is at t = 0), so no
    information crosses a document boundary in packed training rows. None means no resets.
    Returns (y_BLD, final state (B, D, N) fp32).
    """
    Bsz, L, D = x_BLD.shape
    N = A_DN.shape[1]
    x = x_BLD.float()
    dt = dt_BLD.float()
    if dt_bias_D is not None:
        dt = dt + dt_bias_D.float()
    dt = softplus(dt)
    A = A_DN.float()
    Bm = B_BLN.float()
    Cm = C_BLN.float()
    h = (x.new_zeros(Bsz, D, N) if state_BDN is None else state_BDN.float().clone())
    ys = []
    for t in range(L):
        if reset_BL is not None:
            h = torch.where(reset_BL[:, t, None, None], 0.0, h)
        dA = torch.exp(dt[:, t, :, None] * A)  # (B, D, N)
        dBx = (dt[:, t] * x[:, t])[:, :, None] * Bm[:, t, None, :]
        h = dA * h + dBx
        ys.append(torch.einsum("bdn,bn->bd", h, Cm[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(Bsz, 0, D)
    if D_D is not None:
        y = y + x * D_D.float()
    if z_BLD is not None:
        y = y * F.silu(z_BLD.float())
    return y.to(x_BLD.dtype), h


def conv_step(
    conv_state_BKD: torch.Tensor, x_BD: torch.Tensor, weight_DK: torch.Tensor,
    bias_D: torch.Tensor | None, silu: bool = True,
) -> torch.Tensor:
    """One token through the causal conv. Updates conv_state_BKD (B, K-1, D) IN PLACE (shift left,
    append x) and returns the conv output (B, D) in x's dtype."""
    y, new_state = causal_conv1d(x_BD[:, None, :], weight_DK, bias_D, conv_state_BKD, silu)
    conv_state_BKD.copy_(new_state)
    return y[:, 0]


def ssm_step(
    state_BDN: torch.Tensor, x_BD: torch.Tensor, dt_BD: torch.Tensor, A_DN: torch.Tensor,
    B_BN: torch.Tensor, C_BN: torch.Tensor, D_D: torch.Tensor | None, z_BD: torch.Tensor | None,
    dt_bias_D: torch.Tensor | None,
) -> torch.Tensor:
    """One token of the selective scan. Updates state_BDN (fp32) IN PLACE; returns y (B, D) in
    x's dtype. Same math as selective_scan with L = 1."""
    y, h = selective_scan(x_BD[:, None], dt_BD[:, None], A_DN, B_BN[:, None], C_BN[:, None],
                          D_D, None if z_BD is None else z_BD[:, None], dt_bias_D, state_BDN)
    state_BDN.copy_(h)
    return y[:, 0]
