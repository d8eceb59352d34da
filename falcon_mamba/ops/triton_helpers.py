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
"""

from __future__ import annotations

import triton
import triton.language as tl

LAUNCH_OPTIONS = {"enable_fp_fusion": True}


@triton.jit
def mask_and(block_mask, scalar_ok):
    """block_mask (any block shape, int1) & scalar_ok (a scalar int1) -> a block int1 mask."""
    return tl.where(scalar_ok, block_mask, False)
