"""The fused linear cross-entropy's per-chunk softmax step as one Triton kernel (training's loss).

Legend: n tokens of a chunk, V vocabulary, BV logits a block.

For a chunk's logits (n, V) (lm_head's output in the compute dtype) and targets (n,), per row:
    lse  = log sum_v exp(logit_v)          (fp32, online over the row: one read)
    loss = lse - logit_target
    g    = softmax - onehot(target) = exp(logit - lse) - [v == target]   (fp32, then rounded to the
           logits' dtype and written over them: the two gradient matmuls read it from there)
train/linear_ce.py's PyTorch step is the twin (the spec): upcast to fp32 (a copy), logsumexp,
gather, subtract, exp and scatter in place, round to the compute dtype: at 2,048 tokens x Falcon's
65,024 logits (a 1.5B step's chunk) ~7 GB of traffic a chunk, ~15 ms a step over its 8 chunks, and
an fp32 (n, V) buffer of 0.5 GB. This kernel reads the bf16 logits twice and writes them once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falcon_mamba.ops.triton_helpers import LAUNCH_OPTIONS

BLOCK_V = 4096
WARPS = 8
NEG = tl.constexpr(-3.0e38)  # a masked lane: exp(NEG - m) is 0 and NEG - NEG is 0 (no inf - inf)


@triton.jit
def _ce_rows_kernel(lg_ptr, t_ptr, loss_ptr, V, s_row, BV: tl.constexpr, GRAD: tl.constexpr):
    # One program a row: pass 1 the row's log-sum-exp as per-lane running (max, sum) pairs, merged
    # at the end; pass 2 (GRAD) the softmax gradient written over the logits.
    row = tl.program_id(0).to(tl.int64)
    base = lg_ptr + row * s_row
    lanes = tl.arange(0, BV)
    mv = tl.full((BV,), NEG, tl.float32)
    sv = tl.zeros((BV,), tl.float32)
    v0 = 0
    while v0 < V:
        cols = v0 + lanes
        x = tl.load(base + cols, mask=cols < V, other=NEG).to(tl.float32)
        mn = tl.maximum(mv, x)
        sv = sv * tl.exp(mv - mn) + tl.exp(x - mn)
        mv = mn
        v0 += BV
    m = tl.max(mv, axis=0)
    lse = m + tl.log(tl.sum(sv * tl.exp(mv - m), axis=0))
    tgt = tl.load(t_ptr + row)
    xt = tl.load(base + tgt).to(tl.float32)
    tl.store(loss_ptr + row, lse - xt)
    if GRAD:
        v0 = 0
        while v0 < V:
            cols = v0 + lanes
            mc = cols < V
            x = tl.load(base + cols, mask=mc, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(cols == tgt, 1.0, 0.0)
            tl.store(base + cols, g.to(lg_ptr.dtype.element_ty), mask=mc)
            v0 += BV


def ce_rows_(logits: torch.Tensor, targets: torch.Tensor, grad: bool) -> torch.Tensor:
    """logits (n, V), rows with unit column stride; targets (n,) int64 in [0, V). Returns the
    per-row losses (n,) fp32; with grad, logits is overwritten by softmax - onehot(target) in its
    own dtype."""
    n, V = logits.shape
    assert logits.stride(1) == 1 and targets.shape == (n,)
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        _ce_rows_kernel[(n,)](logits, targets.contiguous(), loss, V, logits.stride(0),
                              BV=min(BLOCK_V, triton.next_power_of_2(V)), GRAD=grad,
                              num_warps=WARPS, **LAUNCH_OPTIONS)
    return loss
