"""FLOPs per trained token and the device's peak, for the MFU figure of the progress bar.

Training costs 3x the forward pass (forward, and a backward of twice its cost). The forward of a
Falcon Mamba layer per token: 2 FLOPs per weight of in_proj, x_proj, dt_proj and out_proj, plus the
conv (2 K D) and the scan (about 6 D N: exp, decay, input, readout); the lm_head adds 2 H V. The
embedding lookup costs nothing.
"""

from __future__ import annotations

import torch

from falcon_mamba.config import ModelConfig

# Dense bf16 tensor-core peaks (spec sheets), TFLOP/s.
_PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def mamba_flops_per_token(c: ModelConfig) -> float:
    H, D, N, R, K, V = (c.hidden_size, c.intermediate_size, c.state_size, c.time_step_rank,
                        c.conv_kernel, c.vocab_size)
    matmul = 2 * (H * 2 * D + D * (R + 2 * N) + R * D + D * H)
    layer = matmul + 2 * K * D + 6 * D * N
    return 3.0 * (c.num_hidden_layers * layer + 2 * H * V)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """The training FLOPs per token of ``model`` (its own ``flops_per_token`` when it has one)."""
    own = getattr(model, "flops_per_token", None)
    if callable(own):
        return float(own(seq_len))
    return mamba_flops_per_token(model.config)


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """The device's peak FLOP/s, or None when unknown (then MFU is not shown)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAKS.items():
        if key in name:
            return tflops * 1e12
    return None
