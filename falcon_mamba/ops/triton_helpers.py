"""Triton helpers shared by the kernels of this package.

``LAUNCH_OPTIONS``: the compile options every kernel launch of the package passes
(``kernel[grid](..., **LAUNCH_OPTIONS)``). ``enable_fp_fusion=True`` lets the compiler contract
``a * b + c`` into one FMA (one rounding instead of two, one instruction instead of two). It has
been Triton's default, but Triton 3.9 warns that the default becomes "off" in 3.10; our kernels were
written, tuned and checked on the GPU with fusion on, and a few paths are bit-identical to each
other only because both sides are compiled the same way (the conv step recomputed by the x_proj
GEMV and by the SSM step), so the choice is made here rather than left to a default that changes
under us. Triton 3.6 takes the same option; the interpreter (CPU tests) ignores it.

``mask_and(block_mask, scalar_ok)``: a block mask and-ed with a scalar predicate (a time step
inside the length, the first program of a grid). Written as a select rather than ``block & ok``
because Triton 3.9's interpreter (TRITON_INTERPRET=1, the CPU tests) labels a scalar comparison
int32 and splats it into an int32 block, which its load and store then refuse as a mask
("mask has unsupported dtype"). Compiled, both forms are the same predicate and: the select of a
uniform predicate folds to an ``and``.

``bc_words`` / ``row_values``: a scan step's B or C row (N values, the same for every channel, so
every lane loads all of them) into the (NP, BD) register layout the scan kernels use, from bf16
four values per 64-bit load where the rows allow it.

``softplus`` / ``softplus_t``: dt's softplus as every scan and decode kernel computes it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LAUNCH_OPTIONS = {"enable_fp_fusion": True}


@triton.jit
def mask_and(block_mask, scalar_ok):
    """block_mask (any block shape, int1) & scalar_ok (a scalar int1) -> a block int1 mask."""
    return tl.where(scalar_ok, block_mask, False)


def bc_words(Bm: torch.Tensor, Cm: torch.Tensor) -> bool:
    """Whether the scan kernels read B and C (B, L, N) four bf16 values per 64-bit load: both bf16,
    N a multiple of 4, every row (b, t) starting on 8 bytes. One 64-bit load instead of four 16-bit
    ones cuts the loads and the moves of their uniform addresses into registers (in the 7B forward,
    32 of a step's ~290 SASS instructions were these loads and ~27 more those moves)."""
    return all(t.dtype == torch.bfloat16 and t.shape[-1] % 4 == 0 and t.data_ptr() % 8 == 0
               and t.stride(0) % 4 == 0 and t.stride(1) % 4 == 0 for t in (Bm, Cm))


@triton.jit
def row_values(ptr, ok, nn, N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, WORDS: tl.constexpr):
    """(NP, BD) fp32: the N values at ptr (a scalar pointer: one (b, t) row of B or C), value k in
    every element whose state index nn is k; 0 where the scalar ok is false. WORDS (bc_words): ptr
    holds bf16 and is read as N / 4 int64 words, a bf16's bits being the top half of its fp32."""
    out = tl.zeros((NP, BD), tl.float32)
    if WORDS:
        wp = ptr.to(tl.pointer_type(tl.int64))
        for w in tl.static_range(N // 4):
            word = tl.load(wp + w, mask=ok, other=0)
            for j in tl.static_range(4):
                v = (((word >> (16 * j)) & 0xFFFF).to(tl.int32) << 16).to(tl.float32, bitcast=True)
                out = tl.where(nn == 4 * w + j, v, out)
    else:
        for k in tl.static_range(N):
            out = tl.where(nn == k, tl.load(ptr + k, mask=ok, other=0.0).to(tl.float32), out)
    return out


@triton.jit
def softplus_t(v):
    """(softplus(v), t = exp(-|v|)): sigmoid(v), softplus's derivative, is where(v > 0, 1, t) / (1 + t).

    softplus(v) = max(v, 0) + log1p(t), t in (0, 1], with log1p(t) = 2 atanh(s), s = t / (2 + t) in
    (0, 1/3]: the odd series 2s (1 + s^2/3 + ... + s^12/13) is within 2e-8 of it there (the next
    term, (1/9)^7 / 15), so tiny dt keep their relative precision, and above 20 the log1p term is
    below half an fp32 ulp of v (the CUDA kernels' threshold 20 is implied). ~20 instructions where
    libdevice's logf and a division took ~40 (a scan step is ~270)."""
    t = tl.exp(-tl.abs(v))
    s = t / (2.0 + t)
    q = s * s
    p = q * 0.07692307692307693 + 0.09090909090909091
    p = p * q + 0.1111111111111111
    p = p * q + 0.14285714285714285
    p = p * q + 0.2
    p = p * q + 0.3333333333333333
    p = p * q + 1.0
    return tl.maximum(v, 0.0) + 2.0 * s * p, t


@triton.jit
def softplus(v):
    """softplus(v) in fp32, threshold 20 (see softplus_t)."""
    return softplus_t(v)[0]
