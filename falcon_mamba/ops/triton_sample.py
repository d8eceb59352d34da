"""Sampling on the GPU inside a CUDA graph: one program per row computes ops/sample.py's function
(its docstring is the spec: penalty, temperature, top-k, top-p, min-p, Gumbel-max draw with the
counter-based hash) and writes the token, its raw logprob and a status, then advances pos and
marks the token in seen. No host synchronisation, no allocation; rows of one launch may have any
mix of options.

How a row is computed, in passes over its V logits (BLOCK at a time, 64-bit row offsets):

- pass 1, every row: the raw max and log-sum-exp (one exp per logit: a lane keeps its running max
  and rescales its sum only when the max moves), the penalised max m and its first index. Greedy
  rows and rows with no finite logit stop here.
- the draw (a "draw pass"): z = (x - m) / T (IEEE division, as the torch path), Gumbel noise from
  the hash (two lowbias32 rounds, two accurate logs: the dominant cost), the first index of max
  z + g over the eligible tokens, and for top-p the mass sum_S e^z. With temperature and min-p
  only, that is the answer: 2 passes.
- top-k or top-p without sorting: the draw's winner c is the answer iff c is kept; the kept set is
  {z >= tau}, so a "test pass" (no noise: the count and the e^z mass of z > z_c) decides it. If c
  is not kept, no token with z <= z_c is, and the next draw runs over z > z_c only (blocks with no
  eligible token skip the noise). A draw lands outside the kept set with probability (the mass
  outside) / (the mass eligible), about 1 - top_p at first, so a row typically costs pass 1 + a draw
  + a test. After MAX_REJECT rejections the exact threshold comes from a bisection instead.
- a bisection ("probe passes", no noise, no division: compare the ordered integer key of the
  penalised x with a probe key; count, mass sum_{x > probe} 2^((x - m) log2(e) / T), and the
  nearest data keys on both sides) snaps its bracket to data values, so it converges exactly, in at
  most ~32 probes and fewer where the data is sparse (the top of a row: thresholds near the top are
  found in ~15-20). Finding the threshold on x and mapping it through z is exact because z is a
  non-decreasing function of x (ties that the division creates are all kept together).
- top-k with top-p: top-p's normaliser is the mass of the top-k set, which lies between the mass
  of z >= z_c (once c is in the top k) and the whole row's; the test decides with these bounds
  where it can (always for the top token, mostly for the next few at top_p ~0.9), and otherwise
  finds the top-k threshold by a count-only bisection and the set's mass in one more pass.

The masses are fp32 sums in another order than the torch path's (fp64, sorted): a token whose
top-p mass f(z_v) is within ~1e-5 of p may be kept by one and not the other; every other kept-set
decision is exact, and the same (seed, pos, logits) give the same token as the torch path except at
such near-ties and at score near-ties (~1e-6: the logs are libdevice's __nv_logf, not the CPU's).

Cost estimate at V = 65,024 (fp32 logits, resident in L2: the lm_head wrote them just before), one
program (one SM, 16 warps: 128 thread-instructions a clock) per row, instructions per logit: pass 1
~20 (~5 us); a draw ~90 (the two accurate logs ~40, the hash 18, the division ~9: ~24 us); a test
~25 (~6 us); a probe ~15 (~4 us, near the SM's L2 read rate). At batch 1: greedy ~5 us,
temperature ~30 us, temperature + top-p ~35-40 us (+~30 us per rejected draw: a draw lands outside
the nucleus with probability ~1 - top_p), top-k + top-p ~40 us where the bounds decide and
~115 us where the top-k set's mass is needed (~18 probes x 4 us). Against a ~4 ms decode step:
~0.9% for temperature + top-p. Batch 64: one row per SM, so about the same times. Batch 256: two
rows per SM (1024 x 8 warps) and 67 MB of fp32 logits, past the 50 MB L2: roughly twice the batch-1
times. benchmarks/bench_sampler.py measures them. If the draw dominates,
the outer log (of E, where absolute error is what counts) can be the fast lg2.approx: ~20% of the
draw, at the cost of score differences of ~4e-6 against the torch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from falcon_mamba.ops import pdl
from falcon_mamba.ops.pdl import dep_sync
from falcon_mamba.ops.sample import SamplerRows, check_args
from falcon_mamba.ops.triton_helpers import LAUNCH_OPTIONS

# Four logits per thread and block: more spills registers (ptxas for sm_90: 2048 x 16 warps and
# 1024 x 8 use ~116 registers, 2048 x 8 and 4096 x 16 spill). One row per SM while the batch fits
# the SMs; past that, 8 warps so that two programs share an SM (2 x 256 threads x 118 registers).
BLOCK, NUM_WARPS = 2048, 16
BLOCK_WIDE_BATCH, NUM_WARPS_WIDE_BATCH = 1024, 8
MAX_REJECT = 3  # draw / test rounds before a bisection finds the exact threshold
# Registers per thread, told to ptxas: 65536 / (2 programs x 256 threads) or / 512 threads, what the
# two configs above may hold anyway, so it limits nothing; without it the ptxas of Triton 3.8 and 3.9
# (CUDA 12.9, 13.4) assemble their PTX of the 16-warp kernel with 64 registers and spill (3.9: 140
# bytes), where Triton 3.6's takes 102 (benchmarks/results/triton-3.6-vs-3.9-sm90a.txt).
MAXNREG = 128
_SMS: dict = {}


def default_config(B: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK, num_warps) for a launch of B rows."""
    if device.type == "cuda":
        if device not in _SMS:
            _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
        if B > _SMS[device]:
            return BLOCK_WIDE_BATCH, NUM_WARPS_WIDE_BATCH
    return BLOCK, NUM_WARPS


# ---------------------------------------------------------------- pure helpers (the spec's hash)

@triton.jit
def _lowbias32(x):
    """Wellons' lowbias32 on uint32 (products wrap mod 2**32)."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B  # a literal past 2**31 is uint32 in Triton
    x ^= x >> 16
    return x


@triton.jit
def _row_keys(seed, pos):
    """(a, b) uint32 from the int64 seed and pos (sample.row_keys)."""
    a = _lowbias32((seed & 0xFFFFFFFF).to(tl.uint32) ^ 0x9E3779B9)
    a = _lowbias32(a ^ ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
    a = _lowbias32(a ^ (pos & 0xFFFFFFFF).to(tl.uint32))
    a = _lowbias32(a ^ ((pos >> 32) & 0xFFFFFFFF).to(tl.uint32))
    return a, _lowbias32(a ^ 0x632BE5AB)


@triton.jit
def _gumbel(offs, ka, kb):
    """g = -log(-log(u)) of token ids offs (int32) under row keys (ka, kb) (sample.gumbel)."""
    h = _lowbias32(_lowbias32(offs.to(tl.uint32) ^ ka) ^ kb)
    # ((h >> 9) + 0.5) * 2**-23 without an int->float conversion: 1 + (h >> 9) * 2**-23 by the
    # bits, then - 1 and + 2**-24, both exact.
    one_plus = ((h >> 9) | 0x3F800000).to(tl.float32, bitcast=True)
    u = (one_plus - 1.0) + 5.960464477539063e-08
    return -tl.log(-tl.log(u))


@triton.jit
def _key(x):
    """fp32 -> int32, monotone (x < y <=> key(x) < key(y)); -0.0 and +0.0 share key 0."""
    bits = x.to(tl.int32, bitcast=True)
    k = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(k == -1, 0, k)


@triton.jit
def _unkey(k):
    """The inverse of _key (for keys that _key produces)."""
    return tl.where(k < 0, k ^ 0x7FFFFFFF, k).to(tl.float32, bitcast=True)


@triton.jit
def _zval(x, m, T):
    """Step 3: 0 where x == m (also m = +inf), else (x - m) / T rounded as IEEE division."""
    return tl.where(x == m, 0.0, tl.math.div_rn(x - m, T))


@triton.jit
def _load_x(x_row, seen_row, offs, msk, pen, use_pen, HAS_SEEN: tl.constexpr):
    """(raw x, penalised x) fp32 of one block; NaN and lanes past V -> -inf."""
    x = tl.load(x_row + offs, mask=msk, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("-inf"), x)
    xp = x
    if HAS_SEEN:
        if use_pen:
            sn = tl.load(seen_row + offs, mask=msk, other=0)
            xp = tl.where(sn != 0, tl.where(x > 0, tl.math.div_rn(x, pen), x * pen), x)
    return x, xp


# ---------------------------------------------------------------- passes over a row

@triton.jit
def _pass_max(x_row, seen_row, pen, use_pen, V: tl.constexpr, BLOCK: tl.constexpr,
              HAS_SEEN: tl.constexpr):
    """-> (M raw max, S = sum e^(x - M) counting x == M as 1, m penalised max, its first index)."""
    m_l = tl.full((BLOCK,), float("-inf"), tl.float32)
    s_l = tl.zeros((BLOCK,), tl.float32)
    best_v = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_i = tl.full((BLOCK,), 2147483647, tl.int32)
    for c0 in tl.range(0, V, BLOCK, num_stages=2):
        offs = c0 + tl.arange(0, BLOCK)
        msk = offs < V
        x, xp = _load_x(x_row, seen_row, offs, msk, pen, use_pen, HAS_SEEN)
        # One exp per logit: e = e^-(|x - m_l|); a new lane max rescales the old sum by it. A lane
        # still at -inf counts its -inf logits as 1; that sum is dropped below (or the row failed).
        e = tl.exp(tl.where(x == m_l, 0.0, -tl.abs(x - m_l)))
        up = x > m_l
        s_l = tl.where(up, s_l * e + 1.0, s_l + e)
        m_l = tl.maximum(m_l, x)
        take = (xp > best_v) | ((best_i == 2147483647) & msk)  # later blocks win only when larger
        best_v = tl.where(take, xp, best_v)
        best_i = tl.where(take, offs, best_i)
    M = tl.max(m_l, axis=0)
    w = tl.where(m_l == M, 1.0, tl.exp(m_l - M))
    S = tl.sum(tl.where(m_l == float("-inf"), 0.0, s_l * w), axis=0)
    m = tl.max(best_v, axis=0)
    top = tl.min(tl.where(best_v == m, best_i, 2147483647), axis=0)
    return M, S, m, top


@triton.jit
def _pass_draw(x_row, seen_row, pen, use_pen, m, T, ka, kb, z_gt, z_ge, zsum_ge, need_sum, restricted,
               V: tl.constexpr, BLOCK: tl.constexpr, HAS_SEEN: tl.constexpr):
    """-> (the first index of max z + g over z > z_gt and z >= z_ge, sum of e^z over z >= zsum_ge
    when need_sum). restricted: blocks with no eligible token skip the noise."""
    best_s = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_i = tl.full((BLOCK,), 2147483647, tl.int32)
    zs = tl.zeros((BLOCK,), tl.float32)
    for c0 in tl.range(0, V, BLOCK, num_stages=2):
        offs = c0 + tl.arange(0, BLOCK)
        msk = offs < V
        x, xp = _load_x(x_row, seen_row, offs, msk, pen, use_pen, HAS_SEEN)
        z = _zval(xp, m, T)
        if need_sum:
            zs += tl.where(msk & (z >= zsum_ge), tl.exp(z), 0.0)
        elig = msk & (z > z_gt) & (z >= z_ge)
        n_elig = BLOCK
        if restricted:
            n_elig = tl.sum(elig.to(tl.int32), axis=0)
        if n_elig > 0:
            s = tl.where(elig, z + _gumbel(offs, ka, kb), float("-inf"))
            take = s > best_s  # strict: a lane keeps its first (lowest) index among equal scores
            best_s = tl.where(take, s, best_s)
            best_i = tl.where(take, offs, best_i)
    top = tl.max(best_s, axis=0)
    tok = tl.min(tl.where(best_s == top, best_i, 2147483647), axis=0)
    return tok, tl.sum(zs, axis=0)


@triton.jit
def _pass_above(x_row, seen_row, pen, use_pen, m, T, zc, need_mass, incl, V: tl.constexpr,
                BLOCK: tl.constexpr, HAS_SEEN: tl.constexpr):
    """-> (#{z > zc}, and when need_mass the e^z mass of z > zc and of z == zc); incl: count and
    weigh z >= zc instead. Is the candidate with z = zc kept?"""
    cnt = tl.zeros((BLOCK,), tl.int32)
    mass = tl.zeros((BLOCK,), tl.float32)
    mass_eq = tl.zeros((BLOCK,), tl.float32)
    for c0 in tl.range(0, V, BLOCK, num_stages=2):
        offs = c0 + tl.arange(0, BLOCK)
        msk = offs < V
        x, xp = _load_x(x_row, seen_row, offs, msk, pen, use_pen, HAS_SEEN)
        z = _zval(xp, m, T)
        eq = msk & (z == zc)
        gt = (msk & (z > zc)) | (eq & incl)
        cnt += gt.to(tl.int32)
        if need_mass:
            e = tl.exp(z)
            mass += tl.where(gt, e, 0.0)
            mass_eq += tl.where(eq, e, 0.0)
    return tl.sum(cnt, axis=0), tl.sum(mass, axis=0), tl.sum(mass_eq, axis=0)


@triton.jit
def _topk_set(x_row, seen_row, pen, use_pen, m, T, c2, k, V: tl.constexpr, BLOCK: tl.constexpr,
              HAS_SEEN: tl.constexpr):
    """-> (tau_k, the e^z mass of z >= tau_k): top-p's normaliser under top-k, by a count-only
    bisection for the k-th largest x (z is non-decreasing in x) and one pass for the mass."""
    lo = _key(tl.full((), float("-inf"), tl.float32))
    xk = _bisect(x_row, seen_row, pen, use_pen, m, c2, lo, _key(m), k, True, 0.0, False, V, BLOCK, HAS_SEEN)
    tau_k = _zval(_unkey(xk), m, T)
    cnt, z_s, z_eq = _pass_above(x_row, seen_row, pen, use_pen, m, T, tau_k, True, True, V, BLOCK, HAS_SEEN)
    return tau_k, z_s


@triton.jit
def _pass_probe(x_row, seen_row, pen, use_pen, m, c2, t, need_mass, V: tl.constexpr,
                BLOCK: tl.constexpr, HAS_SEEN: tl.constexpr):
    """Over keys of the penalised x against the probe key t -> (#{key > t}, sum of
    2^((x - m) c2) over key > t when need_mass, max key <= t, min key > t)."""
    cnt = tl.zeros((BLOCK,), tl.int32)
    mass = tl.zeros((BLOCK,), tl.float32)
    dn = tl.full((BLOCK,), -2147483648, tl.int32)
    up = tl.full((BLOCK,), 2147483647, tl.int32)
    for c0 in tl.range(0, V, BLOCK, num_stages=2):
        offs = c0 + tl.arange(0, BLOCK)
        msk = offs < V
        x, xp = _load_x(x_row, seen_row, offs, msk, pen, use_pen, HAS_SEEN)
        kx = _key(xp)
        gt = msk & (kx > t)
        cnt += gt.to(tl.int32)
        if need_mass:
            mass += tl.where(gt, tl.where(xp == m, 1.0, tl.exp2((xp - m) * c2)), 0.0)
        dn = tl.maximum(dn, tl.where(msk & (kx <= t), kx, -2147483648))
        up = tl.minimum(up, tl.where(gt, kx, 2147483647))
    return tl.sum(cnt, axis=0), tl.sum(mass, axis=0), tl.max(dn, axis=0), tl.min(up, axis=0)


@triton.jit
def _bisect(x_row, seen_row, pen, use_pen, m, c2, lo, hi, k, use_k, p_mass, use_p, V: tl.constexpr,
            BLOCK: tl.constexpr, HAS_SEEN: tl.constexpr):
    """The smallest key of a kept x, kept = (#{x' > x} < k or not use_k) and (mass{x' > x} < p_mass
    or not use_p), a predicate that holds from some data value up. Bracket [lo, hi] (int32 keys):
    every key below lo fails, hi holds. Each probe keeps the half that holds the answer and snaps
    the bracket's ends to data keys, so it ends on the answer exactly."""
    lo = lo.to(tl.int64)
    hi = hi.to(tl.int64)
    while lo < hi:
        t = lo + (hi - lo) // 2
        cnt, mass, dn, up = _pass_probe(x_row, seen_row, pen, use_pen, m, c2, t.to(tl.int32), use_p,
                                        V, BLOCK, HAS_SEEN)
        holds = ((cnt < k) | (use_k == 0)) & ((mass < p_mass) | (use_p == 0))
        # holds at t: it holds at dn (the nearest data key <= t); else the answer is >= up
        hi = tl.where(holds, tl.maximum(dn.to(tl.int64), lo), hi)
        lo = tl.where(holds, lo, up.to(tl.int64))
    return lo.to(tl.int32)


# ---------------------------------------------------------------- the kernel

# Per-row parameter and output pointers are read and written as one scalar per program, so their
# 16-byte alignment buys nothing, and specialising on it compiled a new variant (2 s on the H200,
# every request of the step waiting) whenever a step's first tokens were drawn for rows starting at
# an odd offset of the pool's table. The logits and seen rows (vector loads) keep it.
_PER_ROW_PTRS = ["temp_ptr", "topk_ptr", "topp_ptr", "minp_ptr", "pen_ptr", "seed_ptr", "pos_ptr", "tok_ptr",
                 "lp_ptr", "st_ptr"]


@triton.jit(do_not_specialize_on_alignment=_PER_ROW_PTRS)
def _sample_kernel(x_ptr, sx, temp_ptr, topk_ptr, topp_ptr, minp_ptr, pen_ptr, seed_ptr, pos_ptr,
                   seen_ptr, s_seen, tok_ptr, lp_ptr, st_ptr, V: tl.constexpr, BLOCK: tl.constexpr,
                   HAS_SEEN: tl.constexpr, MAX_REJECT: tl.constexpr, PDL: tl.constexpr):
    dep_sync(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * sx
    seen_row = seen_ptr + row * s_seen
    T = tl.load(temp_ptr + row)
    k = tl.load(topk_ptr + row)
    p = tl.load(topp_ptr + row)
    mp = tl.load(minp_ptr + row)
    seed = tl.load(seed_ptr + row)
    pos = tl.load(pos_ptr + row)
    pen = tl.load(pen_ptr + row)
    use_pen = pen != 1.0

    M, S, m, top = _pass_max(x_row, seen_row, pen, use_pen, V, BLOCK, HAS_SEEN)
    ok = m > float("-inf")
    tok = tl.where(ok, top, 0)
    if ok & (T > 0):
        ka, kb = _row_keys(seed, pos)
        use_k = (k > 0) & (k < V)
        use_p = p < 1.0
        c2 = 1.4426950408889634 / T  # log2(e) / T (inf for a tiny T: then only x == m weighs)
        # min-p's floor, never above the top tokens (which every filter keeps: see `kept` below)
        z_ge = tl.minimum(tl.where(mp > 0, tl.log(mp), float("-inf")), 0.0)
        z_gt = tl.full((), float("-inf"), tl.float32)
        # the first draw; for top-p also the mass of the row: top-p's normaliser, or under top-k
        # an upper bound on it (the top-k set's mass is found only when a decision needs it)
        c, z_all = _pass_draw(x_row, seen_row, pen, use_pen, m, T, ka, kb, z_gt, z_ge, z_gt, use_p,
                              z_ge > float("-inf"), V, BLOCK, HAS_SEEN)
        p_mass = p * z_all
        exact = use_k == 0  # p_mass is p times the exact normaliser
        pending = use_k | use_p
        n_rej = 0
        while pending:
            xc, xcp = _load_x(x_row, seen_row, c, True, pen, use_pen, HAS_SEEN)
            zc = _zval(xcp, m, T)
            cnt, mass, mass_eq = _pass_above(x_row, seen_row, pen, use_pen, m, T, zc, use_p, False, V,
                                             BLOCK, HAS_SEEN)
            in_k = (cnt < k) | (use_k == 0)
            # kept by top-p for sure: the normaliser is at least the mass of z >= zc (all in the
            # top-k set once c is); dropped for sure: mass >= p x the row's mass, an upper bound
            surely = mass < p * (mass + mass_eq)
            if use_p & (exact == 0) & in_k & (surely == 0) & (mass < p_mass):
                tau_k, z_s = _topk_set(x_row, seen_row, pen, use_pen, m, T, c2, k, V, BLOCK, HAS_SEEN)
                p_mass = p * z_s
                z_ge = tl.maximum(z_ge, tau_k)
                exact = use_k | True
            in_p = surely | (exact & (mass < p_mass)) | (use_p == 0)
            kept = (in_k & in_p) | (zc >= 0.0)
            if kept == 0:
                n_rej += 1
                z_gt = zc
                if n_rej >= MAX_REJECT:
                    if use_p & (exact == 0):
                        tau_k, z_s = _topk_set(x_row, seen_row, pen, use_pen, m, T, c2, k, V, BLOCK, HAS_SEEN)
                        p_mass = p * z_s
                        z_ge = tl.maximum(z_ge, tau_k)
                        exact = use_k | True
                    xt = _bisect(x_row, seen_row, pen, use_pen, m, c2, _key(xcp) + 1, _key(m), k, use_k,
                                 p_mass, use_p, V, BLOCK, HAS_SEEN)
                    z_ge = tl.maximum(z_ge, _zval(_unkey(xt), m, T))
                c, z_unused = _pass_draw(x_row, seen_row, pen, use_pen, m, T, ka, kb, z_gt, z_ge, z_gt,
                                         False, True, V, BLOCK, HAS_SEEN)
            pending = (kept == 0) & (n_rej < MAX_REJECT)
        tok = c

    xr = tl.load(x_row + tok).to(tl.float32)
    lp = tl.where(xr == M, 0.0, xr - M) - tl.log(S)
    tl.store(tok_ptr + row, tok.to(tl.int64))
    tl.store(lp_ptr + row, tl.where(ok, lp, float("-inf")))
    tl.store(st_ptr + row, tl.where(ok, 0, 1))
    tl.store(pos_ptr + row, pos + 1)
    if HAS_SEEN:
        tl.store(seen_row + tok, 1, mask=ok)


def sample_rows_triton(logits_BV: torch.Tensor, rows: SamplerRows, tokens_out: torch.Tensor,
                       logprob_out: torch.Tensor, status_out: torch.Tensor, block: int | None = None,
                       num_warps: int | None = None, max_reject: int | None = None) -> None:
    """sample_rows as one launch of B programs (see ops/sample.py). block / num_warps / max_reject
    override the defaults (BLOCK, NUM_WARPS, MAX_REJECT): the benchmark sweeps them; the tests use
    small blocks to cross block edges and max_reject=1 to reach the bisection more often."""
    check_args(logits_BV, rows, tokens_out, logprob_out, status_out)
    assert logits_BV.stride(1) == 1, "logits (B, V), rows contiguous"
    B, V = logits_BV.shape
    assert V < 2**31 - 1, "vocab too large for int32 token ids"
    for t in (rows.temperature, rows.top_k, rows.top_p, rows.min_p, rows.penalty, rows.seed, rows.pos,
              tokens_out, logprob_out, status_out):
        assert t.stride(0) == 1, "per-row tensors must be contiguous"
    if B == 0:
        return
    has_seen = rows.seen is not None
    seen = rows.seen if has_seen else rows.pos  # any pointer: never read without HAS_SEEN
    if has_seen:
        assert seen.stride(1) == 1
    blk, warps = default_config(B, logits_BV.device)
    blk = block or min(blk, triton.next_power_of_2(V))
    _sample_kernel[(B,)](logits_BV, logits_BV.stride(0), rows.temperature, rows.top_k, rows.top_p,
                         rows.min_p, rows.penalty, rows.seed, rows.pos, seen,
                         seen.stride(0) if has_seen else 0,
                         tokens_out, logprob_out, status_out, V=V, BLOCK=blk, HAS_SEEN=has_seen,
                         MAX_REJECT=max_reject or MAX_REJECT, num_warps=num_warps or warps,
                         maxnreg=MAXNREG, **pdl.launch_kwargs(logits_BV.device), **LAUNCH_OPTIONS)
