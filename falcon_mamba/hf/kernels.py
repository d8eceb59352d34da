"""Our ops behind transformers' kernel names, with the signatures of mamba_ssm and causal_conv1d.

transformers 5.x (``modeling_falcon_mamba.py``, ``modeling_mamba.py``) sends the mixer's sequence
work through five module-level functions (four in 5.25's FalconMamba, which has no
mamba_inner_fn), each declared with ``use_kernel_func_from_hub_with_fallback(name, package)``:
the Hub kernel when asked for, else the package (mamba_ssm, causal_conv1d) when installed, else a
torch fallback. The functions here are
drop-in implementations of those five, on ``falcon_mamba.ops`` (Triton on CUDA, the chunked torch
scan on the CPU; see ``falcon_mamba.ops`` for the backend choice), differentiable where the op is:

    transformers name               what it is                       here
    causal_conv1d_fn                causal_conv1d.causal_conv1d_fn   ops.causal_conv1d
    causal_conv1d_update            causal_conv1d.causal_conv1d_update   ops.causal_conv1d + state shift
    mamba_selective_scan            mamba_ssm selective_scan_fn      ops.selective_scan
    mamba_selective_state_update    mamba_ssm selective_state_update ops.ssm_step
    mamba_inner_fn                  mamba_ssm mamba_inner_fn         returns None (see its docstring)

They take the CUDA kernels' layout, channels before time, (B, D, L); our ops take (B, L, D). The
tensors transformers passes are transposed views of (B, L, *) buffers (in_proj's output, x_proj's
output), so transposing back is free; only dt arrives (B, D, L)-contiguous (``dt_proj.weight @ dt``),
and the Triton scan copies it once.

Only the arguments transformers' mixers pass are implemented (softplus on, variable B/C of
shape (B, N, L), one SSM head, silu or no activation); anything else is a UserError that says so,
never a silent different result.

Legend: B batch, L length, D inner width, N state size, K conv width, S conv state length (>= K-1).
"""

from __future__ import annotations

import torch

from falcon_mamba import ops
from falcon_mamba.errors import UserError

_ACTIVATIONS = {None: False, "silu": True, "swish": True}


def _silu(activation: str | None) -> bool:
    if activation not in _ACTIVATIONS:
        raise UserError(f"falcon_mamba.hf: the conv activation {activation!r} is not implemented by our "
                        "ops (silu or none); leave this model unaccelerated")
    return _ACTIVATIONS[activation]


def _refuse(fn: str, **given) -> None:
    """UserError for arguments outside what our ops implement (transformers does not pass them)."""
    bad = [k for k, v in given.items() if v is not None and v is not False]
    if bad:
        raise UserError(f"falcon_mamba.hf: {fn} was called with {', '.join(bad)}, which our ops do not "
                        "implement; this transformers version is not supported by accelerate()")


def causal_conv1d_fn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     activation: str | None = None, seq_idx=None, initial_states=None,
                     return_final_states: bool = False, **kwargs) -> torch.Tensor:
    """Causal depthwise conv over the length from a zero state: x (B, D, L), weight (D, K), bias (D)
    -> y (B, D, L) in x's dtype (fp32 arithmetic). ``weight[:, K-1]`` multiplies the current token."""
    _refuse("causal_conv1d_fn", seq_idx=seq_idx, initial_states=initial_states,
            return_final_states=return_final_states, **kwargs)
    y_BLD, _ = ops.causal_conv1d(x.transpose(1, 2), weight, bias, None, _silu(activation))
    return y_BLD.transpose(1, 2)


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None = None, activation: str | None = None,
                         cache_seqlens=None, conv_state_indices=None) -> torch.Tensor:
    """Continue the conv from its state: x (B, D) or (B, D, L) new inputs, conv_state (B, D, S) the
    last S pre-conv inputs (S >= K-1; transformers keeps S = K), weight (D, K). Returns y shaped
    like x and shifts the new inputs into conv_state IN PLACE, as causal_conv1d_update does."""
    _refuse("causal_conv1d_update", cache_seqlens=cache_seqlens, conv_state_indices=conv_state_indices)
    K, S = weight.shape[1], conv_state.shape[-1]
    if S < K - 1:
        raise UserError(f"falcon_mamba.hf: a conv state of {S} columns cannot feed a {K}-tap conv")
    x_BDL = x[..., None] if x.dim() == 2 else x
    state_BKD = conv_state[:, :, S - (K - 1):].transpose(1, 2)  # our ops' state: the last K-1 inputs
    y_BLD, _ = ops.causal_conv1d(x_BDL.transpose(1, 2), weight, bias, state_BKD, _silu(activation))
    conv_state.copy_(torch.cat([conv_state, x_BDL.to(conv_state.dtype)], -1)[:, :, -S:])
    y_BDL = y_BLD.transpose(1, 2)
    return y_BDL[..., 0] if x.dim() == 2 else y_BDL


def selective_scan_fn(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                      delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                      return_last_state: bool = False, use_mambapy: bool = False,
                      use_associative_scan: bool = False):
    """Mamba-1 selective scan from a zero state (mamba_ssm's selective_scan_fn): u, delta, z
    (B, D, L); A (D, N) (negative: -exp(A_log)); B, C (B, N, L); D, delta_bias (D).
    dt = softplus(delta + delta_bias) in fp32, h_t = exp(dt A) h + dt u_t B_t, y_t = C_t h_t + D u_t,
    y *= silu(z). Returns y (B, D, L) in u's dtype, and with return_last_state also the final state
    (B, D, N) fp32. use_mambapy / use_associative_scan choose among transformers' torch fallbacks
    and do not apply here."""
    if not delta_softplus:
        _refuse("selective_scan_fn", **{"delta_softplus=False": True})
    if B.dim() != 3 or C.dim() != 3:
        _refuse("selective_scan_fn", **{"B/C not of shape (B, N, L)": True})
    y_BLD, h_BDN = ops.selective_scan(
        u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
        None if D is None else D.float(), None if z is None else z.transpose(1, 2),
        None if delta_bias is None else delta_bias.float())
    y_BDL = y_BLD.transpose(1, 2)
    return (y_BDL, h_BDN) if return_last_state else y_BDL


def selective_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                           B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
                           z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                           dt_softplus: bool = False, state_batch_indices=None) -> torch.Tensor:
    """One token of the scan (mamba_ssm's selective_state_update): state (B, D, N), x, dt, z
    (B, D), A (D, N), B, C (B, N), D, dt_bias (D). Updates state IN PLACE and returns y (B, D) in
    x's dtype. transformers' cache holds the state in fp32 (the scan's final state is what it
    stores), which the Triton step kernel needs; another dtype runs the reference step (same math)."""
    if not dt_softplus:
        _refuse("selective_state_update", **{"dt_softplus=False": True})
    if state.dim() != 3:
        _refuse("selective_state_update", **{"a multi-head state": True})
    _refuse("selective_state_update", state_batch_indices=state_batch_indices)
    return ops.ssm_step(state, x, dt, A, B, C, None if D is None else D.float(), z,
                        None if dt_bias is None else dt_bias.float())


def mamba_inner_fn(*args, **kwargs) -> None:
    """Always None, which makes transformers' mixer run its unfused path (the conv and scan above,
    then out_proj), as it does with its own torch fallback. Why not a fused version: the fused
    CUDA kernel transformers would call here for Falcon Mamba normalises dt after dt_proj, over the
    D channels, where every inference path (transformers' torch path included) normalises it in
    the rank space before dt_proj (REFERENCE.md section 3); matching the torch path keeps training
    and inference the same model."""
    return None


# transformers' module-level name -> our implementation: every tested version has these four...
HOOKS = {
    "causal_conv1d_fn": causal_conv1d_fn,
    "causal_conv1d_update": causal_conv1d_update,
    "mamba_selective_scan": selective_scan_fn,
    "mamba_selective_state_update": selective_state_update,
}
# ...and these where the module has them (5.25's FalconMamba mixer dropped mamba_inner_fn, Mamba's kept it)
OPTIONAL_HOOKS = {"mamba_inner_fn": mamba_inner_fn}
