"""Reference twins of the fused decode ops (plain PyTorch, built from ``reference``).

Legend: B batch, D inner width, N state size, R dt rank, H hidden, E = R + 2N.

These are the spec the Triton decode kernels (triton_decode.py) are tested against, written as the
model's layer-by-layer decode computes it (MambaMixer._ssm_inputs + ops.ssm_step; FalconMamba.step's
residual add and norms), so the fused path can be checked against the plain one op for op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from falcon_mamba.ops import reference


def mixer_ssm_step(state_BDN, x_BD, z_BD, xdbl_BE, W_dt_DR, dt_bias_D, A_log_DN, D_D,
                   norm_eps: float | None) -> torch.Tensor:
    """The decode tail of a mixer, from the x_proj output to the gated y.

    xdbl_BE = x_proj(x) = [dt_r (R), B (N), C (N)]; with norm_eps set the three go through the
    weightless RMSNorm (Falcon Mamba); dt = dt_r @ W_dt^T (no bias, model dtype); A = -exp(A_log);
    then one scan step with the dt bias + softplus in fp32. Updates state_BDN (fp32) in place and
    returns y (B, D) in x's dtype.
    """
    R, N = W_dt_DR.shape[1], A_log_DN.shape[1]
    dt_r, Bm, Cm = torch.split(xdbl_BE, [R, N, N], dim=-1)
    if norm_eps is not None:
        dt_r = reference.rms_norm(dt_r, None, norm_eps)
        Bm = reference.rms_norm(Bm, None, norm_eps)
        Cm = reference.rms_norm(Cm, None, norm_eps)
    dt = F.linear(dt_r, W_dt_DR)
    A = -torch.exp(A_log_DN.float())
    return reference.ssm_step(state_BDN, x_BD, dt, A, Bm, Cm, None if D_D is None else D_D.float(),
                              z_BD, None if dt_bias_D is None else dt_bias_D.float())


def add_rms_norm(h_BH, out_BH, weight_H, eps, *, round_to, h_out=None, out_dtype=None):
    """Residual add then RMSNorm, as FalconMamba.step does between blocks.

    s = h.float() + out (out None: just h.float()); written to h_out (fp32) when given. A block
    norm (round_to = the weight dtype) sees s rounded to that dtype and rounds rms(s) back to it
    before the weight; norm_f (round_to None) reads the fp32 stream. Returns the normed rows in
    out_dtype (default: the weight's dtype).
    """
    s = h_BH.float() if out_BH is None else h_BH.float() + out_BH
    if h_out is not None:
        h_out.copy_(s)
    y = reference.rms_norm(s if round_to is None else s.to(round_to), weight_H, eps)
    return y.to(out_dtype or weight_H.dtype)
