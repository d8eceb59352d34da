"""The mixer's training step as one autograd Function (the idea of mamba_ssm's MambaInnerFn with
checkpoint_lvl=1): it keeps only what the backward cannot cheaply recompute.

Legend: B batch, L length, H hidden, D inner width, N state size, R dt rank, K conv taps,
E = R + 2N (x_proj's output), CHK the scan's saved-state interval (triton_scan.CHK).

Forward, as MambaMixer.forward on the triton backend (same kernels, same casts):
    xz = in_proj(u) (B, L, 2D) = [x, z];  xc = silu(conv(x)) (B, L, D);  xdbl = x_proj(xc) (B, L, E)
    [dt_r, B, C] = xdbl (rms-normed when bcdt_rms);  dt = dt_proj(dt_r) (B, L, D)
    y = scan(xc, dt, A, B, C, D, z) (B, L, D);  out = out_proj(y) (B, L, H)
Saved: u (in the matmul dtype), xz, xdbl, the scan's states every CHK steps (fp32), reset, weights.
Recomputed in the backward: xc (the conv forward: one read of x), the norms and dt (a rank-R
matmul), and y, written by the scan backward's pass 3 on the way (scan_bwd(y_out=...)), so that
out_proj's weight gradient dout^T y is taken after the scan backward; the scan's output gradient
dout @ W_out does not need y.

Bytes autograd keeps per token per layer (activations; weights, and the reset mask shared by the
layers, left out), with a the matmul dtype's size (2 under bf16 autocast):
    unfused   a (H + 2D + D + E + [R + 2N] + D + D) + 4 D N / CHK
              u, xz, xc, xdbl, the normed dt_r/B/C (bcdt_rms), dt, y, states
    fused     a (H + 2D + E) + 4 D N / CHK
At the ~1.5B shape (H 2048, D 4096, N 16, R 128, bcdt_rms, CHK 128, bf16): 47,744 -> 22,848 bytes,
24,896 fewer; x 16,384 tokens x 48 layers: 35.0 -> 16.7 GiB, 18.2 GiB saved (of a 63.2 GiB peak).
(The block norm's fp32 input, 4H = 8 KiB per token per layer, 6 GiB in all, is kept outside the
mixer either way.) The unfused path also
keeps two (D, N) fp32 copies of A and, under autocast, bf16 copies of the four projection weights;
this one casts the weights again in the backward instead. ``saved_bytes`` gives both counts.

Autocast: the matmul dtype is autocast's where it is on, else u's; the weights are cast to it
explicitly (as autocast would), A, D, the dt bias and the scan math stay fp32, and the backward
runs with autocast off on those explicit dtypes. Gradients are rounded as autograd through the
unfused path rounds them (bf16 matmul outputs, summed in bf16 where two paths meet).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from falcon_mamba.ops import triton_backend, triton_scan
from falcon_mamba.ops.triton_conv import conv_backward, conv_fwd, final_state
from falcon_mamba.ops.triton_norm_bwd import rms_norm_backward


def saved_bytes(batch: int, length: int, H: int, D: int, N: int, R: int, bcdt_rms: bool,
                itemsize: int, chk_every: int | None = None) -> dict[str, int]:
    """The activation bytes autograd keeps for one mixer's training forward: {"unfused": ...,
    "fused": ...} (the module docstring's formulas; weights and the reset mask left out)."""
    tokens = batch * length
    E = R + 2 * N
    chk = batch * math.ceil(length / (chk_every or triton_scan.CHK)) * D * N * 4
    unfused = tokens * itemsize * (H + 2 * D + D + E + ((R + 2 * N) if bcdt_rms else 0) + D + D) + chk
    fused = tokens * itemsize * (H + 2 * D + E) + chk
    return {"unfused": unfused, "fused": fused}


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _ssm_inputs(xdbl, W_dt, R: int, N: int, norm_eps: float | None):
    """xdbl (B, L, E) -> (dt (B, L, D) without its bias, [dt_r, B, C] as the scan and dt_proj see
    them, [dt_r, B, C] before the norms)."""
    raw = torch.split(xdbl, [R, N, N], -1)
    normed = raw if norm_eps is None else tuple(triton_backend.rms_norm(t, None, norm_eps) for t in raw)
    return F.linear(normed[0], W_dt), normed, raw


class MixerFn(torch.autograd.Function):
    """(u (B, L, H), weights, reset (B, L) bool or None) -> (out (B, L, H) in the matmul dtype,
    conv state (B, K-1, D), ssm state (B, D, N) fp32), both final states differentiable."""

    @staticmethod
    def forward(ctx, u, W_in, b_in, w_conv, b_conv, W_x, W_dt, dt_bias, A_log, Dv, W_out, b_out,
                reset, R: int, N: int, norm_eps: float | None, mm_dtype: torch.dtype):
        mm = lambda t: None if t is None else t.to(mm_dtype)
        u_m = u.to(mm_dtype)
        xz = F.linear(u_m, mm(W_in), mm(b_in))
        D = xz.shape[-1] // 2
        x, z = xz[..., :D], xz[..., D:]
        xc = conv_fwd(x, w_conv, b_conv, None, True, reset)
        xdbl = F.linear(xc, mm(W_x))
        dt, (_, Bn, Cn), _ = _ssm_inputs(xdbl, mm(W_dt), R, N, norm_eps)
        A = -torch.exp(A_log.float())
        y, hT, chk = triton_scan.scan_fwd(xc, dt, A, Bn, Cn, Dv.float(), z, dt_bias.float(), None,
                                          reset, save_chk=True)
        out = F.linear(y, mm(W_out), mm(b_out))
        conv_state = final_state(x, None, reset, w_conv.shape[1])
        ctx.save_for_backward(u_m, xz, xdbl, chk, reset, W_in, b_in, w_conv, b_conv, W_x, W_dt,
                              dt_bias, A_log, Dv, W_out, b_out)
        ctx.dims = (R, N, norm_eps, mm_dtype, u.dtype, triton_scan.CHK)  # tests change CHK
        ctx.set_materialize_grads(False)  # training drops the final states: their grads stay None
        return out, conv_state, hT

    @staticmethod
    def backward(ctx, dout, dconv_state, dssm_state):
        (u_m, xz, xdbl, chk, reset, W_in, b_in, w_conv, b_conv, W_x, W_dt, dt_bias, A_log, Dv,
         W_out, b_out) = ctx.saved_tensors
        R, N, norm_eps, mm_dtype, u_dtype, chk_every = ctx.dims
        need = ctx.needs_input_grad
        with torch.autocast(u_m.device.type, enabled=False):  # every dtype below is explicit
            D = xz.shape[-1] // 2
            x, z = xz[..., :D], xz[..., D:]
            xc = conv_fwd(x, w_conv, b_conv, None, True, reset)
            W_dt_m, W_x_m, W_out_m = W_dt.to(mm_dtype), W_x.to(mm_dtype), W_out.to(mm_dtype)
            dt, (dt_rn, Bn, Cn), (dt_r, Bm, Cm) = _ssm_inputs(xdbl, W_dt_m, R, N, norm_eps)
            eA = torch.exp(A_log.float())
            if dout is None:
                dout = torch.zeros(*xz.shape[:-1], W_out.shape[0], dtype=mm_dtype, device=xz.device)
            dout = dout.to(mm_dtype).contiguous()
            # out_proj: its input gradient now, its weight gradient once the scan has rebuilt y
            dy = dout @ W_out_m
            y = torch.empty_like(xc)
            dxz = torch.empty_like(xz)  # the conv backward and the scan's dz write its halves
            dxc, ddt, dA, dB, dC, dD, _, ddtb, _ = triton_scan.scan_bwd(
                xc, dt, -eA, Bn, Cn, Dv.float(), z, dt_bias.float(), reset, chk, dy, dssm_state,
                chk_every, y_out=y, dz_out=dxz[..., D:])
            del dy, dt, Bn, Cn  # not needed past the scan
            dW_out = (_flat(dout).t() @ _flat(y)).to(W_out.dtype) if need[10] else None
            db_out = _flat(dout).sum(0).to(b_out.dtype) if b_out is not None and need[11] else None
            del y
            # dt_proj, the weightless dt/B/C norms (one Triton pass each, written into their
            # slices of x_proj's output gradient), x_proj
            dW_dt = (_flat(ddt).t() @ _flat(dt_rn)).to(W_dt.dtype) if need[6] else None
            dgrads = (ddt @ W_dt_m, dB, dC)  # dB, dC fp32: rounded to x's dtype as .to() would
            dxdbl = torch.empty_like(xdbl)
            for raw, g, part in zip((dt_r, Bm, Cm), dgrads, torch.split(dxdbl, [R, N, N], -1)):
                if norm_eps is not None:
                    rms_norm_backward(raw, None, norm_eps, g, True, False, dx_out=part)
                else:
                    part.copy_(g)
            dW_x = (_flat(dxdbl).t() @ _flat(xc)).to(W_x.dtype) if need[5] else None
            # the conv output feeds the scan and x_proj: x_proj's input gradient is added by the
            # matmul itself (C = C + A B in its epilogue, one rounding), not by another pass
            _flat(dxc).addmm_(_flat(dxdbl), W_x_m)
            del xc, dxdbl
            _, dw_conv, db_conv, _ = conv_backward(x, w_conv, b_conv, None, reset, True, dxc,
                                                   dconv_state, dx_out=dxz[..., :D])
            del dxc
            # in_proj
            dW_in = (_flat(dxz).t() @ _flat(u_m)).to(W_in.dtype) if need[1] else None
            db_in = _flat(dxz).sum(0).to(b_in.dtype) if b_in is not None and need[2] else None
            du = (dxz @ W_in.to(mm_dtype)).to(u_dtype) if need[0] else None
            dA_log = ((-dA) * eA).to(A_log.dtype)  # A = -exp(A_log), as autograd differentiates it
        return (du, dW_in, db_in, dw_conv, db_conv if b_conv is not None else None, dW_x, dW_dt,
                ddtb.to(dt_bias.dtype), dA_log, dD.to(Dv.dtype), dW_out, db_out,
                None, None, None, None, None)


def mixer_forward(mixer, u_BLH: torch.Tensor, reset_BL: torch.Tensor | None):
    """MambaMixer.forward(u, None, None, reset_BL) through MixerFn: (out (B, L, H), conv state
    (B, K-1, D), ssm state (B, D, N) fp32). The mixer's projections must be plain nn.Linear (the
    caller checks: a LoRA- or quant-wrapped one goes through the unfused path)."""
    c = mixer.config
    dev = u_BLH.device.type
    mm_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else u_BLH.dtype
    return MixerFn.apply(
        u_BLH, mixer.in_proj.weight, mixer.in_proj.bias, mixer.conv1d.weight[:, 0], mixer.conv1d.bias,
        mixer.x_proj.weight, mixer.dt_proj.weight, mixer.dt_proj.bias, mixer.A_log, mixer.D,
        mixer.out_proj.weight, mixer.out_proj.bias, reset_BL, c.time_step_rank, c.state_size,
        c.mixer_rms_eps if c.bcdt_rms else None, mm_dtype)
