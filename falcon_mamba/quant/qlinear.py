"""QuantLinear: a drop-in for nn.Linear whose weight is stored int8 or int4 (formats.py).

Its state-dict keys sit under the replaced module's name (``...in_proj.qweight``, ``.scales``,
``.zeros``, ``.bias``), so a quantized folder keeps the HF key layout. The forward computes in the
activation dtype:
- CUDA with Triton, up to DOT_MAX_M rows: the fused kernels of triton_qmm.py (no dense weight);
- otherwise (CPU, long prompts, FALCON_MAMBA_BACKEND=torch|reference): dequantise, then F.linear.

Legend: M rows, N out features, K in features.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn as nn
import torch.nn.functional as F

from falcon_mamba.quant import formats


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _use_kernels(x: torch.Tensor, rows: int) -> bool:
    if not x.is_cuda or not _triton_available():
        return False
    from falcon_mamba import ops

    # The user's backend override also governs these kernels: "torch"/"reference" mean plain torch.
    if getattr(ops, "_override", None) in ("torch", "reference"):
        return False
    from falcon_mamba.quant.triton_qmm import DOT_MAX_M

    return rows <= DOT_MAX_M


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bits: int, group_size: int | None, in_features: int) -> torch.Tensor:
    """x (..., K) -> (..., N) in x's dtype, for a weight in the formats.py layout."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if _use_kernels(x2, x2.shape[0]):
        from falcon_mamba.quant.triton_qmm import qmatmul

        y = qmatmul(x2.contiguous(), qweight, scales, zeros, bits, group_size, in_features)
    else:
        w = formats.dequantize(qweight, scales, zeros, bits, group_size, in_features, x.dtype)
        y = F.linear(x2, w)
    return y.reshape(*lead, qweight.shape[0])


@torch.library.custom_op("falcon_mamba::quant_matmul", mutates_args=())
def _quant_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor | None, bits: int, group_size: int,
                     in_features: int) -> torch.Tensor:
    return quant_matmul(x, qweight, scales, zeros, bits, group_size or None, in_features)


@_quant_matmul_op.register_fake
def _(x, qweight, scales, zeros, bits, group_size, in_features):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


class QuantLinear(nn.Module):
    """y = x @ W^T (+ bias) with W quantized. ``bias_in_forward=False`` mirrors a linear whose bias is
    applied elsewhere (dt_proj: the bias is added in fp32 inside the scan)."""

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int | None,
                 bias: bool = False, bias_in_forward: bool = True, device=None):
        super().__init__()
        if bits not in formats.BITS:
            raise ValueError(f"bits must be one of {formats.BITS}, got {bits}")
        if bits == 4 and group_size not in formats.GROUP_SIZES:
            raise ValueError(f"group_size must be one of {formats.GROUP_SIZES}, got {group_size}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size if bits == 4 else None
        self.bias_in_forward = bias_in_forward
        for name, (shape, dtype) in formats.buffer_shapes(out_features, in_features, bits,
                                                          self.group_size).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
        if bits == 8:
            self.register_buffer("zeros", None)
        # The dtype ``.weight`` is materialised in; quantize_model / load_quantized set the model's.
        self.act_dtype = torch.float32
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None,
                    bias_in_forward: bool = True) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, bits=bits, group_size=group_size,
                bias=linear.bias is not None, bias_in_forward=bias_in_forward, device=linear.weight.device)
        for name, t in formats.quantize_weight(linear.weight, bits, q.group_size).items():
            getattr(q, name).copy_(t)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone())
        return q

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return formats.dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                  self.in_features, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (dequantised on each access, in the scales' precision) for code that
        reads ``.weight`` directly. Correct but slow: the forward never uses it."""
        return self.dequantized_weight(self.act_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # one opaque op for torch.compile (Triton launch inside)
            y = _quant_matmul_op(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size or 0,
                                 self.in_features)
        else:
            y = quant_matmul(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                             self.in_features)
        if self.bias is not None and self.bias_in_forward:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}{g}, bias={self.bias is not None}")
