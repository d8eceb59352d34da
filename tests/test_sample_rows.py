"""Device-side sampling (ops/sample.py, ops/triton_sample.py): the torch path against a direct
definition (full sort, noise for every token), the kernel (Triton's interpreter on CPU) against the
torch path, the hash, extreme values, row independence, and the draw's distribution."""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from falcon_mamba.ops import sample as S  # noqa: E402
from falcon_mamba.ops.sample import SamplerRows, gumbel, row_keys, sample_rows  # noqa: E402
from falcon_mamba.sampling import SamplingParams as SP  # noqa: E402

try:  # the dev extra installs triton on Linux; elsewhere the kernel tests skip
    import triton
    import triton.language as tl

    from falcon_mamba.ops import triton_sample as ts
except ImportError:
    triton = ts = None

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INF = math.inf


# the interpreter's numpy warns on the inf - inf and overflowing lanes that the kernel masks off
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors; avoids waiting on descheduled workers
    yield
    torch.set_num_threads(n)


def triton_sample():
    if ts is None:
        pytest.skip("triton is not installed")
    return ts


if ts is not None:
    @triton.jit
    def _noise_kernel(seed_ptr, pos_ptr, h_ptr, g_ptr, N: tl.constexpr):
        seed, pos = tl.load(seed_ptr), tl.load(pos_ptr)
        ka, kb = ts._row_keys(seed, pos)
        offs = tl.arange(0, N)
        h = ts._lowbias32(ts._lowbias32(offs.to(tl.uint32) ^ ka) ^ kb)
        tl.store(h_ptr + offs, h.to(tl.int64))
        tl.store(g_ptr + offs, ts._gumbel(offs, ka, kb))

    @triton.jit
    def _bisect_kernel(x_ptr, T, k, p_mass, use_k, use_p, lo, out_ptr, V: tl.constexpr, BLOCK: tl.constexpr):
        m = tl.max(tl.load(x_ptr + tl.arange(0, BLOCK), mask=tl.arange(0, BLOCK) < V, other=float("-inf")))
        c2 = 1.4426950408889634 / T
        key = ts._bisect(x_ptr, x_ptr, 1.0, False, m, c2, lo, ts._key(m), k, use_k != 0, p_mass, use_p != 0,
                         V, BLOCK, False)
        tl.store(out_ptr, ts._unkey(key))


# ---------------------------------------------------------------- the definition, written directly

def spec_row(x, seen, T, k, p, mp, pen, seed, pos):
    """(token, status) of one row by the definition (ops/sample.py's docstring): full sort, the
    top-p mass of every token in fp64 by brute force, noise for every token."""
    x = x.float().nan_to_num(nan=-INF, posinf=INF, neginf=-INF)
    V = x.numel()
    if seen is not None and pen != 1:
        x = torch.where(seen.bool(), torch.where(x > 0, x / pen, x * pen), x)
    m = x.max()
    if m == -INF:
        return 0, 1
    if T == 0:
        return int(x.argmax()), 0
    z = torch.where(x == m, 0.0, (x - m) / torch.tensor(T, dtype=torch.float32))
    keep = torch.ones(V, dtype=torch.bool)
    if 0 < k < V:
        keep &= z >= z.sort(descending=True).values[k - 1]
    if p < 1:
        asc = z[keep].double().sort().values
        upto = asc.exp().cumsum(0)  # mass of the survivors <= each value
        le = upto[torch.searchsorted(asc, z.double(), right=True).clamp_min(1) - 1]
        f = (upto[-1] - le) / upto[-1]  # strictly more likely mass over the top-k survivors
        keep &= f < max(p, 2.0**-149)
    if mp > 0:
        keep &= z >= torch.tensor(mp, dtype=torch.float32).log()
    a, b = row_keys(seed, pos)
    s = torch.where(keep, z + gumbel(torch.arange(V), a, b), -INF)
    return int(s.argmax()), 0


def spec_batch(x_BV, rows: SamplerRows):
    vals = [t.cpu().tolist() for t in (rows.temperature, rows.top_k, rows.top_p, rows.min_p, rows.penalty,
                                      rows.seed, rows.pos)]
    seen = None if rows.seen is None else rows.seen.cpu()
    out = [spec_row(x_BV[b].cpu(), None if seen is None else seen[b], *(v[b] for v in vals))
           for b in range(x_BV.shape[0])]
    return [t for t, _ in out], [s for _, s in out]


def run(fn, x_BV, rows, **kw):
    B = x_BV.shape[0]
    tok = torch.full((B,), -1, dtype=torch.int64, device=x_BV.device)
    lp = torch.full((B,), 7.0, device=x_BV.device)
    st = torch.full((B,), -1, dtype=torch.int32, device=x_BV.device)
    fn(x_BV, rows, tok, lp, st, **kw)
    return tok.cpu(), lp.cpu(), st.cpu()


def raw_logprob(x_BV, tok):
    """log_softmax of the raw logits at tok; a row with +inf logits splits the mass among them."""
    x = x_BV.float().cpu().nan_to_num(nan=-INF, posinf=INF, neginf=-INF)
    lp = x.log_softmax(-1).gather(-1, tok[:, None])[:, 0]
    n_inf = (x == INF).sum(-1)
    at_inf = x.gather(-1, tok[:, None])[:, 0] == INF
    return torch.where(n_inf > 0, torch.where(at_inf, -n_inf.double().log().float(), -INF), lp)


# ---------------------------------------------------------------- the hash

def test_hash_matches_python_integers(rng):
    """lowbias32 on int32 tensors (products overflow and must wrap mod 2**32, right shifts must not
    drag the sign in) equals the arbitrary-precision Python version, at the extremes too; u stays
    inside (0, 1); g <= GUMBEL_MAX."""
    xs = torch.randint(0, 2**32, (2000,), generator=rng, dtype=torch.int64)
    xs[:4] = torch.tensor([0, 1, 2**31, 2**32 - 1])
    bits = torch.where(xs >= 2**31, xs - 2**32, xs).to(torch.int32)
    got = (S.lowbias32_t(bits).to(torch.int64) & S.MASK32).tolist()
    assert got == [S.lowbias32(v) for v in xs.tolist()]
    assert bits.tolist() == torch.where(xs >= 2**31, xs - 2**32, xs).tolist()  # the input is left alone
    assert max(got) >= 2**31  # the high half is reached
    for seed, pos in [(0, 0), (1, 0), (0, 1), (2**63 - 1, 2**40 + 3), (-5, 7)]:
        a, b = row_keys(seed, pos)
        assert 0 <= a < 2**32 and 0 <= b < 2**32
    assert row_keys(3, 0) != row_keys(3, 1) != row_keys(4, 1)
    ids = torch.arange(50000)
    h = S.token_hash(ids, *row_keys(9, 2))
    assert h.dtype == torch.int32 and h.unique().numel() == ids.numel()  # one step: a bijection of ids
    u = S.uniform_from_hash(torch.tensor([0, 2**9 - 1, 2**32 - 1, 2**32 - 2**9]))
    assert u.tolist() == [2.0**-24, 2.0**-24, 1 - 2.0**-24, 1 - 2.0**-24]
    g = gumbel(ids, *row_keys(9, 2))
    assert bool(torch.isfinite(g).all()) and float(g.max()) <= S.GUMBEL_MAX < 16.7
    assert abs(float(g.mean()) - 0.5772) < 0.02 and abs(float(g.var()) - math.pi**2 / 6) < 0.05


def test_kernel_hash_equals_torch_hash():
    """The kernel's row keys, hash bits and Gumbel noise (@triton.jit helpers) against the torch ones."""
    triton_sample()
    N = 512
    for seed, pos in [(0, 0), (12345, 17), (2**62 + 99, 2**33 + 5), (-77, 3)]:
        h = torch.empty(N, dtype=torch.int64, device=DEV)
        g = torch.empty(N, device=DEV)
        _noise_kernel[(1,)](torch.tensor([seed], device=DEV), torch.tensor([pos], device=DEV), h, g, N=N)
        a, b = row_keys(seed, pos)
        ids = torch.arange(N)
        assert torch.equal(h.cpu(), S.token_hash(ids, a, b).to(torch.int64) & S.MASK32)
        torch.testing.assert_close(g.cpu(), gumbel(ids, a, b), rtol=2e-6, atol=2e-6)


def test_kernel_bisection_finds_exact_thresholds(rng):
    """_bisect alone: the smallest x whose strictly-greater count is < k (the k-th largest, ties
    counted), or whose strictly-greater mass is < p_mass, exactly, on rows with ties and -inf."""
    triton_sample()
    V = 300
    for case in range(6):
        x = torch.randn(V, generator=rng) * (0.2 if case % 2 else 3.0)
        x[::17] = x[5]  # ties
        x[::29] = -INF
        xs = x.sort(descending=True).values
        lo = int(torch.tensor(-INF).view(torch.int32)) ^ 0x7FFFFFFF
        lo = lo - 2**32 if lo >= 2**31 else lo
        k = [1, 3, 16, 17, 150, 299][case]
        out = torch.empty(1, device=DEV)
        _bisect_kernel[(1,)](x.to(DEV), 1.0, k, 0.0, 1, 0, lo, out, V=V, BLOCK=512)
        assert out.item() == xs[k - 1].item(), (case, k)
        T = 0.7
        w = ((x.double() - x.max()) / T).exp()
        above = torch.stack([w[x > v].sum() for v in x])  # mass strictly above each value
        target = float(above.sort().values[V // (case + 2)]) * 0.999 + 1e-9  # between two steps
        out_p = torch.empty(1, device=DEV)
        _bisect_kernel[(1,)](x.to(DEV), T, 0, target, 0, 1, lo, out_p, V=V, BLOCK=512)
        assert out_p.item() == x[above < target].min().item(), case


# ---------------------------------------------------------------- parameters

def test_rows_from_params_clamp_and_set_row():
    V = 50
    params = [SP(temperature=0.5, top_k=V), SP(top_k=2**40, top_p=1e-50), SP(top_k=7, min_p=0.2),
              SP(repetition_penalty=1.5)]
    rows = SamplerRows.from_params(params, [1, 2, 2**64 - 1, 4], "cpu", V, seen_ids=[[3, 4], [], [49], [0]])
    assert rows.top_k.tolist() == [0, 0, 7, 0]  # >= V (and past int32): off
    assert rows.top_p[1].item() == 2.0**-149  # rounds to 0 in fp32: the smallest positive fp32
    assert rows.seed.tolist() == [1, 2, -1, 4] and rows.pos.tolist() == [0] * 4
    assert rows.seen.dtype == torch.uint8 and rows.seen.sum(-1).tolist() == [2, 0, 1, 1]
    rows.set_row(0, SP(temperature=0.0, repetition_penalty=2.0), seed=9, pos=5, seen_ids=[1, 2, 3])
    assert rows.temperature[0] == 0 and rows.penalty[0] == 2.0 and rows.seed[0] == 9 and rows.pos[0] == 5
    assert rows.seen[0].nonzero()[:, 0].tolist() == [1, 2, 3]
    head = rows.head(2)
    assert head.batch_size == 2 and head.seen.shape == (2, V)
    head.pos.add_(1)  # views: the table sees it
    assert rows.pos.tolist() == [6, 1, 0, 0]
    plain = SamplerRows.from_params([SP()], [0], "cpu", V)
    assert plain.seen is None
    with pytest.raises(ValueError, match="seen"):
        plain.set_row(0, SP(repetition_penalty=1.2), seed=0)
    empty = SamplerRows.empty(3, "cpu", vocab_size=V)
    assert empty.temperature.tolist() == [0.0] * 3 and empty.top_p.tolist() == [1.0] * 3


# ---------------------------------------------------------------- the torch path

def mixed_params():
    """Every option alone and combined, with ties and extreme settings."""
    return [
        SP(temperature=0.0),
        SP(temperature=1.0),
        SP(temperature=0.6),
        SP(temperature=1.3, top_k=5),
        SP(temperature=1.0, top_k=1),
        SP(temperature=0.8, top_p=0.9),
        SP(temperature=1.5, top_p=0.3),
        SP(temperature=1.0, min_p=0.05),
        SP(temperature=1.0, top_k=12, top_p=0.7),
        SP(temperature=0.9, top_k=40, top_p=0.95, min_p=0.02, repetition_penalty=1.3),
        SP(temperature=0.0, repetition_penalty=2.0),
        SP(temperature=1.0, repetition_penalty=0.7, top_p=0.8),
        SP(temperature=3.0, top_p=0.02),  # flat and a tiny nucleus: draws get rejected
        SP(temperature=2.0, top_k=3),  # flat: the top-3 hold little mass
    ]


def mixed_batch(rng, V, dtype=torch.float32, scale=2.0):
    params = mixed_params()
    B = len(params)
    x = torch.randn(B, V, generator=rng) * scale
    x[2, ::7] = x[2].max()  # many ties at the maximum
    x[4, :] = x[4].round()  # ties everywhere
    seen = [torch.randperm(V, generator=rng)[: V // 5].tolist() for _ in range(B)]
    rows = SamplerRows.from_params(params, [11 * b + 3 for b in range(B)], "cpu", V, seen_ids=seen)
    return x.to(dtype), rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_equals_the_definition(rng, dtype, monkeypatch):
    """The torch path (candidates, bins, noise only where it can win) picks exactly the definition's
    token, over several steps (pos advances, seen grows), with few candidates and small bins so
    that nuclei reach past the candidates and the bins recurse."""
    monkeypatch.setattr(S, "CANDIDATES", 4)
    monkeypatch.setattr(S, "BINS", 8)
    monkeypatch.setattr(S, "LEAF", 6)
    x, rows = mixed_batch(rng, 401, dtype)
    for step in range(3):
        want, want_st = spec_batch(x, rows)
        seen_before = rows.seen.clone()
        tok, lp, st = run(S.sample_rows_torch, x, rows)
        assert tok.tolist() == want and st.tolist() == want_st == [0] * x.shape[0], step
        assert rows.pos.tolist() == [step + 1] * x.shape[0]
        assert torch.equal(rows.seen, seen_before.index_put((torch.arange(x.shape[0]), tok), torch.tensor(1,
                                                            dtype=torch.uint8)))
        torch.testing.assert_close(lp, raw_logprob(x, tok), rtol=1e-5, atol=1e-5)
        x = x.roll(3 * step + 1, dims=-1)


def test_torch_path_on_a_real_vocab_size(rng):
    """V = 65,024: the same tokens as the definition; on a steep row, noise only for the tokens that
    can still beat the top one (z >= g_top - GUMBEL_MAX), on a flatter one for the whole row."""
    V = 65024
    x = torch.randn(4, V, generator=rng) * torch.tensor([[8.0], [2.0], [4.0], [4.0]])
    params = [SP(temperature=1.0), SP(temperature=1.0), SP(temperature=0.7, top_p=0.9),
              SP(temperature=1.0, top_k=50, top_p=0.9, min_p=0.01)]
    rows = SamplerRows.from_params(params, [5, 6, 7, 8], "cpu", V)
    want = [spec_row(x[b], None, p.temperature, p.top_k, p.top_p, p.min_p, 1.0, 5 + b, 0)[0]
            for b, p in enumerate(params)]
    scored = []
    real = S.gumbel
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S, "gumbel", lambda ids, a, b: scored.append(ids.numel()) or real(ids, a, b))
        tok, _, _ = run(S.sample_rows_torch, x, rows)
    assert tok.tolist() == want
    z0 = x[0] - x[0].max()  # g_top >= -2.9, so the cut is above -GUMBEL_MAX - 2.9
    assert 0 < scored[0] <= int((z0 >= -S.GUMBEL_MAX - 2.9).sum()) < V // 4, scored
    assert scored[1] == V  # most tokens can win: noise for all, no compaction


def test_greedy_is_argmax_and_all_inf_rows_fail_alone(rng):
    V = 97
    x = torch.randn(5, V, generator=rng)
    x[1] = float("-inf")
    x[2, :] = float("nan")
    x[3, 10] = x[3, 20] = 50.0  # tie: the first
    rows = SamplerRows.from_params([SP(temperature=0.0)] * 4 + [SP(temperature=1.0)], [0] * 5, "cpu", V)
    tok, lp, st = run(sample_rows, x, rows)
    assert st.tolist() == [0, 1, 1, 0, 0]
    assert tok[[0, 3]].tolist() == [int(x[0].argmax()), 10] and tok[[1, 2]].tolist() == [0, 0]
    assert lp[1] == -INF and lp[2] == -INF and bool(torch.isfinite(lp[[0, 3, 4]]).all())


# ---------------------------------------------------------------- distribution of the draw

def draw_many(z_V, tau, seeds, pos):
    """Step 7 for many (seed, pos) at once: argmax over {z >= tau} of z + g, g from the hash."""
    keys = torch.tensor([row_keys(s, p) for s, p in zip(seeds, pos)])
    a = torch.where(keys[:, :1] >= 2**31, keys[:, :1] - 2**32, keys[:, :1]).to(torch.int32)
    b = torch.where(keys[:, 1:] >= 2**31, keys[:, 1:] - 2**32, keys[:, 1:]).to(torch.int32)
    ids = torch.arange(z_V.numel(), dtype=torch.int32)[None, :]
    h = S.lowbias32_t(S.lowbias32_t(ids ^ a) ^ b)  # (n, V)
    g = S.uniform_from_hash(h).log().neg().log().neg()
    return torch.where(z_V >= tau, z_V + g, -INF).argmax(-1)


PROBS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], dtype=torch.float64)
X6 = PROBS.log().float()[torch.tensor([2, 0, 5, 1, 4, 3])]  # shuffled: token ids are not the ranks
BY_RANK = torch.tensor([1, 3, 0, 5, 4, 2])  # token ids by rank


def check_frequencies(tok, x_V, T, keep_ids):
    n = tok.numel()
    freq = torch.bincount(tok, minlength=x_V.numel()).double() / n
    q = torch.where(keep_ids, ((x_V.double() - x_V.max()) / T).exp(), 0.0)
    want = q / q.sum()
    sigma = (want * (1 - want) / n).sqrt()
    assert bool((freq[~keep_ids] == 0).all()), (freq, keep_ids)
    assert bool(((freq - want).abs() <= 5 * sigma + 1e-12).all()), (freq, want)


@pytest.mark.parametrize("params, keep, vary", [
    (SP(temperature=1.0), [1, 1, 1, 1, 1, 1], "seed"),
    (SP(temperature=0.5), [1, 1, 1, 1, 1, 1], "pos"),
    (SP(temperature=1.0, top_k=3), [1, 1, 1, 0, 0, 0], "seed"),
    # masses 0.4 0.25 0.15 0.1 0.06 0.04: strictly-above mass 0, .4, .65, .8, .9, .96; top_p 0.7 keeps 3
    (SP(temperature=1.0, top_p=0.7), [1, 1, 1, 0, 0, 0], "pos"),
    (SP(temperature=1.0, top_p=0.81), [1, 1, 1, 1, 0, 0], "seed"),
    (SP(temperature=1.0, min_p=0.3), [1, 1, 1, 0, 0, 0], "seed"),  # p >= 0.3 * 0.4 = 0.12
    (SP(temperature=2.0, top_k=5, top_p=0.9), None, "pos"),  # top_p over the renormalised top 5
])
def test_draws_follow_softmax_on_the_kept_set(params, keep, vary):
    """Empirical frequencies of 40,000 draws (seeds 0..n-1, or one seed at pos 0..n-1) match
    softmax(z) on the kept set (5 sigma per token; zero outside): the hash's noise is Gumbel enough,
    and each filter keeps what it should."""
    if keep is None:  # top-5 at T=2: sqrt(p) renormalised over ranks 0-4, then top-p 0.9
        q = PROBS.sqrt()[:5] / PROBS.sqrt()[:5].sum()
        before = torch.cat([torch.zeros(1, dtype=torch.float64), q.cumsum(0)[:-1]])
        keep = (before < 0.9).tolist() + [False]
    keep_ids = torch.zeros(6, dtype=torch.bool)
    keep_ids[BY_RANK[torch.tensor(keep, dtype=torch.bool)]] = True
    z = S.row_z(X6, float(X6.max()), params.temperature)
    tau = S.keep_threshold(z, params.top_k, params.top_p, params.min_p)
    assert torch.equal(z >= tau, keep_ids)
    n = 40000
    seeds, pos = (range(n), [0] * n) if vary == "seed" else ([42] * n, range(n))
    check_frequencies(draw_many(z, tau, seeds, pos), X6, params.temperature, keep_ids)


def test_sample_rows_draws_follow_softmax():
    """The same through sample_rows end to end (3,000 rows with seeds 0..n-1): temperature 0.8 and
    top_p 0.75 keep ranks 0-2 (strictly-above masses at T=0.8: 0, .46, .72, .85, ...)."""
    n = 3000
    rows = SamplerRows.from_params([SP(temperature=0.8, top_p=0.75)] * n, list(range(n)), "cpu", 6)
    tok, _, st = run(sample_rows, X6[None].repeat(n, 1), rows)
    assert bool((st == 0).all()) and rows.pos.tolist() == [1] * n
    keep_ids = torch.zeros(6, dtype=torch.bool)
    keep_ids[BY_RANK[:3]] = True
    check_frequencies(tok, X6, 0.8, keep_ids)


# ---------------------------------------------------------------- the kernel against the torch path

def explained(x_V, seen_V, params, tok_kernel, tok_ref):
    """A kernel token that differs from the torch path's is allowed only at a near-tie: it wins
    under a top_p within 2e-5 of the row's, or its score is within 1e-5 of the winner's."""
    T, k, p, mp, pen, seed, pos = params
    x = x_V.float().nan_to_num(nan=-INF, posinf=INF, neginf=-INF)
    if seen_V is not None and pen != 1:
        x = torch.where(seen_V.bool(), torch.where(x > 0, x / pen, x * pen), x)
    z = S.row_z(x, float(x.max()), T)
    s = z + gumbel(torch.arange(z.numel()), *row_keys(seed, pos))
    for dp in (-2e-5, 0.0, 2e-5):
        pp = min(max(p + dp, 2.0**-149), 1.0) if p < 1 else p
        kept = z >= S.keep_threshold(z, k, pp, mp)
        if kept[tok_kernel] and s[tok_kernel] >= s[kept].max() - 1e-5:
            return True
    return False


def compare_kernel(x, rows, steps=1, **kw):
    """Run the kernel and the torch path side by side on copies of rows; same tokens (or explained
    near-ties), statuses, logprobs, pos and seen."""
    ts = triton_sample()
    rk = rows.clone().to(DEV)
    rt = rows.clone()
    xk = x.to(DEV)
    mismatches = 0
    for _ in range(steps):
        vals = [getattr(rt, f).tolist() for f in ("temperature", "top_k", "top_p", "min_p", "penalty", "seed",
                                                   "pos")]
        seen = None if rt.seen is None else rt.seen.clone()
        tk, lk, sk = run(ts.sample_rows_triton, xk, rk, **kw)
        tt, lt, st = run(S.sample_rows_torch, x, rt)
        assert sk.tolist() == st.tolist()
        for b in torch.nonzero(tk != tt)[:, 0].tolist():
            mismatches += 1
            assert explained(x[b], None if seen is None else seen[b], [v[b] for v in vals], int(tk[b]),
                             int(tt[b])), (b, int(tk[b]), int(tt[b]))
            if rk.seen is not None:
                rk.seen[b].copy_(rt.seen[b].to(DEV))  # carry on from the same state
        ok = st == 0
        torch.testing.assert_close(lk[ok], raw_logprob(x, tk)[ok], rtol=2e-5, atol=2e-5)
        assert bool((lk[~ok] == -INF).all())
        assert torch.equal(rk.pos.cpu(), rt.pos)
        if rt.seen is not None:
            assert torch.equal(rk.seen.cpu(), rt.seen)
    assert mismatches <= max(1, steps * x.shape[0] // 20), mismatches


@pytest.mark.parametrize("dtype, V, block, max_reject", [(torch.float32, 333, 128, None),
                                                         (torch.bfloat16, 333, 512, 1)])
def test_kernel_equals_torch_path_mixed_rows(rng, dtype, V, block, max_reject):
    """Every option alone and combined, rows of different options in one launch, blocks that end
    inside the row (V = 333 with 128-wide blocks), two steps; max_reject=1: every rejected draw
    goes to the bisection."""
    x, rows = mixed_batch(rng, V, dtype)
    compare_kernel(x, rows, steps=2, block=block, max_reject=max_reject)


def test_kernel_thresholds_on_flat_rows(rng):
    """Flat rows and small kept sets, where the first draw almost always lands outside the kept set:
    the draw / test chain and (max_reject=1) the bisection must find the exact thresholds."""
    V = 257
    params = [SP(temperature=1.0, top_k=2), SP(temperature=1.0, top_k=9), SP(temperature=1.0, top_p=0.04),
              SP(temperature=1.0, top_p=0.3), SP(temperature=1.0, top_k=20, top_p=0.2),
              SP(temperature=0.5, top_k=6, top_p=0.6, min_p=0.9), SP(temperature=1.0, top_k=30, min_p=0.8),
              SP(temperature=1.0, top_p=0.1, repetition_penalty=3.0)]
    x = torch.randn(len(params), V, generator=rng) * 0.3
    rows = SamplerRows.from_params(params, list(range(len(params))), "cpu", V,
                                   seen_ids=[torch.randperm(V, generator=rng)[:100].tolist()] * len(params))
    compare_kernel(x, rows, steps=2, block=256, max_reject=1)
    compare_kernel(x, rows, steps=1, block=256)


def test_kernel_extreme_values(rng):
    """NaN, +inf, all -inf rows (status 1, the others unaffected), temperature 1e-45 and past fp32's
    range, top_p 1e-30, top_k 2**31 - 1 and >= V, min_p 1, penalties 1e-3, 1e3 and below fp32's
    range, logits of 3e38."""
    V = 200
    cases = [
        (SP(temperature=1.0), "nan"),
        (SP(temperature=0.0), "nan"),
        (SP(temperature=1.0, top_p=0.9), "+inf"),
        (SP(temperature=0.0), "+inf"),
        (SP(temperature=1.0), "-inf"),
        (SP(temperature=0.0), "-inf"),
        (SP(temperature=1e-45), "ties"),
        (SP(temperature=1.0, top_p=1e-30), "ties"),
        (SP(temperature=1.0, top_p=1e-50), "ties"),  # rounds to 0 in fp32
        (SP(temperature=1.0, top_k=2**31 - 1), ""),
        (SP(temperature=0.7, top_k=V), ""),
        (SP(temperature=1.0, min_p=1.0), "ties"),
        (SP(temperature=1.0, repetition_penalty=1e-3), "big"),
        (SP(temperature=1.0, repetition_penalty=1e3, top_k=4, top_p=0.5), "big"),
        (SP(temperature=0.5, top_p=0.8), "big"),
        (SP(temperature=3.4028235677973366e38, top_p=0.5), ""),  # rounds to inf in fp32: clamped
        (SP(temperature=1.7e36, top_p=0.5, repetition_penalty=1e-300), "big"),  # penalty rounds to 0
    ]
    x = torch.randn(len(cases), V, generator=rng) * 3
    for b, (_, kind) in enumerate(cases):
        if kind == "nan":
            x[b, ::3] = float("nan")
        elif kind == "+inf":
            x[b, [5, 77]] = INF
        elif kind == "-inf":
            x[b] = -INF
        elif kind == "ties":
            x[b, [3, 50, 199]] = x[b].max() + 1
        elif kind == "big":
            x[b] = x[b].sign() * 3e38
    seen = [list(range(0, V, 2))] * len(cases)
    rows = SamplerRows.from_params([c for c, _ in cases], list(range(len(cases))), "cpu", V, seen_ids=seen)
    tok, lp, st = run(S.sample_rows_torch, x, rows.clone())
    assert st.tolist() == [0, 0, 0, 0, 1, 1] + [0] * (len(cases) - 6)
    assert tok[0] % 3 != 0 and tok[2] in (5, 77) and tok[3] == 5 and tok[[4, 5]].tolist() == [0, 0]
    for b in (6, 7, 8, 11):  # the tied top tokens only
        assert tok[b] in (3, 50, 199), (b, tok[b])
    assert x[12, tok[12]] > 0 and tok[12] % 2 == 0  # a seen 3e38 / 1e-3 = +inf
    assert x[13, tok[13]] > 0 and tok[13] % 2 == 1  # seen positives divided, seen negatives -inf
    assert x[14, tok[14]] > 0
    assert lp[2].item() == pytest.approx(-math.log(2)) and lp[3].item() == pytest.approx(-math.log(2))
    assert rows.temperature[15].item() == torch.finfo(torch.float32).max
    assert rows.penalty[16].item() == torch.finfo(torch.float32).tiny
    compare_kernel(x, rows, steps=2, block=128, max_reject=2)


@pytest.mark.parametrize("path", ["torch", "kernel"])
def test_rows_are_independent(rng, path):
    """A row's token depends only on its logits, parameters, seed and pos: each row of a mixed batch
    gets what it gets alone, and the batch's results do not change when other rows do."""
    fn = S.sample_rows_torch if path == "torch" else triton_sample().sample_rows_triton
    V = 150
    x, rows = mixed_batch(rng, V)
    rows = rows.to(DEV)
    x = x.to(DEV)
    pick = [1, 5, 8, 9, 12]

    def sub(idx):
        return SamplerRows(**{f: (None if v is None else v[idx].clone()) for f, v in vars(rows).items()})

    full = run(fn, x, sub(list(range(x.shape[0]))))[0]
    for b in pick:
        assert run(fn, x[b:b + 1], sub([b]))[0].item() == full[b].item()
    other = x.clone()
    other[[0, 2, 3]] = torch.randn(3, V, generator=rng).to(DEV)
    assert torch.equal(run(fn, other, sub(list(range(x.shape[0]))))[0][pick], full[pick])
    rows.pos.add_(1)  # the next draw differs (for most rows)
    assert not torch.equal(run(fn, x, sub(list(range(x.shape[0]))))[0], full)


@pytest.mark.cuda
def test_kernel_on_the_gpu_at_full_size_in_a_graph():
    """V = 65,024 on CUDA: same tokens as the torch path (near-ties aside), and replaying a captured
    graph advances pos and gives the same tokens as eager calls."""
    ts = triton_sample()
    g = torch.Generator().manual_seed(0)
    V, B = 65024, 16
    x = (torch.randn(B, V, generator=g) * 3).to(torch.bfloat16)
    params = (mixed_params() * 2)[:B]
    rows = SamplerRows.from_params(params, list(range(B)), "cpu", V, seen_ids=[list(range(0, V, 9))] * B)
    compare_kernel(x, rows, steps=3)
    rows = rows.to("cuda")
    xc = x.cuda()
    tok = torch.empty(B, dtype=torch.int64, device="cuda")
    lp, st = torch.empty(B, device="cuda"), torch.empty(B, dtype=torch.int32, device="cuda")
    eager_rows = rows.clone()
    eager = [run(ts.sample_rows_triton, xc, eager_rows)[0] for _ in range(3)]
    ts.sample_rows_triton(xc, rows.clone(), tok, lp, st)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ts.sample_rows_triton(xc, rows, tok, lp, st)
    for i in range(3):
        graph.replay()
        assert torch.equal(tok.cpu(), eager[i]), i
    assert rows.pos.tolist() == [3] * B
