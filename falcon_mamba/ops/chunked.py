"""The ``torch`` backend: the ops of ``reference`` (same functions, same signatures) in chunked,
vectorised PyTorch. Fast on the CPU, runs on any device, differentiable (first-order gradients).

Legend: B batch, L length, D inner width, N state size, K conv taps, T chunk length, c chunk index.

The selective scan without a Python loop over time steps
--------------------------------------------------------
Mamba-1's decay a_t = exp(dt_t * A) differs per channel d *and* per state n, so unlike Mamba-2
there is no matmul form: any scan does O(B*L*D*N) work. The length is cut into chunks of T tokens
(nc = ceil(L / T) chunks) and the scan runs in two levels:

1. every chunk at once from a zero state, h <- a_t * h + dt_t x_t B_t for t = 0..T-1 on
   (B, nc, N, D) slices, keeping only the running value: each chunk's local end state;
2. a loop over the chunks carries the state into each one, start[c+1] = end[c] + P[c] * start[c],
   where P[c] = exp(A * sum of dt over the chunk) is the chunk's total decay: a sum in log space,
   always <= 1, so nothing overflows (a decay below fp32's range is 0, as in the reference);
3. every chunk at once again, now from its true start state: all states h_t, y_t = sum_n C_t h_t.

That is 2T + nc Python steps instead of L, each on a large slice. The masked segment-sum form of
level 1 (Mamba-2's SSD: h_t = sum_{s<=t} exp(cum_t - cum_s) w_s) does T times the elementwise
work here, because its (T, T) decay matrix is per (d, n); benchmarks/bench_cpu_scan.py --variants
times both.

The scan is an autograd Function with a hand-written backward: the adjoint lam_t = dL/dh_t obeys
the same recurrence run backwards (lam_t = dy_t C_t + a_{t+1} lam_{t+1}) and is computed by the
same three steps; the states are recomputed rather than stored. The work is cut into tiles of at
most TILE_D channels and whole chunks of about TILE_ELEMS state elements (the state carried
between length blocks), laid out (B, L, N, D) in reused workspace buffers: on a CPU that keeps
them in cache and avoids fresh large allocations, whose first-touch page faults can cost more
than the arithmetic. Other devices get few, large tiles.

Document resets (``reset_BL``) set a_t = 0 at a reset (and so P = 0 for the chunk holding it):
no state crosses the boundary. The conv masks the taps that reach before the document's start.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from falcon_mamba.ops.reference import rms_norm, softplus

__all__ = ["rms_norm", "causal_conv1d", "selective_scan", "conv_step", "ssm_step"]

CHUNK = 8  # T: tokens per chunk (4..16 measured within noise on the CPU; 8 balances 2T + nc)
# Tiles, per device type: channels per tile (default all) and state elements (B * L * N * D) per
# tile (default 2**27: on a GPU, few large tiles).
TILE_D = {"cpu": 1024}
TILE_ELEMS = {"cpu": 1 << 21}


# ---- causal conv ----------------------------------------------------------------------------
def causal_conv1d(
    x_BLD: torch.Tensor,
    weight_DK: torch.Tensor,
    bias_D: torch.Tensor | None,
    conv_state_BKD: torch.Tensor | None = None,
    silu: bool = True,
    reset_BL: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See reference.causal_conv1d: y (B, L, D) in x's dtype, new conv state (B, K-1, D).

    A sum over the K taps of shifted views (no loop over time), fp32 math.
    """
    Bsz, L, D = x_BLD.shape
    K = weight_DK.shape[1]
    prev = (x_BLD.new_zeros(Bsz, K - 1, D) if conv_state_BKD is None
            else conv_state_BKD.to(x_BLD.dtype))
    xx = torch.cat([prev, x_BLD], dim=1).float()  # (B, K-1+L, D)
    w = weight_DK.float()
    if reset_BL is not None:
        # Document ids: the state's positions are document 0, each reset starts the next one.
        doc_BL = reset_BL.long().cumsum(1)
        doc_pad = F.pad(doc_BL, (K - 1, 0))  # (B, K-1+L)
    y = xx[:, K - 1:] * w[:, K - 1]  # the current token is always in its own document
    for k in range(K - 1):
        tap = xx[:, k:k + L]
        if reset_BL is not None:
            tap = tap * (doc_pad[:, k:k + L] == doc_BL).float()[:, :, None]
        y = torch.addcmul(y, tap, w[:, k])
    if bias_D is not None:
        y = y + bias_D.float()
    if silu:
        y = F.silu(y)
    new_state = xx[:, L:].to(x_BLD.dtype)
    if reset_BL is not None and L > 0:
        same = (doc_pad[:, L:] == doc_BL[:, -1:]).to(new_state.dtype)
        new_state = new_state * same[:, :, None]
    return y.to(x_BLD.dtype), new_state.clone()


# ---- selective scan -------------------------------------------------------------------------
class _Workspace(threading.local):
    """Scratch buffers reused by every tile and every call (per thread): on a CPU, fresh large
    allocations cost a page fault per 4 KiB on first touch, which would otherwise dominate."""

    def __init__(self) -> None:
        self.bufs: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: tuple, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        key = (name, device)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < numel:
            # A buffer made under inference_mode could not be written outside it later: make a
            # normal tensor, which works in both modes.
            with torch.inference_mode(False):
                buf = torch.empty(numel, dtype=torch.float32, device=device)
            self.bufs[key] = buf
        return buf[:numel].view(shape)


_ws = _Workspace()


class _Block:
    """One tile of the scan: a channel range and a block of the length, in nc chunks of T tokens.

    Big tensors are (B, Lp, N, Dt) workspace buffers (Lp = nc*T, viewed (B, nc, T, N, Dt)), written
    in place: the reductions over N and Dt then run along a middle or the last axis, several times
    faster on a CPU than along a short last N, and nothing large is allocated per tile.
    """

    def __init__(self, dt_BLD, x_BLD, A_ND, B_BLN, C_BLN, keep_BL, T: int):
        Bsz, L, D = dt_BLD.shape
        N = A_ND.shape[0]
        nc = -(-L // T)
        T = -(-L // nc)  # the least padding for nc chunks
        self.Bsz, self.L, self.D, self.N, self.nc, self.T, self.Lp = Bsz, L, D, N, nc, T, nc * T
        # Padding tokens have dt = 0 (decay 1, input 0: the state passes unchanged), C = dy = 0.
        self.dt, self.x = self._pad(dt_BLD), self._pad(x_BLD)
        self.u = self.dt * self.x
        self.Bm, self.Cm = self._pad(B_BLN), self._pad(C_BLN)
        self.keep = None if keep_BL is None else F.pad(keep_BL, (0, self.Lp - L), value=1.0)
        self.A = A_ND
        # exp(dt A) is computed as exp2(dt (A log2 e)), as the CUDA kernels do: exp2 is faster.
        self.A2 = A_ND * math.log2(math.e)
        self.dev = dt_BLD.device

    def _buf(self, name):
        return _ws.get(name, (self.Bsz, self.Lp, self.N, self.D), self.dev)

    def _pad(self, t_BL_):
        """Zero-pad a (B, L, ...) tensor to Lp along the length."""
        if self.Lp == self.L:
            return t_BL_
        return F.pad(t_BL_, (0, 0) * (t_BL_.dim() - 2) + (0, self.Lp - self.L))

    def _steps(self, t):
        """(B, Lp, ...) -> T views (B, nc, ...): one position of every chunk."""
        return t.view(self.Bsz, self.nc, self.T, *t.shape[2:]).unbind(2)

    def decay(self):
        """a_t = exp(dt_t A), 0 at a reset: (B, Lp, N, D) in the workspace."""
        a = self._buf("a")
        torch.mul(self.dt[:, :, None, :], self.A2, out=a)
        torch.exp2(a, out=a)
        if self.keep is not None:
            a.mul_(self.keep[:, :, None, None])
        return a

    def chunk_decay(self, first: int):
        """prod of a_t over t = first..T-1 of every chunk: exp2 of a sum in log space, (B, nc, N, D)."""
        dt_sum = self.dt.view(self.Bsz, self.nc, self.T, self.D)[:, :, first:].sum(2)
        decay = torch.exp2(dt_sum[:, :, None, :] * self.A2)
        if self.keep is not None:
            decay.mul_(self.keep.view(self.Bsz, self.nc, self.T)[:, :, first:].prod(2)[:, :, None, None])
        return decay

    def chunk_starts(self, a, h_in_BND):
        """The state entering every chunk (B, nc, N, D) and the state after the block.

        Level 1: every chunk from a zero state at once, keeping only a running state (T steps);
        level 2: carry the state over the chunks (nc steps) with the chunks' total decays."""
        a_t, u_t, B_t = self._steps(a), self._steps(self.u), self._steps(self.Bm)
        ends = torch.mul(u_t[0][:, :, None, :], B_t[0][:, :, :, None])
        for t in range(1, self.T):
            ends.mul_(a_t[t]).addcmul_(u_t[t][:, :, None, :], B_t[t][:, :, :, None])
        P_c, end_c = self.chunk_decay(0).unbind(1), ends.unbind(1)
        starts = _ws.get("starts", (self.Bsz, self.nc, self.N, self.D), self.dev)
        start_c = starts.unbind(1)
        if h_in_BND is None:
            start_c[0].zero_()
        else:
            start_c[0].copy_(h_in_BND)
        for c in range(1, self.nc):
            torch.addcmul(end_c[c - 1], P_c[c - 1], start_c[c - 1], out=start_c[c])
        return starts, torch.addcmul(end_c[-1], P_c[-1], start_c[-1])

    def states(self, a, starts):
        """All states h_t (B, Lp, N, D): every chunk from its true start state, T steps."""
        h = self._buf("h")
        a_t, u_t, B_t, h_t = self._steps(a), self._steps(self.u), self._steps(self.Bm), self._steps(h)
        prev = starts
        for t in range(self.T):
            torch.mul(a_t[t], prev, out=h_t[t]).addcmul_(u_t[t][:, :, None, :], B_t[t][:, :, :, None])
            prev = h_t[t]
        return h

    def output(self, h):
        """y_t = sum_n C_t h_t: (B, L, D)."""
        y = torch.bmm(self.Cm.reshape(-1, 1, self.N), h.view(-1, self.N, self.D))
        return y.view(self.Bsz, self.Lp, self.D)[:, :self.L]

    def _sum_of_product(self, big, small, dims):
        """sum over dims of big * small, the product formed in a workspace buffer (on a CPU,
        reductions along a middle or the last axis of a product beat bmm's matrix-vector form)."""
        tmp = self._buf("tmp")
        torch.mul(big, small, out=tmp)
        return tmp.sum(dims)

    def backward(self, dy_BLD, dh_out_BND, h_in_BND):
        """Gradients of (dt, x, A, B, C, h_in) given those of y and of the final state.

        The adjoint lam_t = dL/dh_t = dy_t C_t + a_{t+1} lam_{t+1} is the same two-level scan run
        backwards: chunk-local from zero (a running value), a carry over the chunks, then exact."""
        a = self.decay()
        starts, _ = self.chunk_starts(a, h_in_BND)
        h = self.states(a, starts)
        dy = self._pad(dy_BLD)
        a_t, dy_t, C_t = self._steps(a), self._steps(dy), self._steps(self.Cm)
        T, nc = self.T, self.nc
        firsts = torch.mul(dy_t[-1][:, :, None, :], C_t[-1][:, :, :, None])
        for t in range(T - 2, -1, -1):
            firsts.mul_(a_t[t + 1]).addcmul_(dy_t[t][:, :, None, :], C_t[t][:, :, :, None])
        # G_c = dL/d(state at the end of chunk c) from the chunks after it.
        Q_c, first_c, a0_c = self.chunk_decay(1).unbind(1), firsts.unbind(1), a_t[0].unbind(1)
        G = _ws.get("ends_adj", (self.Bsz, nc, self.N, self.D), self.dev)
        G_c = G.unbind(1)
        if dh_out_BND is None:
            G_c[-1].zero_()
        else:
            G_c[-1].copy_(dh_out_BND)
        for c in range(nc - 1, 0, -1):
            torch.mul(a0_c[c], torch.addcmul(first_c[c], Q_c[c], G_c[c]), out=G_c[c - 1])
        dh_in = a0_c[0] * torch.addcmul(first_c[0], Q_c[0], G_c[0])
        lam = self._buf("lam")
        lam_t = self._steps(lam)
        nxt = G
        for t in range(T - 1, -1, -1):
            if t == T - 1:
                lam_t[t].copy_(nxt)
            else:
                torch.mul(a_t[t + 1], nxt, out=lam_t[t])
            lam_t[t].addcmul_(dy_t[t][:, :, None, :], C_t[t][:, :, :, None])
            nxt = lam_t[t]
        L = self.L
        # dC_t = sum_d h_t dy_t;  du_t = sum_n lam_t B_t, dB_t = sum_d lam_t u_t (u = dt x)
        dC = self._sum_of_product(h, dy[:, :, None, :], 3)[:, :L]
        du = torch.bmm(self.Bm.reshape(-1, 1, self.N), lam.view(-1, self.N, self.D))
        du = du.view(self.Bsz, self.Lp, self.D)[:, :L]
        dB = self._sum_of_product(lam, self.u[:, :, None, :], 3)[:, :L]
        # d(dt A)_t = g_t = lam_t h_{t-1} a_t (h_{-1} = h_in), in tmp's buffer; h's buffer is then
        # free to hold the products summed for ddt and dA.
        g = self._buf("tmp")
        torch.mul(lam[:, 1:], h[:, :-1], out=g[:, 1:])
        if h_in_BND is None:
            g[:, 0].zero_()
        else:
            torch.mul(lam[:, 0], h_in_BND, out=g[:, 0])
        g.mul_(a)
        ddt = torch.addcmul(torch.mul(g, self.A, out=h).sum(2)[:, :L], du, self.x[:, :L])
        dA = torch.mul(g, self.dt[:, :, None, :], out=h).sum((0, 1))
        return ddt, du * self.dt[:, :L], dA, dB, dC, dh_in


def _tiles(Bsz: int, L: int, D: int, N: int, device: torch.device):
    """Channel ranges and length ranges of the tiles: at most TILE_D channels (a long contiguous
    inner axis for the elementwise ops) and as many whole chunks as fit in TILE_ELEMS."""
    Dt = min(D, TILE_D.get(device.type, D))
    budget = TILE_ELEMS.get(device.type, 1 << 27)
    Lb = max(CHUNK, budget // (Bsz * N * Dt) // CHUNK * CHUNK)
    d_ranges = [(d, min(D, d + Dt)) for d in range(0, D, Dt)]
    l_ranges = [(s, min(L, s + Lb)) for s in range(0, L, Lb)]
    return d_ranges, l_ranges


class _ChunkedScan(torch.autograd.Function):
    """(dt, x, A, B, C, h0, keep) -> (sum_n C_t h_t (B, L, D), final state (B, N, D)), all fp32;
    dt after softplus, A as (N, D) contiguous, h0 as (B, N, D) or None, keep (B, L) 0/1 or None.
    The backward pass recomputes each tile's states from the saved per-block input states.
    First-order gradients only (once_differentiable)."""

    @staticmethod
    def forward(ctx, dt, x, A, Bm, Cm, h0, keep):
        Bsz, L, D = x.shape
        N = A.shape[0]
        d_ranges, l_ranges = _tiles(Bsz, L, D, N, x.device)
        y = x.new_empty(Bsz, L, D)
        h_fin = x.new_empty(Bsz, N, D)
        h_ins = x.new_empty(len(l_ranges), Bsz, N, D)  # the state entering each length block
        for d0, d1 in d_ranges:
            h = None if h0 is None else h0[:, :, d0:d1]
            for j, (l0, l1) in enumerate(l_ranges):
                if h is None:
                    h_ins[j, :, :, d0:d1].zero_()
                else:
                    h_ins[j, :, :, d0:d1].copy_(h)
                blk = _Block(dt[:, l0:l1, d0:d1], x[:, l0:l1, d0:d1], A[:, d0:d1], Bm[:, l0:l1],
                             Cm[:, l0:l1], None if keep is None else keep[:, l0:l1], CHUNK)
                a = blk.decay()
                starts, h = blk.chunk_starts(a, h)
                y[:, l0:l1, d0:d1] = blk.output(blk.states(a, starts))
            h_fin[:, :, d0:d1] = h
        ctx.save_for_backward(dt, x, A, Bm, Cm, keep, h_ins)
        ctx.has_h0 = h0 is not None
        return y, h_fin

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_fin):
        dt, x, A, Bm, Cm, keep, h_ins = ctx.saved_tensors
        Bsz, L, D = x.shape
        N = A.shape[0]
        d_ranges, l_ranges = _tiles(Bsz, L, D, N, x.device)
        dy = torch.zeros_like(x) if dy is None else dy
        ddt, dx = torch.empty_like(x), torch.empty_like(x)
        dA = torch.empty_like(A)
        dB, dC = torch.zeros_like(Bm), torch.zeros_like(Cm)
        dh0 = x.new_empty(Bsz, N, D) if ctx.has_h0 else None
        for d0, d1 in d_ranges:
            g = None if dh_fin is None else dh_fin[:, :, d0:d1]
            dA_d = None
            for j in range(len(l_ranges) - 1, -1, -1):
                l0, l1 = l_ranges[j]
                blk = _Block(dt[:, l0:l1, d0:d1], x[:, l0:l1, d0:d1], A[:, d0:d1], Bm[:, l0:l1],
                             Cm[:, l0:l1], None if keep is None else keep[:, l0:l1], CHUNK)
                h_in = h_ins[j, :, :, d0:d1] if (j > 0 or ctx.has_h0) else None
                g_dt, g_x, g_A, g_B, g_C, g = blk.backward(dy[:, l0:l1, d0:d1], g, h_in)
                ddt[:, l0:l1, d0:d1] = g_dt
                dx[:, l0:l1, d0:d1] = g_x
                dB[:, l0:l1] += g_B
                dC[:, l0:l1] += g_C
                dA_d = g_A if dA_d is None else dA_d + g_A
            dA[:, d0:d1] = dA_d
            if dh0 is not None:
                dh0[:, :, d0:d1] = g
        return ddt, dx, dA, dB, dC, dh0, None


def selective_scan(
    x_BLD: torch.Tensor,
    dt_BLD: torch.Tensor,
    A_DN: torch.Tensor,
    B_BLN: torch.Tensor,
    C_BLN: torch.Tensor,
    D_D: torch.Tensor | None = None,
    z_BLD: torch.Tensor | None = None,
    dt_bias_D: torch.Tensor | None = None,
    state_BDN: torch.Tensor | None = None,
    reset_BL: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See reference.selective_scan: (y (B, L, D) in x's dtype, final state (B, D, N) fp32).

    Chunked (module docstring); fp32 math; state_BDN is not modified.
    """
    Bsz, L, D = x_BLD.shape
    N = A_DN.shape[1]
    x = x_BLD.float()
    dt = dt_BLD.float()
    if dt_bias_D is not None:
        dt = dt + dt_bias_D.float()
    dt = softplus(dt)
    if L == 0:
        h = x.new_zeros(Bsz, D, N) if state_BDN is None else state_BDN.float().clone()
        return x_BLD.new_zeros(Bsz, 0, D), h
    keep = None if reset_BL is None else (~reset_BL).float()
    h0 = None if state_BDN is None else state_BDN.float().transpose(1, 2)
    A_ND = A_DN.float().t().contiguous()  # contiguous: D is the inner axis of every big op
    y, h_ND = _ChunkedScan.apply(dt, x, A_ND, B_BLN.float(), C_BLN.float(), h0, keep)
    if D_D is not None:
        y = torch.addcmul(y, x, D_D.float())
    if z_BLD is not None:
        y = y * F.silu(z_BLD.float())
    return y.to(x_BLD.dtype), h_ND.transpose(1, 2).contiguous()


# ---- single-token steps (decode) --------------------------------------------------------------
def conv_step(
    conv_state_BKD: torch.Tensor, x_BD: torch.Tensor, weight_DK: torch.Tensor,
    bias_D: torch.Tensor | None, silu: bool = True,
) -> torch.Tensor:
    """See reference.conv_step: updates conv_state_BKD (B, K-1, D) in place, returns y (B, D)."""
    xx = torch.cat([conv_state_BKD.to(x_BD.dtype), x_BD[:, None]], dim=1)  # (B, K, D)
    y = torch.einsum("bkd,dk->bd", xx.float(), weight_DK.float())
    if bias_D is not None:
        y = y + bias_D.float()
    if silu:
        y = F.silu(y)
    conv_state_BKD.copy_(xx[:, 1:])
    return y.to(x_BD.dtype)


def ssm_step(
    state_BDN: torch.Tensor, x_BD: torch.Tensor, dt_BD: torch.Tensor, A_DN: torch.Tensor,
    B_BN: torch.Tensor, C_BN: torch.Tensor, D_D: torch.Tensor | None, z_BD: torch.Tensor | None,
    dt_bias_D: torch.Tensor | None,
) -> torch.Tensor:
    """See reference.ssm_step: updates state_BDN (fp32) in place, returns y (B, D) in x's dtype."""
    x = x_BD.float()
    dt = dt_BD.float()
    if dt_bias_D is not None:
        dt = dt + dt_bias_D.float()
    dt = softplus(dt)
    h = torch.addcmul((dt * x)[:, :, None] * B_BN.float()[:, None, :],
                      torch.exp(dt[:, :, None] * A_DN.float()), state_BDN.float())
    y = torch.einsum("bdn,bn->bd", h, C_BN.float())
    if D_D is not None:
        y = torch.addcmul(y, x, D_D.float())
    if z_BD is not None:
        y = y * F.silu(z_BD.float())
    state_BDN.copy_(h)
    return y.to(x_BD.dtype)
