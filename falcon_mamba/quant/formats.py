"""Weight-only quantization formats: quantize a dense weight, dequantize it back. Pure torch.

Legend: N output features (rows), K input features, G group size, Kp = K rounded up to G, Gn = Kp / G.

int8, per output channel, symmetric:
    qweight int8 (N, K) in [-127, 127];  scales fp32 (N,);  w ~= qweight * scales[:, None]
int4, group-wise along K, asymmetric (zero point):
    qweight uint8 (N, Kp / 2): two codes per byte, the even k in the low nibble, the odd k in the high
    scales fp16 (N, Gn);  zeros uint8 (N, Gn) in [0, 15];  w ~= (code - zeros) * scales, per group
    K is padded with zeros up to a multiple of G, so odd widths (tiny test models) still quantize.

The int4 range always holds 0 (lo = min(w, 0), hi = max(w, 0)), so the zero point is an integer in
[0, 15] and a constant group cannot divide by zero. Each group's range is shrunk by the factor in
CLIP_RATIOS that gives the least squared error (clipping a few outliers lowers the error of all other
weights of the group); int8 is plain absmax, its error is already ~1/254 of the row's range.
"""

from __future__ import annotations

import torch

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)
INT4_SCALE_DTYPE = torch.float16  # 10-bit mantissa: finer than bf16 for the scale itself
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
_FP16_TINY = 2.0**-24  # smallest positive fp16: keeps a scale of an all-zero group non-zero


def padded_in_features(in_features: int, bits: int, group_size: int | None) -> int:
    """Kp: the stored width of K (int4 pads K to a multiple of the group size)."""
    if bits == 8:
        return in_features
    return -(-in_features // group_size) * group_size


def buffer_shapes(out_features: int, in_features: int, bits: int, group_size: int | None) -> dict:
    """name -> (shape, dtype) of the tensors a quantized linear stores."""
    N, K = out_features, in_features
    if bits == 8:
        return {"qweight": ((N, K), torch.int8), "scales": ((N,), torch.float32)}
    Kp = padded_in_features(K, bits, group_size)
    Gn = Kp // group_size
    return {"qweight": ((N, Kp // 2), torch.uint8), "scales": ((N, Gn), INT4_SCALE_DTYPE),
            "zeros": ((N, Gn), torch.uint8)}


def quantize_int8(w_NK: torch.Tensor) -> dict[str, torch.Tensor]:
    w = w_NK.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return {"qweight": q, "scales": scales}


def _int4_codes(w_NGg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Codes, zero points and (fp16-rounded) scales for the range [lo, hi] of each group."""
    scales = ((hi - lo) / 15.0).to(INT4_SCALE_DTYPE).float().clamp(min=_FP16_TINY)
    zeros = torch.round(-lo / scales).clamp_(0, 15)
    q = torch.round(w_NGg / scales[..., None] + zeros[..., None]).clamp_(0, 15)
    return q, zeros, scales


def quantize_int4(w_NK: torch.Tensor, group_size: int, rows_per_chunk: int = 4096) -> dict[str, torch.Tensor]:
    N, K = w_NK.shape
    Kp = padded_in_features(K, 4, group_size)
    out_q, out_s, out_z = [], [], []
    # Row chunks bound the temporary memory (several fp32 copies of the chunk) on 7B-sized weights.
    for r0 in range(0, N, rows_per_chunk):
        w = w_NK[r0:r0 + rows_per_chunk].float()
        if Kp != K:
            w = torch.nn.functional.pad(w, (0, Kp - K))
        w = w.view(w.shape[0], Kp // group_size, group_size)
        lo0 = w.amin(-1).clamp(max=0.0)
        hi0 = w.amax(-1).clamp(min=0.0)
        best_err = None
        for ratio in CLIP_RATIOS:
            q, z, s = _int4_codes(w, lo0 * ratio, hi0 * ratio)
            err = ((q - z[..., None]) * s[..., None] - w).pow_(2).sum(-1)
            if best_err is None:
                best_err, best = err, (q, z, s)
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = tuple(torch.where(better[..., None] if b.dim() == 3 else better, n, b)
                             for n, b in zip((q, z, s), best))
        q, z, s = best
        q = q.to(torch.uint8).view(q.shape[0], Kp)
        out_q.append(q[:, 0::2] | (q[:, 1::2] << 4))
        out_s.append(s.to(INT4_SCALE_DTYPE))
        out_z.append(z.to(torch.uint8))
    return {"qweight": torch.cat(out_q), "scales": torch.cat(out_s), "zeros": torch.cat(out_z)}


def quantize_weight(w_NK: torch.Tensor, bits: int, group_size: int | None) -> dict[str, torch.Tensor]:
    """A dense (N, K) weight -> the tensors of ``buffer_shapes`` (on the weight's device)."""
    if bits == 8:
        return quantize_int8(w_NK)
    return quantize_int4(w_NK, group_size)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """(N, Kp/2) uint8 -> codes (N, Kp) uint8, k order restored."""
    lo = qweight & 0xF
    hi = qweight >> 4
    return torch.stack((lo, hi), dim=-1).view(qweight.shape[0], -1)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
               group_size: int | None, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense (N, K) weight in dtype that the quantized tensors stand for."""
    if bits == 8:
        return (qweight.float() * scales.float()[:, None]).to(dtype)
    codes = unpack_int4(qweight).float()
    N, Kp = codes.shape
    codes = codes.view(N, Kp // group_size, group_size)
    w = (codes - zeros.float()[..., None]) * scales.float()[..., None]
    return w.view(N, Kp)[:, :in_features].to(dtype)
