"""A transformers mixer's decode step (one new token per row, from its cache) in five launches.

Why: measured on the H200 (results/h200-hf-accelerate-ff2030d.json), transformers' generate
decodes the 7B at 11.9 tok/s at batch 1, ~1.3 ms per layer per token, and routing its five kernel
hook points to our ops changed nothing (9.8 tok/s): the time is the host's, ~25 small launches and
their Python per layer (transformers' mixer code between the hook points: the split, the three
B/C/dt norms, dt_proj, exp(A_log), casts, the mask). A decode step of a mixer is instead:

    in_proj (one GEMM)  ->  conv step on the cache's conv state, in place (one kernel)
    ->  x_proj (one GEMM)  ->  the fused SSM step: B/C/dt norms, dt_proj, softplus, the state
    update on the cache's recurrent state in place, D skip, gate (one kernel)  ->  out_proj

the same kernels as our own decode (ops/triton_decode.py), on transformers' cache tensors as they
are: the conv state (B, D, S) is read and shifted in its own layout
(triton_decode.conv_step_channels_first), the recurrent state (B, D, N) fp32 is updated where it
lies. Same math as transformers' path (the same order of roundings as our model, which matches
it: tests/test_parity.py); its cache holds the same values after the step.

``decode_states`` finds a decode step and its cache tensors in the mixer's arguments, for the two
cache APIs of the tested transformers versions; anything else (prefill, a training forward, a
cache in another dtype, a quantized or adapter-wrapped dt_proj, the CPU) returns None and the
mixer runs transformers' own forward, with the hook points routed to our ops.

Legend: B rows, H hidden, D inner width, N state size, S conv state slots, R dt rank.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _kernel_device(t: torch.Tensor) -> bool:
    """Where the decode kernels run: CUDA (tests also run them in Triton's interpreter on the CPU)."""
    return t.device.type == "cuda"


def _cache_tensors(mixer, cache) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(conv state (B, D, S), recurrent state (B, D, N)) of this layer when the cache holds a
    previous state the next token continues, else None."""
    i = mixer.layer_idx
    if hasattr(cache, "get_conv_state"):  # transformers 5.24, 5.25: LinearAttention cache layers
        if cache.is_recording_past(i):
            return None
        conv, ssm = cache.get_conv_state(i, state_idx=0), cache.get_recurrent_state(i, state_idx=0)
    elif hasattr(cache, "has_previous_state") and hasattr(cache, "layers"):  # transformers 5.17
        if not cache.has_previous_state(i) or cache.layers[i].record_past:
            return None
        layer = cache.layers[i]
        conv, ssm = layer.conv_states[0], layer.recurrent_states[0]
    else:
        return None
    if conv is None or ssm is None:
        return None
    return conv, ssm


def _fusable(mixer, hidden: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor) -> bool:
    D = mixer.intermediate_size
    dt = mixer.dt_proj
    return (_kernel_device(hidden) and not mixer.training and not torch.is_grad_enabled()
            and mixer.activation in ("silu", "swish")
            and type(dt) is nn.Linear and dt.bias is not None  # an adapter or quantized one: theirs
            and not hasattr(mixer.config, "_is_quantized")
            and ssm.dtype == torch.float32 and ssm.is_contiguous()
            and ssm.shape[1:] == (D, mixer.ssm_state_size)
            and conv.dim() == 3 and conv.shape[1] == D and conv.shape[2] >= mixer.conv_kernel_size - 1
            and conv.shape[0] == ssm.shape[0] == hidden.shape[0])


def decode_states(mixer, hidden: torch.Tensor, args: tuple, kwargs: dict):
    """(conv state, recurrent state, attention mask, cache) when this call of ``mixer.forward`` is a decode
    step our kernels take, else None. hidden (B, L, H); the cache and the mask come as transformers
    passes them (5.17: cache_params=, 5.24: cache=; positionally after hidden_states)."""
    if hidden.dim() != 3 or hidden.shape[1] != 1:
        return None
    cache = kwargs.get("cache", kwargs.get("cache_params", args[0] if args else None))
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if cache is None:
        return None
    found = _cache_tensors(mixer, cache)
    if found is None or not _fusable(mixer, hidden, *found):
        return None
    return found[0], found[1], mask, cache


def count_token(cache, layer_idx: int) -> None:
    """After a decode step on the cache's tensors: transformers 5.25 counts each decoded token in
    the cache (its own decode path calls increase_count; the cache's sequence length reads it);
    earlier versions count in update calls this path does not make, or not at all."""
    if hasattr(cache, "increase_count"):
        cache.increase_count(layer_idx, 0)


def mixer_decode(mixer, hidden_B1H: torch.Tensor, conv_BDS: torch.Tensor, ssm_BDN: torch.Tensor,
                 mask=None, mask_fn=None) -> torch.Tensor:
    """One token through a transformers FalconMamba / Mamba mixer: hidden (B, 1, H) -> (B, 1, H).
    Updates conv_BDS and ssm_BDN in place, as transformers' forward does. mask (B, 1) with
    mask_fn (the modeling module's apply_mask_to_padding_states): applied where transformers does."""
    from falcon_mamba.ops import triton_backend, triton_decode

    D = mixer.intermediate_size
    if mask is not None and mask_fn is not None:
        hidden_B1H = mask_fn(hidden_B1H, mask)
    xz = mixer.in_proj(hidden_B1H[:, 0])  # (B, 2D): [x, gate]
    w = mixer.conv1d.weight[:, 0]
    w = w if w.stride(1) == 1 else w.contiguous()
    xc = triton_decode.conv_step_channels_first(conv_BDS, xz[:, :D], w,
                                                mixer.conv1d.bias if mixer.use_conv_bias else None)
    if mask is not None and mask_fn is not None:
        xc = mask_fn(xc[:, None], mask)[:, 0].contiguous()
    xdbl = mixer.x_proj(xc)  # (B, R + 2N)
    eps = getattr(mixer, "rms_eps", None)  # FalconMamba's B/C/dt norms; plain Mamba has none
    y = triton_backend.mixer_ssm_step(ssm_BDN, xc, xz[:, D:], xdbl, mixer.dt_proj.weight, mixer.dt_proj.bias,
                                      mixer.A_log, mixer.D, eps)
    return mixer.out_proj(y.to(hidden_B1H.dtype))[:, None]
