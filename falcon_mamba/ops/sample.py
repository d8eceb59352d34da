"""Sampling on the device: per-row parameters as tensors, one call per decode step, no host sync.

    rows = SamplerRows.from_params(params_list, seeds, device, vocab_size)   # or a pool's table
    rows.set_row(i, params, seed, pos=0, seen_ids=prompt_ids)               # when a row swaps
    sample_rows(logits_BV, rows.head(B), tokens_B, logprob_B, status_B)     # each step; graph-safe

``sample_rows`` runs the Triton kernel (ops/triton_sample.py) on CUDA and the torch path below
elsewhere. Both compute the same function, row by row (x = the row's logits in fp32, NaN -> -inf):

1. repetition penalty (penalty != 1): where seen[b, v], x_v = x_v / p if x_v > 0 else x_v * p.
2. greedy (temperature 0): the first index of max x. A row whose max is -inf gets token 0 and
   status 1 (the caller fails that row alone); every other row gets status 0.
3. z_v = 0 where x_v == m = max x (this covers m = +inf), else (x_v - m) / T, so z <= 0; a tiny T
   (1e-45) gives -inf for every non-maximal token, never NaN.
4. top-k (0 < k < V): keep z_v >= the k-th largest z (counted with multiplicity; ties all kept).
5. top-p (p < 1): over the top-k survivors S, f(t) = sum_{S, z > t} e^z / sum_S e^z; keep v iff
   f(z_v) < p (the strictly more likely mass is below p; ties all kept; the top token always is).
6. min-p (> 0): keep z_v >= log(min_p), i.e. p_v >= min_p * p_max.
   So the kept set is {z >= tau} for one threshold tau per row (``keep_threshold``).
7. draw: the first index of max over kept v of z_v + g_v, with Gumbel noise g_v = -log(-log(u_v)):
   an exact draw from softmax(z) restricted to the kept set (the Gumbel-max trick).
8. pos += 1 for every row; seen[b, token] = 1 for status-0 rows; logprob = the token's
   log_softmax under the raw logits (step 0's x), -inf for status-1 rows.

The noise is a counter-based hash, the same integers in both implementations, so the two paths
pick the same token except at float near-ties (two scores within ~1e-6, or a top-p mass within
~1e-5 of p: the kernel sums in fp32 in another order). All arithmetic is on uint32 (here int32 tensors
holding the same bits: products wrap mod 2**32, shifted-in sign bits are masked off):

    lowbias32(x):  x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
                   (Chris Wellons' hash-prospector mixer: a bijection of uint32)
    row key, once per row and call, absorbing the 64-bit seed and the 64-bit pos 32 bits at a time:
        a = lowbias32(lowbias32(lowbias32(lowbias32(seed_lo ^ 0x9E3779B9) ^ seed_hi) ^ pos_lo) ^ pos_hi)
        b = lowbias32(a ^ 0x632BE5AB)
    token v:  h = lowbias32(lowbias32(v ^ a) ^ b)
              u = ((h >> 9) + 0.5) * 2**-23      in [2**-24, 1 - 2**-24], exact in fp32
For a fixed seed, a is a bijection of pos < 2**32 (no step repeats another's noise), and for one
step h is a bijection of v. 23 bits, not 24: ((h >> 8) + 0.5) / 2**24 rounds to 1.0 in fp32 for
the largest h, and g would be +inf. The largest g is GUMBEL_MAX ~ 16.64, so a token more than ~19.5
nats below the top token can never be drawn (its probability is below 4e-9 of the top's).

This torch path is the spec and the CPU path: exact thresholds without sorting the row (top-k from
torch.topk; top-p from the CANDIDATES most likely tokens, or else by binning the row's mass by z),
and noise only for the tokens that can still win: s_v <= z_v + GUMBEL_MAX, and the top token
(always kept) scores g_top, so only tokens with z_v >= g_top - GUMBEL_MAX are scored (compacted
when they are few, the whole row otherwise). The penalty is applied before the max, so a row whose
every finite logit a penalty of 1e3 sends to -inf also gets status 1.

Legend: B batch (rows), V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from falcon_mamba.sampling import SamplingParams

MASK32 = 0xFFFFFFFF
SEED_SALT = 0x9E3779B9
KEY2_SALT = 0x632BE5AB
INT32_MAX = 2**31 - 1
SMALLEST_F32 = 2.0**-149  # a top_p that rounds to 0 in fp32 becomes this: only the top tokens kept
# top-p without top-k looks at the CANDIDATES most likely tokens first (torch.topk); when the
# nucleus holds more, the row's mass is binned by z (BINS bins, again within the bin where the
# nucleus ends) until that bin holds at most LEAF tokens, which are sorted. No full sort: 65k fp32
# sort ~5 ms on a CPU core, the bins ~0.5 ms.
CANDIDATES = 64
BINS = 256
LEAF = 2048


# ---------------------------------------------------------------- the hash (see the docstring)

def lowbias32(x: int) -> int:
    """Wellons' lowbias32 of a Python int in [0, 2**32)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def _s32(v: int) -> int:
    """A uint32 value as the int32 with the same bits."""
    return v - 2**32 if v >= 2**31 else v


_MUL2 = _s32(0x846CA68B)


def lowbias32_t(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on an int32 tensor holding uint32 bit patterns (a new tensor; x is left alone).
    int32 products wrap mod 2**32, which is the uint32 product's bit pattern; right shifts are
    arithmetic, so the shifted-in sign bits are masked off. int32, not int64 masked to 32 bits:
    ~35% faster on the CPU, and this runs on every candidate token of every row."""
    t = (x >> 16).bitwise_and_(0xFFFF)
    x = x ^ t
    x.mul_(0x7FEB352D)
    x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=t).bitwise_and_(0x1FFFF))
    x.mul_(_MUL2)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=t).bitwise_and_(0xFFFF))


def row_keys(seed: int, pos: int) -> tuple[int, int]:
    """The row's two 32-bit keys (a, b) for this call, from its 64-bit seed and draw counter."""
    seed, pos = seed & (2**64 - 1), pos & (2**64 - 1)
    a = lowbias32((seed & MASK32) ^ SEED_SALT)
    a = lowbias32(a ^ (seed >> 32))
    a = lowbias32(a ^ (pos & MASK32))
    a = lowbias32(a ^ (pos >> 32))
    return a, lowbias32(a ^ KEY2_SALT)


def token_hash(ids: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """h (int32 holding the uint32 bits) of token ids (any int dtype, < 2**31) under row keys (a, b)."""
    return lowbias32_t(lowbias32_t(ids.to(torch.int32) ^ _s32(a)) ^ _s32(b))


def uniform_from_hash(h: torch.Tensor) -> torch.Tensor:
    """u = ((h >> 9) + 0.5) * 2**-23 in fp32 (h: uint32 bits in an int32 or int64 tensor): exact,
    in [2**-24, 1 - 2**-24]."""
    return (((h >> 9) & 0x7FFFFF).to(torch.float32) + 0.5) * 2.0**-23


def gumbel(ids: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """g = -log(-log(u)) (fp32) of token ids under row keys (a, b)."""
    return uniform_from_hash(token_hash(ids, a, b)).log_().neg_().log_().neg_()


GUMBEL_MAX = float(-torch.log(-torch.log(torch.tensor(1.0 - 2.0**-24, dtype=torch.float32))))


# ---------------------------------------------------------------- per-row parameters

def _signed64(v: int) -> int:
    v &= 2**64 - 1
    return v - 2**64 if v >= 2**63 else v


F32_MAX = float(torch.finfo(torch.float32).max)
F32_TINY = float(torch.finfo(torch.float32).tiny)  # the smallest normal fp32


def row_values(params: SamplingParams, seed: int, pos: int, vocab_size: int) -> tuple:
    """(temperature, top_k, top_p, min_p, penalty, seed, pos) as the table stores them: top_k >= V
    (or past int32) -> 0 (off); a top_p that rounds to 0 in fp32 -> the smallest positive fp32;
    temperature and penalty clamped into fp32's finite range; seed and pos as their 64-bit
    patterns."""
    k = params.top_k if 0 < params.top_k < min(vocab_size, INT32_MAX + 1) else 0
    p = float(params.top_p)
    if p < 1 and float(torch.tensor(p, dtype=torch.float32)) == 0.0:
        p = SMALLEST_F32
    # The table is fp32: a temperature or penalty past its range would round to inf or 0 (and
    # z / inf, x / 0 are NaN or inf), so they are clamped to the nearest fp32 the math survives.
    t = min(float(params.temperature), F32_MAX)
    pen = min(max(float(params.repetition_penalty), F32_TINY), F32_MAX)
    return (t, k, p, float(params.min_p), pen, _signed64(seed), _signed64(pos))


_DTYPES = {"temperature": torch.float32, "top_k": torch.int32, "top_p": torch.float32,
           "min_p": torch.float32, "penalty": torch.float32, "seed": torch.int64, "pos": torch.int64}


@dataclass
class SamplerRows:
    """Per-row sampling parameters as device tensors (B rows). Views of a larger table are fine
    (rows [0:B] of a pool's table, contiguous in the row dimension: see ``head``)."""

    temperature: torch.Tensor  # (B,) f32; 0 = greedy
    top_k: torch.Tensor  # (B,) int32; 0 = off; values >= V also mean off
    top_p: torch.Tensor  # (B,) f32; 1 = off; (0, 1)
    min_p: torch.Tensor  # (B,) f32; 0 = off
    penalty: torch.Tensor  # (B,) f32; repetition penalty, 1 = off
    seed: torch.Tensor  # (B,) int64; the row's seed
    pos: torch.Tensor  # (B,) int64; the row's draw counter, incremented by 1 by each call
    seen: torch.Tensor | None = None  # (B, V) uint8, 1 where the row has seen the token (prompt +
    # output); each call sets seen[b, token_b] = 1; None: no row has a penalty (penalties ignored)

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def empty(cls, batch_size: int, device, vocab_size: int | None = None) -> SamplerRows:
        """A table of greedy rows (temperature 0, filters off, seed 0, pos 0), with a zeroed seen
        table (B, V) when vocab_size is given (needed for rows with a repetition penalty)."""
        t = {name: torch.zeros(batch_size, dtype=dt, device=device) for name, dt in _DTYPES.items()}
        t["top_p"].fill_(1.0)
        t["penalty"].fill_(1.0)
        seen = None if vocab_size is None else torch.zeros(batch_size, vocab_size, dtype=torch.uint8,
                                                           device=device)
        return cls(**t, seen=seen)

    @classmethod
    def from_params(cls, params_list: Sequence[SamplingParams], seeds: Sequence[int], device,
                    vocab_size: int, seen_ids: Sequence | None = None) -> SamplerRows:
        """One row per SamplingParams, row i seeded with seeds[i], pos 0. A seen table is allocated
        when a row has a repetition penalty or seen_ids (B sequences of token ids) is given."""
        params_list = list(params_list)
        if len(seeds) != len(params_list):
            raise ValueError(f"got {len(seeds)} seeds for {len(params_list)} rows")
        with_seen = seen_ids is not None or any(p.repetition_penalty != 1 for p in params_list)
        vals = [row_values(p, s, 0, vocab_size) for p, s in zip(params_list, seeds)]
        cols = {name: torch.tensor([v[j] for v in vals], dtype=dt).to(device)
                for j, (name, dt) in enumerate(_DTYPES.items())}
        seen = None
        if with_seen:
            seen = torch.zeros(len(params_list), vocab_size, dtype=torch.uint8)
            for i, ids in enumerate(seen_ids or ()):
                _mark(seen[i], ids)
            seen = seen.to(device)
        return cls(**cols, seen=seen)

    def set_row(self, i: int, params: SamplingParams, seed: int, pos: int = 0,
                seen_ids=None) -> None:
        """Fill row i for a new sequence: its parameters, seed and draw counter, and (when the table
        has one) its seen row: zeroed, then 1 at seen_ids (the prompt's token ids)."""
        V = None if self.seen is None else self.seen.shape[1]
        if self.seen is None and params.repetition_penalty != 1:
            raise ValueError("this SamplerRows table has no seen table; build it with vocab_size "
                             "(SamplerRows.empty) to serve rows with a repetition penalty")
        vals = row_values(params, seed, pos, V if V is not None else 2**62)
        for f, v in zip(_DTYPES, vals):
            getattr(self, f)[i] = v
        if self.seen is not None:
            self.seen[i].zero_()
            if seen_ids is not None:
                _mark(self.seen[i], seen_ids)

    def set_rows(self, first: int, params_list: Sequence[SamplingParams], seeds: Sequence[int],
                 seen_ids: Sequence | None = None) -> None:
        """set_row for rows first.. at once (one host-to-device copy per column: what a server
        does for every step's joining sequences); seen_ids: per row, the prompt's token ids."""
        n = len(params_list)
        V = None if self.seen is None else self.seen.shape[1]
        if self.seen is None and any(p.repetition_penalty != 1 for p in params_list):
            raise ValueError("this SamplerRows table has no seen table; build it with vocab_size "
                             "(SamplerRows.empty) to serve rows with a repetition penalty")
        vals = [row_values(p, sd, 0, V if V is not None else 2**62) for p, sd in zip(params_list, seeds)]
        pin = self.temperature.is_cuda
        for j, (name, dt) in enumerate(_DTYPES.items()):
            src = torch.tensor([v[j] for v in vals], dtype=dt, pin_memory=pin)
            getattr(self, name)[first:first + n].copy_(src, non_blocking=pin)
        if self.seen is not None:
            self.seen[first:first + n].zero_()
            for i, p in enumerate(params_list):
                if seen_ids is not None and p.repetition_penalty != 1:
                    _mark(self.seen[first + i], seen_ids[i])

    def head(self, n: int) -> SamplerRows:
        """Views of rows [0:n] (the batch of a step whose rows are the pool's first n)."""
        return self._map(lambda t: t[:n])

    def rows(self, first: int, count: int) -> SamplerRows:
        """Views of rows [first, first + count)."""
        return self._map(lambda t: t[first:first + count])

    def clone(self) -> SamplerRows:
        return self._map(torch.clone)

    def to(self, device) -> SamplerRows:
        return self._map(lambda t: t.to(device))

    def _map(self, fn) -> SamplerRows:
        return SamplerRows(**{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                              for f in fields(self)})


def _mark(seen_row: torch.Tensor, ids) -> None:
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).to(seen_row.device)
    if ids.numel():
        seen_row[ids] = 1


# ---------------------------------------------------------------- the entry point

def sample_rows(logits_BV: torch.Tensor, rows: SamplerRows, tokens_out: torch.Tensor,
                logprob_out: torch.Tensor, status_out: torch.Tensor) -> None:
    """logits (B, V) fp32 or bf16 -> tokens_out (B,) int64, logprob_out (B,) f32 (the chosen token's
    log-probability under the raw logits), status_out (B,) int32 (0 ok; 1: the row has no finite
    logit, token 0 written). Advances rows.pos and marks the tokens in rows.seen, in place.

    On CUDA: one Triton kernel launch; no host synchronisation, no allocation (CUDA-graph safe),
    deterministic. Elsewhere: the torch path (reads the parameters on the host)."""
    check_args(logits_BV, rows, tokens_out, logprob_out, status_out)
    if logits_BV.shape[0] == 0:
        return
    if logits_BV.is_cuda:
        from falcon_mamba.ops.triton_sample import sample_rows_triton

        sample_rows_triton(logits_BV, rows, tokens_out, logprob_out, status_out)
    else:
        sample_rows_torch(logits_BV, rows, tokens_out, logprob_out, status_out)


def check_args(logits_BV, rows: SamplerRows, tokens_out, logprob_out, status_out) -> None:
    """Shapes and dtypes (internal invariants: the caller builds these buffers)."""
    assert logits_BV.dim() == 2 and logits_BV.dtype in (torch.float32, torch.bfloat16, torch.float16)
    B, V = logits_BV.shape
    assert rows.batch_size == B, (rows.batch_size, B)
    for name, dt in _DTYPES.items():
        t = getattr(rows, name)
        assert t.dtype == dt and t.shape == (B,) and t.device == logits_BV.device, (name, t.dtype, t.shape)
    if rows.seen is not None:
        assert rows.seen.dtype == torch.uint8 and rows.seen.shape == (B, V), rows.seen.shape
    for t, dt in ((tokens_out, torch.int64), (logprob_out, torch.float32), (status_out, torch.int32)):
        assert t.dtype == dt and t.shape == (B,) and t.device == logits_BV.device, (t.dtype, t.shape)


# ---------------------------------------------------------------- the torch path

def keep_threshold(z_V: torch.Tensor, top_k: int, top_p: float, min_p: float) -> float:
    """tau such that the kept set of steps 4-6 is {z >= tau} (z (V,) fp32, max 0; -inf: all)."""
    V = z_V.numel()
    tau = -math.inf
    top_p = max(top_p, SMALLEST_F32) if top_p < 1 else top_p
    if 0 < top_k < V:
        vals = z_V.topk(top_k).values  # descending
        tau = float(vals[-1])
        extra = int((z_V == tau).sum()) - int((vals == tau).sum())  # ties beyond the k-th: kept
        if extra:
            vals = torch.cat([vals, vals.new_full((extra,), tau)])
        if top_p < 1:
            tau = max(tau, _nucleus_floor(vals, top_p, float(vals.double().exp().sum()), 0.0, True))
    elif top_p < 1:
        e = z_V.double().exp()
        total = float(e.sum())
        t = _nucleus_floor(z_V.topk(min(V, CANDIDATES)).values, top_p, total, 0.0, V <= CANDIDATES)
        tau = t if t is not None else _nucleus_floor_binned(z_V, e, top_p, total)
    if min_p > 0:
        tau = max(tau, float(torch.tensor(min_p, dtype=torch.float32).log()))
    return min(tau, 0.0)  # the top tokens are always kept


def _nucleus_floor(vals: torch.Tensor, top_p: float, total: float, above: float,
                   complete: bool) -> float | None:
    """The smallest kept value of step 5 among vals (descending fp32): the largest z values of a set
    whose e^z sum to total, below a mass `above` of larger ones; None when every one of vals is kept
    and the set holds more (not complete)."""
    e = vals.double().exp()
    before = torch.cat([e.new_zeros(1), e.cumsum(0)[:-1]])  # mass strictly before each position
    _, inverse, counts = torch.unique_consecutive(vals, return_inverse=True, return_counts=True)
    first = counts.cumsum(0) - counts  # each tie group's first position: its strictly-above mass
    f = (above + before[first][inverse]) / total
    n_kept = int((f < top_p).sum())  # a prefix: f is non-decreasing
    if n_kept == 0:  # only when above > 0 (the caller knows vals' top group is kept)
        n_kept = 1
    if n_kept < vals.numel() or complete:
        return float(vals[n_kept - 1])
    return None


def _nucleus_floor_binned(z_V: torch.Tensor, e_V: torch.Tensor, top_p: float, total: float) -> float:
    """Step 5's smallest kept value over a whole row without sorting it: bin the finite z by value,
    find the bin where the strictly-above mass crosses top_p * total (tokens above it are kept, below
    it dropped), recurse into that bin, sort it once it holds at most LEAF tokens."""
    fin = torch.isfinite(z_V)
    z, e = (z_V, e_V) if bool(fin.all()) else (z_V[fin], e_V[fin])  # -inf: no mass, never kept
    above = 0.0  # mass of the tokens above the current range
    while z.numel() > LEAF:
        lo, hi = float(z.min()), float(z.max())
        if lo == hi:  # one tie group: its mass above is `above`, so it is kept (the caller's bin)
            return lo
        # (z - lo) / (hi - lo) first: BINS / (hi - lo) overflows to inf when the range is tiny (a
        # huge temperature); the quotient stays in [0, 1], monotone in z
        b = ((z - lo) / (hi - lo) * BINS).floor_().clamp_(0, BINS - 1).long()
        mass = torch.bincount(b, weights=e, minlength=BINS)
        strictly_above = above + (mass.flip(0).cumsum(0).flip(0) - mass)  # per bin
        # the lowest bin whose top token is kept: its top token's f = strictly_above / total < p
        j = BINS - int((strictly_above / total < top_p).sum())
        j = min(j, BINS - 1)  # the top bin holds z = 0: its top token is always kept
        above = float(strictly_above[j])
        sel = b == j
        z, e = z[sel], e[sel]
    return _nucleus_floor(z.sort(descending=True).values, top_p, total, above, True)


def row_z(x_V: torch.Tensor, m: float, temperature: float) -> torch.Tensor:
    """Step 3: z = 0 where x == m, else (x - m) / T (fp32, IEEE division, as the kernel's)."""
    if m == math.inf:
        z = torch.where(x_V == m, 0.0, x_V - m)
    else:
        z = x_V - m  # exactly 0 where x == m (finite m: x - m == 0 only there)
    return z if temperature == 1.0 else z / temperature


def draw_row(z_V: torch.Tensor, top: int, tau: float, seed: int, pos: int) -> int:
    """Step 7: the first index of max (z + g) over {z >= tau}. top: an index with z == 0 (always
    kept); it scores g_top, so only tokens with z >= g_top - GUMBEL_MAX can beat it: the rest get
    no noise."""
    a, b = row_keys(seed, pos)
    h = lowbias32(lowbias32(top ^ a) ^ b)
    g_top = -math.log(-math.log(((h >> 9) + 0.5) * 2.0**-23))  # fp64: the margin covers fp32's error
    cand = z_V >= max(tau, g_top - GUMBEL_MAX - 1e-3)
    V = z_V.numel()
    if int(cand.sum()) > V // 4:  # most tokens: noise for all beats compacting them (nonzero is slow)
        s = (z_V + gumbel(_ids(V), a, b)).masked_fill_(~cand, -math.inf)
        return int(s.argmax())  # argmax: the first of equal maxima, so the lowest token id
    idx = cand.nonzero()[:, 0]
    s = z_V[idx] + gumbel(idx, a, b)
    return int(idx[s.argmax()])


_IDS: dict[int, torch.Tensor] = {}


def _ids(V: int) -> torch.Tensor:
    if V not in _IDS:
        _IDS[V] = torch.arange(V, dtype=torch.int32)
    return _IDS[V]


def raw_logprob_parts(x_BV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, S) per row: M = max x, S = sum of e^(x - M) counting each x == M as 1 (so a row with
    +inf logits has S = their number). log_softmax(x)_v = (x_v - M, or 0 where x_v == M) - log S."""
    M = x_BV.max(-1).values
    e = torch.sub(x_BV, M[:, None]).exp_()
    if not bool(torch.isfinite(M).all()):
        e = torch.where(x_BV == M[:, None], 1.0, e)
    return M, e.sum(-1)


def sample_rows_torch(logits_BV: torch.Tensor, rows: SamplerRows, tokens_out: torch.Tensor,
                      logprob_out: torch.Tensor, status_out: torch.Tensor) -> None:
    """The torch path of sample_rows (any device; reads the parameters on the host)."""
    B, V = logits_BV.shape
    inf = math.inf
    x = logits_BV.float().nan_to_num(nan=-inf, posinf=inf, neginf=-inf)
    M, S = raw_logprob_parts(x)
    T, K, P, MP, PEN, SEED, POS = (getattr(rows, f).tolist() for f in _DTYPES)
    xp = x
    if rows.seen is not None and any(p != 1.0 for p in PEN):
        pen = rows.penalty[:, None]
        xp = torch.where(rows.seen.bool(), torch.where(x > 0, x / pen, x * pen), x)
    top = xp.argmax(-1)
    m = xp.gather(-1, top[:, None])[:, 0]
    top_l, m_l = top.tolist(), m.tolist()
    toks, status = [], []
    for b in range(B):
        if m_l[b] == -inf:
            toks.append(0)
            status.append(1)
            continue
        if not T[b] > 0:  # 0 (or, from an unvalidated table, negative or NaN): greedy, as the kernel
            toks.append(top_l[b])
            status.append(0)
            continue
        try:
            z = row_z(xp[b], m_l[b], T[b])
            tau = keep_threshold(z, K[b], P[b], MP[b])
            toks.append(draw_row(z, top_l[b], tau, SEED[b], POS[b]))
            status.append(0)
        except (RuntimeError, ValueError, IndexError):  # a row's failure fails that row alone
            toks.append(0)
            status.append(1)
    tok = torch.tensor(toks, dtype=torch.int64, device=x.device)
    st = torch.tensor(status, dtype=torch.int32, device=x.device)
    xt = x.gather(-1, tok[:, None])[:, 0]
    lp = torch.where(xt == M, 0.0, xt - M) - S.log()
    tokens_out.copy_(tok)
    logprob_out.copy_(torch.where(st == 0, lp, -inf))
    status_out.copy_(st)
    rows.pos.add_(1)
    if rows.seen is not None:
        ok = (st == 0).nonzero()[:, 0]
        rows.seen[ok, tok[ok]] = 1
