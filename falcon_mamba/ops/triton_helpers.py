"""Triton helpers shared by the kernels of this package.

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


@triton.jit
def mask_and(block_mask, scalar_ok):
    """block_mask (any block shape, int1) & scalar_ok (a scalar int1) -> a block int1 mask."""
    return tl.where(scalar_ok, block_mask, False)
