"""Greedy next tokens on the GPU: tokens (B,) int64 = argmax over the vocab of logits (B, V) fp32,
with torch.argmax's answer: the first index of the maximum, or the first NaN where a row has one.

Why: the graphed decode step ends with the greedy token; torch's argmax over a 65,024-wide row is a
one-block reduction that took ~20 us per token on the H100 (more than a layer of int4 decode,
benchmarks/results/dev-runs/h100-profile-*.json), and a copy into the token buffer after it. Here
one program per row streams the row in BLOCK-wide chunks (the loads software-pipelined) and writes
the token where the next step reads it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falcon_mamba.ops import pdl
from falcon_mamba.ops.pdl import dep_sync
from falcon_mamba.ops.triton_helpers import LAUNCH_OPTIONS

BLOCK = 4096


@triton.jit
def _argmax_kernel(x_ptr, out_ptr, sx, V: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
                   hist_ptr=None, pos_ptr=None, s_hist=0, HCAP: tl.constexpr = 1, HIST: tl.constexpr = False):
    # V is a constexpr (a model's vocab: one compile), so the interpreter can bound the loop
    dep_sync(PDL)
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * sx
    best_v = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_i = tl.full((BLOCK,), 2147483647, tl.int32)  # per lane: the first index of its maximum
    nan_i = tl.full((BLOCK,), 2147483647, tl.int32)  # per lane: its first NaN
    for c0 in tl.range(0, V, BLOCK, num_stages=3):
        i = c0 + tl.arange(0, BLOCK)
        v = tl.load(base + i, mask=i < V, other=float("-inf")).to(tl.float32)
        nan_i = tl.minimum(nan_i, tl.where(v != v, i, 2147483647))
        take = (v > best_v) | ((best_i == 2147483647) & (i < V))  # later chunks win only when larger
        best_v = tl.where(take, v, best_v)
        best_i = tl.where(take, i, best_i)
    top = tl.max(best_v, axis=0)
    first = tl.min(tl.where(best_v == top, best_i, 2147483647), axis=0)
    first_nan = tl.min(nan_i, axis=0)
    tok = tl.where(first_nan < 2147483647, first_nan, first).to(tl.int64)
    tl.store(out_ptr + row, tok)
    if HIST:  # also at this row's position of the history ring, which then advances
        p = tl.load(pos_ptr + row)
        tl.store(hist_ptr + row * s_hist + p % HCAP, tok)
        tl.store(pos_ptr + row, p + 1)


def greedy_tokens(logits: torch.Tensor, out: torch.Tensor | None = None,
                  history: tuple | None = None) -> torch.Tensor:
    """argmax(logits (B, V), -1) as int64 (B,), into out when given (e.g. the graph's token buffer).
    history = (ring (B', C) int64, pos (B',) int32), B' >= B: each row's token is also stored at
    ring[b, pos[b] % C] and pos[b] advances (a graphed greedy loop records its tokens on the device,
    with no copy launched between replays)."""
    assert logits.dim() == 2 and logits.stride(1) == 1, "logits (B, V), rows contiguous"
    B, V = logits.shape
    assert V < 2 ** 31, "vocab too large for int32 indices"
    if out is None:
        out = torch.empty(B, dtype=torch.int64, device=logits.device)
    assert out.dtype == torch.int64 and out.numel() == B and out.is_contiguous()
    hist = {}
    if history is not None:
        ring, pos = history
        assert ring.dtype == torch.int64 and pos.dtype == torch.int32 and ring.shape[0] >= B <= pos.numel()
        assert ring.stride(1) == 1
        hist = dict(hist_ptr=ring, pos_ptr=pos, s_hist=ring.stride(0), HCAP=ring.shape[1], HIST=True)
    _argmax_kernel[(B,)](logits, out, logits.stride(0), V=V, BLOCK=min(BLOCK, triton.next_power_of_2(V)),
                         num_warps=8, **pdl.launch_kwargs(logits.device), **hist, **LAUNCH_OPTIONS)
    return out
