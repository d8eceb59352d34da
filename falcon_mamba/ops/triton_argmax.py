"""Greedy next tokens on the GPU: tokens (B,) int64 = argmax over the vocab of logits (B, V) fp32,
with torch.argmax's answer: the first index of the maximum, or the first NaN where a row has one.

Why: the graphed decode step ends with the greedy token; torch's argmax over a 65,024-wide row is a
one-block reduction that took ~20 us per token on the H100 (more than a layer of int4 decode,
benchmarks/results/dev-runs/h100-profile-*.json), and a copy into the token buffer after it; one
program streaming the row took ~10 us. Here NCH programs per row each reduce one CHUNK-wide slice
(one round trip to L2), store (max, its first index, first NaN) and take a ticket; the row's last
program reduces the NCH partials in order and writes the token where the next step reads it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falcon_mamba.ops import pdl
from falcon_mamba.ops.pdl import dep_sync

CHUNK = 2048
_BIG = tl.constexpr(2147483647)  # "no index": above every int32 index


@triton.jit
def _argmax_kernel(x_ptr, out_ptr, sx, part_v, part_i, part_n, cnt_ptr, V: tl.constexpr,
                   NP: tl.constexpr, NCH: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr,
                   hist_ptr=None, pos_ptr=None, s_hist=0, HCAP: tl.constexpr = 1, HIST: tl.constexpr = False):
    # program (c, row): slice c < NP of the row; partials at [row * NCH + c] (NCH: NP rounded up to
    # a power of two); cnt_ptr[row]: the row's ticket, left at zero by its last program. V is a
    # constexpr (one compile per vocab).
    dep_sync(PDL)
    c = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    i = c * CHUNK + tl.arange(0, CHUNK)
    v = tl.load(x_ptr + row * sx + i, mask=i < V, other=float("-inf")).to(tl.float32)
    isn = v != v
    first_nan = tl.min(tl.where(isn, i, _BIG), axis=0)
    v = tl.where(isn, float("-inf"), v)
    top = tl.max(v, axis=0)
    # the first index holding the maximum (a slice of only -inf answers its first element)
    first = tl.min(tl.where((v == top) & (i < V), i, _BIG), axis=0)
    p = row * NCH + c
    tl.store(part_v + p, top)
    tl.store(part_i + p, first)
    tl.store(part_n + p, first_nan)
    tl.debug_barrier()  # the partials are stored before the ticket is taken
    ticket = tl.atomic_add(cnt_ptr + row, 1, sem="acq_rel", scope="gpu")
    if ticket == NP - 1:
        j = tl.arange(0, NCH)
        k = row * NCH + j
        pv = tl.load(part_v + k, mask=j < NP, other=float("-inf"), cache_modifier=".cg")
        pi = tl.load(part_i + k, mask=j < NP, other=_BIG, cache_modifier=".cg")
        pn = tl.load(part_n + k, mask=j < NP, other=_BIG, cache_modifier=".cg")
        best = tl.max(pv, axis=0)
        tok = tl.min(tl.where(pv == best, pi, _BIG), axis=0)  # earlier slices hold earlier indices
        nan_at = tl.min(pn, axis=0)
        tok = tl.where(nan_at < _BIG, nan_at, tok).to(tl.int64)
        tl.store(out_ptr + row, tok)
        if HIST:  # also at this row's position of the history ring, which then advances
            q = tl.load(pos_ptr + row)
            tl.store(hist_ptr + row * s_hist + q % HCAP, tok)
            tl.store(pos_ptr + row, q + 1)
        tl.atomic_xchg(cnt_ptr + row, 0)


def greedy_tokens(logits: torch.Tensor, out: torch.Tensor | None = None,
                  history: tuple | None = None) -> torch.Tensor:
    """argmax(logits (B, V), -1) as int64 (B,), into out when given (e.g. the graph's token buffer).
    history = (ring (B', C) int64, pos (B',) int32), B' >= B: each row's token is also stored at
    ring[b, pos[b] % C] and pos[b] advances (a graphed greedy loop records its tokens on the device,
    with no copy launched between replays). On CUDA run it once before graph capture (it allocates
    the shared ticket buffer, as triton_gemv's split launches do)."""
    from falcon_mamba.ops.triton_gemv import _ticket_buffer

    assert logits.dim() == 2 and logits.stride(1) == 1, "logits (B, V), rows contiguous"
    B, V = logits.shape
    assert V < 2 ** 31, "vocab too large for int32 indices"
    if out is None:
        out = torch.empty(B, dtype=torch.int64, device=logits.device)
    assert out.dtype == torch.int64 and out.numel() == B and out.is_contiguous()
    chunk = min(CHUNK, triton.next_power_of_2(V))
    nch = triton.cdiv(V, chunk)
    NCH = triton.next_power_of_2(nch)
    dev = logits.device
    part_v = torch.empty(B, NCH, dtype=torch.float32, device=dev)
    part_i = torch.empty(B, NCH, dtype=torch.int32, device=dev)
    part_n = torch.empty(B, NCH, dtype=torch.int32, device=dev)
    hist = {}
    if history is not None:
        ring, pos = history
        assert ring.dtype == torch.int64 and pos.dtype == torch.int32 and ring.shape[0] >= B <= pos.numel()
        assert ring.stride(1) == 1
        hist = dict(hist_ptr=ring, pos_ptr=pos, s_hist=ring.stride(0), HCAP=ring.shape[1], HIST=True)
    _argmax_kernel[(nch, B)](logits, out, logits.stride(0), part_v, part_i, part_n, _ticket_buffer(dev, B),
                             V=V, NP=nch, NCH=NCH, CHUNK=chunk, num_warps=8, **pdl.launch_kwargs(dev), **hist)
    return out
