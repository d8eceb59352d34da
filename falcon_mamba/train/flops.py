"""FLOPs per trained token and the device's peak, for the MFU figure of the log and the progress bar.

Training costs 3x the forward pass (forward, and a backward of twice its cost). The forward of a
Falcon Mamba layer per token: 2 FLOPs per weight of in_proj, x_proj, dt_proj and out_proj, plus the
conv (2 K D) and the scan (about 6 D N: exp, decay, input, readout); the lm_head adds 2 H V. The
embedding lookup costs nothing.
"""

from __future__ import annotations

import torch

from falcon_mamba.config import ModelConfig


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


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192,
                         reps: int = 9) -> float:
    """The FLOP/s of an n x n x n matmul in ``dtype`` on ``device``: the median of ``reps`` timed
    runs after two warm-ups (ENGINEERING.md: 774-777 TFLOP/s in bf16 on the H200)."""
    import time

    g = torch.Generator(device).manual_seed(0)  # its own generator: the run's RNG streams are untouched
    x = torch.randn(n, n, dtype=dtype, device=device, generator=g)
    y = torch.randn(n, n, dtype=dtype, device=device, generator=g)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    times = []
    for i in range(reps + 2):
        sync(device)
        t0 = time.perf_counter()
        x @ y
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    times.sort()
    return 2.0 * n ** 3 / times[len(times) // 2]


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> tuple[float | None, str]:
    """(the FLOP/s that MFU divides by, or None when there is none; what it is, for the log):
    ``override_tflops`` when given, else the bf16 matmul rate measured now on a CUDA device (a
    figure the GPU reaches, where a spec sheet's dense peak is ~25% above it), else none."""
    if override_tflops > 0:
        return override_tflops * 1e12, f"peak_tflops={override_tflops:g} (given)"
    if device.type != "cuda":
        return None, "none on the CPU (set peak_tflops=... for an MFU figure)"
    rate = measure_matmul_flops(device)
    return rate, f"the bf16 matmul rate measured at the start, {rate / 1e12:.0f} TFLOP/s (peak_tflops=0)"
