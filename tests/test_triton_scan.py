"""Triton selective scan (ops/triton_scan.py) against the reference, forward and backward.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1) on small shapes; the
cuda-marked tests cover dtypes, lengths 1, 17, 4096 and 65,600, widths, and a tensor past 2^31
elements (32-bit offsets would overflow).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from falcon_mamba.errors import UserError  # noqa: E402
from falcon_mamba.ops import reference, triton_backend, triton_helpers, triton_scan, triton_scan_bwd  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (6e-4, 2e-3), torch.bfloat16: (3e-2, 5e-2), torch.float16: (3e-2, 5e-2)}


def scan_inputs(B, L, D, N, dtype, device, gen, reset=False):
    """Random scan inputs in a realistic range (dt around softplus(-1), A = -exp(...))."""
    r = lambda *s, scale=1.0, shift=0.0: (torch.randn(*s, generator=gen) * scale + shift)  # noqa: E731
    x = r(B, L, D).to(device, dtype)
    dt = r(B, L, D, scale=0.5, shift=-1.0).to(device, dtype)
    z = r(B, L, D).to(device, dtype)
    A = -torch.exp(r(D, N, scale=0.5)).to(device)
    Bm = r(B, L, N).to(device, dtype)
    Cm = r(B, L, N).to(device, dtype)
    Dv = r(D).to(device)
    dtb = r(D, scale=0.5).to(device)
    h0 = r(B, D, N).to(device)
    rst = (torch.rand(B, L, generator=gen) < 0.15).to(device) if reset else None
    return x, dt, A, Bm, Cm, Dv, z, dtb, h0, rst


def ref_scan(x, dt, A, Bm, Cm, Dv, z, dtb, h0, rst):
    """The reference, with document resets emulated by restarting from a zero state at each
    reset (so the test does not depend on the reference growing a reset_BL argument)."""
    if rst is None:
        return reference.selective_scan(x, dt, A, Bm, Cm, Dv, z, dtb, h0)
    ys, hs = [], []
    Bsz, L, _ = x.shape
    for b in range(Bsz):
        h = None if h0 is None else h0[b:b + 1]
        starts = [0] + [t for t in range(1, L) if rst[b, t]] + [L]
        yb = []
        for s0, s1 in zip(starts[:-1], starts[1:]):
            hin = torch.zeros_like(h0[b:b + 1]) if rst[b, s0] else h
            sl = slice(s0, s1)
            y, h = reference.selective_scan(x[b:b + 1, sl], dt[b:b + 1, sl], A, Bm[b:b + 1, sl],
                                            Cm[b:b + 1, sl], Dv, z[b:b + 1, sl], dtb, hin)
            yb.append(y)
        ys.append(torch.cat(yb, 1))
        hs.append(h)
    return torch.cat(ys, 0), torch.cat(hs, 0)


def check_forward(B, L, D, N, dtype, gen, reset=False, device=DEV):
    inp = scan_inputs(B, L, D, N, dtype, device, gen, reset)
    x, dt, A, Bm, Cm, Dv, z, dtb, h0, rst = inp
    y, h = triton_backend.selective_scan(x, dt, A, Bm, Cm, Dv, z, dtb, h0, reset_BL=rst)
    f64 = [t.double() if t is not None and t.is_floating_point() else t for t in inp]
    yr, hr = ref_scan(*f64)  # float64 on the same device: a CPU reference at L=65k takes minutes
    yr, hr = yr.cpu(), hr.cpu()
    rtol, atol = TOL[dtype]
    assert y.dtype == dtype and h.dtype == torch.float32
    assert_close(y.cpu(), yr, rtol, atol, f"y {dtype} L={L}")
    assert_close(h.cpu(), hr, 6e-4, 2e-3, f"final state {dtype} L={L}")


def check_backward(B, L, D, N, dtype, gen, reset=False, device=DEV):
    inp = scan_inputs(B, L, D, N, dtype, device, gen, reset)
    rst = inp[-1]
    leaves = [t.detach().clone().requires_grad_() for t in inp[:-1]]
    y, h = triton_backend.selective_scan(*leaves, reset_BL=rst)
    gy = torch.randn(y.shape, generator=gen).to(device)
    gh = torch.randn(h.shape, generator=gen).to(device)
    ((y.float() * gy).sum() + (h * gh).sum()).backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in inp[:-1]]
    yr, hr = ref_scan(*ref_leaves, rst)
    ((yr * gy.double()).sum() + (hr * gh.double()).sum()).backward()
    rtol, atol = TOL[dtype]
    for name, a, b in zip("x dt A B C D z dt_bias h0".split(), leaves, ref_leaves):
        g, gr = a.grad.cpu().double(), b.grad.cpu()
        scale = gr.abs().max().clamp(min=1.0)  # sums over L (dA, dD, dB...) grow with L
        assert_close(g / scale, gr / scale, rtol, atol, f"d{name} {dtype} L={L}")


# ---- CPU (interpreter) / any device -----------------------------------------------------------

def test_forward_small_all_options(rng):
    check_forward(1, 17, 20, 5, torch.float32, rng, reset=True)


def test_forward_minimal_options_bf16(rng):
    x, dt, A, Bm, Cm, *_ = scan_inputs(1, 9, 16, 4, torch.bfloat16, DEV, rng)
    y, h = triton_backend.selective_scan(x, dt, A, Bm, Cm)
    yr, hr = reference.selective_scan(x, dt, A, Bm, Cm)
    assert_close(y, yr, 3e-2, 5e-2, "y")
    assert_close(h, hr, 6e-4, 2e-3, "state")


@triton.jit
def _softplus_kernel(v_ptr, o_ptr, sig_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    v = tl.load(v_ptr + i, mask=i < n)
    sp, t = triton_helpers.softplus_t(v)
    tl.store(o_ptr + i, sp, mask=i < n)
    tl.store(sig_ptr + i, tl.where(v > 0.0, 1.0, t) / (1.0 + t), mask=i < n)


def test_softplus_to_fp32_precision():
    """The kernels' softplus (2 atanh series, no log) against float64's, threshold 20 included:
    within 1e-6 relative wherever the result is a normal fp32 (tiny dt keep their precision),
    inf -> inf, -inf -> 0, NaN -> NaN; the sigmoid the backward builds from its t within 1e-6."""
    edges = torch.tensor([-20.0, 20.0, 19.99, 20.01, 0.0, 1e-30, -1e-30])
    v = torch.cat([torch.linspace(-80, 80, 2001), edges])
    v = torch.cat([v, torch.tensor([float("inf"), float("-inf"), float("nan")])]).to(DEV)
    out, sig = torch.empty_like(v), torch.empty_like(v)
    _softplus_kernel[(1,)](v, out, sig, v.numel(), BLOCK=triton.next_power_of_2(v.numel()))
    out, sig, v = out.cpu(), sig.cpu(), v.cpu()
    ref = torch.nn.functional.softplus(v[:-3].double(), threshold=20.0)
    ok = ref > 1e-37
    rel = (out[:-3].double() - ref).abs()[ok] / ref[ok]
    assert rel.max() < 1e-6, f"max relative error {rel.max():.3g} at v={v[:-3][ok][rel.argmax()]:.4g}"
    assert out[-3] == float("inf") and out[-2] == 0.0 and out[-1].isnan()
    sref = torch.sigmoid(v[:-3].double())
    ok = sref > 1e-37
    assert ((sig[:-3].double() - sref).abs()[ok] / sref[ok]).max() < 1e-6


def test_bc_words_conditions():
    """The 64-bit B/C loads only where every row starts on 8 bytes: bf16, N a multiple of 4."""
    xdbl = torch.zeros(2, 5, 8 + 2 * 16, dtype=torch.bfloat16, device=DEV)  # dt_r 8, B 16, C 16
    Bm, Cm = xdbl[..., 8:24], xdbl[..., 24:]
    assert triton_scan.bc_words(Bm, Cm)
    assert not triton_scan.bc_words(Bm.float(), Cm.float())  # fp32: read one by one
    assert not triton_scan.bc_words(xdbl[..., 7:23], Cm)  # starts on 2 bytes
    odd = torch.zeros(2, 5, 6 + 2 * 5, dtype=torch.bfloat16, device=DEV)
    assert not triton_scan.bc_words(odd[..., 6:11], odd[..., 11:])  # N = 5


@pytest.mark.parametrize("chunk", [None, 6])
def test_forward_bc_words_equal_single_loads(rng, monkeypatch, chunk):
    """The 64-bit loads of bf16 B and C (strided slices of one x_proj output, as in the model)
    give the same bits as one load per value: one pass, and the chunked passes (state-only first)
    with an initial state and resets."""
    monkeypatch.setattr(triton_scan, "FWD_MIN_CHUNK", 4)
    monkeypatch.setattr(triton_scan, "FWD_MIN_CHUNK_INFER", 4)
    B, L, D, N = 2, 19, 20, 8
    x, dt, A, _, _, Dv, z, dtb, h0, rst = scan_inputs(B, L, D, N, torch.bfloat16, DEV, rng, reset=True)
    xdbl = torch.randn(B, L, 4 + 2 * N, generator=rng).to(DEV, torch.bfloat16)
    Bm, Cm = xdbl[..., 4:4 + N], xdbl[..., 4 + N:]
    assert triton_scan.bc_words(Bm, Cm)
    y, h, _ = triton_scan.scan_fwd(x, dt, A, Bm, Cm, Dv, z, dtb, h0, rst, chunk=chunk)
    monkeypatch.setattr(triton_scan, "bc_words", lambda *a: False)
    y1, h1, _ = triton_scan.scan_fwd(x, dt, A, Bm, Cm, Dv, z, dtb, h0, rst, chunk=chunk)
    assert torch.equal(y, y1) and torch.equal(h, h1)
    yr, hr = ref_scan(*[t.double() if t is not None and t.is_floating_point() else t
                        for t in (x, dt, A, Bm, Cm, Dv, z, dtb, h0, rst)])
    assert_close(y.double(), yr, 3e-2, 5e-2, "y")


@pytest.mark.parametrize("chunk", [None, 8])
def test_backward_bc_words_equal_single_loads(rng, monkeypatch, chunk):
    """The backward's 64-bit loads of bf16 B and C (pass 3, the recompute, and pass 1 where the
    length is chunked) give the same gradients, bit for bit, as one load per value."""
    monkeypatch.setattr(triton_scan, "CHK", 8)
    B, L, D, N = 2, 21, 12, 8
    x, dt, A, _, _, Dv, z, dtb, h0, rst = scan_inputs(B, L, D, N, torch.bfloat16, DEV, rng, reset=True)
    xdbl = torch.randn(B, L, 4 + 2 * N, generator=rng).to(DEV, torch.bfloat16)
    Bm, Cm = xdbl[..., 4:4 + N], xdbl[..., 4 + N:]
    _, _, chk = triton_scan.scan_fwd(x, dt, A, Bm, Cm, Dv, z, dtb, None, rst, save_chk=True)
    dy = torch.randn(B, L, D, generator=rng).to(DEV, torch.bfloat16)
    dhT = torch.randn(B, D, N, generator=rng).to(DEV)
    run = lambda: triton_scan_bwd.scan_bwd(x, dt, A, Bm, Cm, Dv, z, dtb, rst, chk, dy, dhT, 8,  # noqa: E731
                                           chunk=chunk)
    assert triton_scan_bwd.bc_words(Bm, Cm)
    words = run()
    monkeypatch.setattr(triton_scan_bwd, "bc_words", lambda *a: False)
    single = run()
    for name, a, b in zip("dx ddt dA dB dC dD dz ddt_bias dh0".split(), words, single):
        assert torch.equal(a, b), name


def test_backward_small_with_resets(rng, monkeypatch):
    monkeypatch.setattr(triton_scan, "CHK", 8)  # several saved-state chunks, one partial
    check_backward(1, 13, 12, 3, torch.float32, rng, reset=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_with_the_state_loaded_a_step_ahead(rng, monkeypatch, dtype):
    """BWD_PREFETCH_H (off by default, not yet timed): the reverse step's h_{t-1} loaded during the
    step before it, across windows of 4 steps (one partial) and saved-state chunks of 8, resets."""
    from falcon_mamba.ops import triton_scan_bwd

    monkeypatch.setattr(triton_scan_bwd, "BWD_PREFETCH_H", True)
    monkeypatch.setattr(triton_scan_bwd, "BWD_WINDOW", 4)
    monkeypatch.setattr(triton_scan, "CHK", 8)
    check_backward(1, 11, 40, 16, dtype, rng, reset=True)


@pytest.mark.parametrize("N,dtype", [(1, torch.float32), (16, torch.float32), (32, torch.float32),
                                     (40, torch.float32), (16, torch.bfloat16)])
def test_backward_state_sizes_of_the_lane_sums(rng, monkeypatch, N, dtype):
    """dB and dC leave pass 3 as lane sums (triton_scan_bwd.lane_sums: a reduce-scatter of the
    states over a program's 32 channels) where N pads to at most 32 states, as tl.sum above: the
    model's 16, one state, as many states as channels, more (40 pads to 64), over two channel
    blocks, one of them partial (D 40). bf16 with 16 states: B and C as 64-bit words, loaded a step
    ahead with x and dt (BWD_AHEAD)."""
    monkeypatch.setattr(triton_scan, "CHK", 8)
    if dtype == torch.bfloat16:
        x, dt, A, Bm, Cm, *_ = scan_inputs(1, 11, 40, N, dtype, DEV, rng, True)
        assert triton_helpers.bc_words(Bm, Cm)  # the inputs check_backward builds take the words path
    check_backward(1, 11, 40, N, dtype, rng, reset=True)


@pytest.mark.parametrize("reset", [False, True])
def test_forward_length_chunked_matches_reference(rng, monkeypatch, reset):
    """The three-pass forward (chunks from a zero state, carry, chunks again): chunk lengths that
    do and do not divide L, with an initial state and document resets (one at a chunk start)."""
    monkeypatch.setattr(triton_scan, "FWD_MIN_CHUNK", 4)
    inp = scan_inputs(2, 19, 20, 5, torch.float32, DEV, rng, reset)
    x, dt, A, Bm, Cm, Dv, z, dtb, h0, rst = inp
    if reset:
        rst[0, 8] = True
    yr, hr = ref_scan(*[t.double() if t is not None and t.is_floating_point() else t for t in inp])
    for chunk in (4, 5, 19):
        y, h, _ = triton_scan.scan_fwd(x, dt, A, Bm, Cm, Dv, z, dtb, h0, rst, chunk=chunk)
        assert_close(y, yr, 6e-4, 2e-3, f"y chunk={chunk}")
        assert_close(h, hr, 6e-4, 2e-3, f"state chunk={chunk}")


def test_length_chunk_choice(monkeypatch):
    # batch 1 at the 7B width: 256 programs -> 64 chunks; many rows already fill the GPU
    assert triton_scan.length_chunk(1, 16384, 8192, 32) == 256
    assert triton_scan.length_chunk(1, 1 << 20, 8192, 32) == (1 << 20) // 64
    assert triton_scan.length_chunk(64, 16384, 8192, 32) == 16384
    assert triton_scan.length_chunk(1, 300, 8192, 32) == 300  # too short to split
    # inference (no saved states): 16 chunks of a row, each 64 to 256 steps, at most 64 chunks;
    # short rows and full batches unsplit
    ic = triton_scan.infer_chunk
    assert [ic(1, L, 8192, 32, 2) for L in (256, 512, 1024, 2048, 4096, 16384)] == [64, 64, 64, 128, 256, 256]
    assert ic(1, 1 << 20, 8192, 32, 2) == (1 << 20) // 64
    assert ic(1, 100, 8192, 32, 2) == 100
    assert ic(64, 2048, 8192, 32, 2) == 2048
    assert ic(1, 1601, 8192, 32, 4) == 104  # cdiv(1601, 16) = 101, rounded up to the unroll


def test_backward_small_length_chunked(rng, monkeypatch):
    monkeypatch.setattr(triton_scan, "CHK", 8)
    monkeypatch.setattr(triton_scan, "FWD_MIN_CHUNK", 4)
    monkeypatch.setattr(triton_scan, "FWD_UNROLL", 4)
    check_backward(1, 21, 12, 3, torch.float32, rng, reset=True)


class _GridSpy:
    """Stands in for a kernel in its module: records each launch's grid, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


class _LaunchSpy:
    """Stands in for a kernel in its module: records each launch's keyword arguments, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.calls.append(kwargs)
            return launch(*args, **kwargs)
        return run


def test_forward_unroll_by_pass(rng, monkeypatch):
    """T=2 for the chunked passes of an inference row, T=4 for one pass over the whole length and
    for training's passes (saved states): the unrolls measured fastest for each (FWD_UNROLL*)."""
    spy = _LaunchSpy(triton_scan._scan_fwd_kernel)
    monkeypatch.setattr(triton_scan, "_scan_fwd_kernel", spy)
    monkeypatch.setattr(triton_scan, "CHK", 8)
    x, dt, A, Bm, Cm, *_ = scan_inputs(1, 16, 8, 4, torch.float32, DEV, rng)
    runs = {"one pass": dict(chunk=16), "chunked": dict(chunk=8),
            "saved states": dict(chunk=8, save_chk=True)}
    unrolls = {}
    for name, kw in runs.items():
        spy.calls.clear()
        triton_scan.scan_fwd(x, dt, A, Bm, Cm, **kw)
        unrolls[name] = [c["T"] for c in spy.calls]
    assert unrolls == {"one pass": [4], "chunked": [2, 2], "saved states": [4, 4]}


def check_backward_options(gen, B, L, D, N, *, resets=(), z=True, skip=True, dtb=True, h0=True,
                           dhT=True, dtype=torch.float32, device=DEV):
    """Every gradient of the fast scan (through its autograd Function) against autograd through the
    float64 reference (its own reset_BL). resets: (row, t) positions of document starts (None: no
    reset input at all); absent options are passed as None; dhT=False leaves the final state out
    of the loss (the Function then gets no dhT)."""
    x, dt, A, Bm, Cm, Dv, zz, dtbias, h0v, _ = scan_inputs(B, L, D, N, dtype, device, gen)
    rst = None
    if resets is not None:
        rst = torch.zeros(B, L, dtype=torch.bool, device=device)
        for row, t in resets:
            rst[row, t] = True
    inp = dict(x=x, dt=dt, A=A, B=Bm, C=Cm, D=Dv if skip else None, z=zz if z else None,
               dt_bias=dtbias if dtb else None, h0=h0v if h0 else None)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items() if v is not None}
    args = lambda d: [d.get(k) for k in inp]  # noqa: E731
    y, h = triton_backend.selective_scan(*args(leaves), reset_BL=rst)
    gy = torch.randn(y.shape, generator=gen).to(device)
    gh = torch.randn(h.shape, generator=gen).to(device)
    ((y.float() * gy).sum() + ((h * gh).sum() if dhT else 0)).backward()
    ref = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    yr, hr = reference.selective_scan(*args(ref), reset_BL=rst)
    ((yr * gy.double()).sum() + ((hr * gh.double()).sum() if dhT else 0)).backward()
    rtol, atol = TOL[dtype]
    for name in leaves:
        g, gr = leaves[name].grad.cpu().double(), ref[name].grad.cpu()
        scale = gr.abs().max().clamp(min=1.0)  # sums over L (dA, dD, dB...) grow with L
        assert_close(g / scale, gr / scale, rtol, atol, f"d{name} {dtype} L={L}")


# (row, t) resets for the chunked backward tests below: with CHK 8 and chunks of 16 steps, t = 16
# and 32 start a chunk, t = 20 a window of 4, t = 0 drops h0 (dh0 = 0 for row 0), t = 36 is the
# last step; the others lie inside chunks
RESETS = ((0, 0), (0, 16), (0, 27), (1, 5), (1, 20), (1, 32), (1, 36))


# every option set once and every window (8 = CHK: one level, no sub-chunk states) with all options
@pytest.mark.parametrize("window,opts", [
    (8, dict()),  # everything: z, D, dt bias, h0, dhT, resets
    (4, dict()),
    (2, dict()),
    (4, dict(z=False, skip=False, dtb=False, h0=False, dhT=False, resets=None)),
    (2, dict(skip=False, h0=False)),
    (8, dict(z=False, dtb=False, dhT=False)),
], ids=["all-w8", "all-w4", "all-w2", "none-w4", "noD-noh0-w2", "noz-nodtb-nodhT-w8"])
def test_backward_length_chunks(rng, monkeypatch, window, opts):
    """The three-pass backward: L = 37 in 3 chunks of 16 (neither a multiple of CHK = 8 nor of the
    chunk; the last sub-chunk and window partial), resets in and at the start of chunks."""
    monkeypatch.setattr(triton_scan, "CHK", 8)
    monkeypatch.setattr(triton_scan_bwd, "backward_chunk", lambda *a: 16)
    monkeypatch.setattr(triton_scan_bwd, "BWD_WINDOW", window)
    spy = _GridSpy(triton_scan_bwd._scan_bwd_kernel)
    monkeypatch.setattr(triton_scan_bwd, "_scan_bwd_kernel", spy)
    check_backward_options(rng, 2, 37, 20, 5, **{"resets": RESETS, **opts})
    assert [g[2] for g in spy.grids] == [3]


@pytest.mark.parametrize("L,chunk,nchunks,dhT", [(24, 16, 2, True), (30, 8, 4, True), (37, 37, 1, True),
                                                (37, 37, 1, False), (5, 8, 1, True)])
def test_backward_chunk_counts(rng, monkeypatch, L, chunk, nchunks, dhT):
    """2 chunks (L a multiple of the chunk), 4 chunks of one CHK each, one chunk (the single-pass
    backward: dhT straight into pass 3, or no terminal adjoint at all), and a length shorter
    than CHK."""
    monkeypatch.setattr(triton_scan, "CHK", 8)
    monkeypatch.setattr(triton_scan_bwd, "backward_chunk", lambda *a: chunk)
    monkeypatch.setattr(triton_scan_bwd, "BWD_WINDOW", 4)
    spy = _GridSpy(triton_scan_bwd._scan_bwd_kernel)
    monkeypatch.setattr(triton_scan_bwd, "_scan_bwd_kernel", spy)
    resets = tuple((0, t) for t in (3, 8, 16, 17, 31) if t < L)
    check_backward_options(rng, 1, L, 12, 4, resets=resets, dhT=dhT)
    assert [g[2] for g in spy.grids] == [nchunks]


def test_backward_length_chunks_bf16(rng, monkeypatch):
    monkeypatch.setattr(triton_scan, "CHK", 8)
    monkeypatch.setattr(triton_scan_bwd, "backward_chunk", lambda *a: 16)
    monkeypatch.setattr(triton_scan_bwd, "BWD_WINDOW", 4)
    check_backward_options(rng, 2, 37, 20, 5, resets=RESETS, dtype=torch.bfloat16)


def test_backward_chunk_choice():
    """Chunks only where a row's channel blocks leave resident slots empty (1056: 132 SMs x 8)."""
    chunk = lambda B, L, D: triton_scan_bwd.backward_chunk(B, L, D, 32, 128, 1056)  # noqa: E731
    # the 1.5B training shape: 8 rows x 128 channel blocks already fill the slots: one chunk
    assert chunk(8, 2048, 4096) == 2048
    # fewer rows: 1024 programs again (4 rows: 2 chunks, 1 row: 8 chunks of 256)
    assert chunk(4, 2048, 4096) == 1024
    assert chunk(1, 2048, 4096) == 256
    assert chunk(1, 2048, 8192) == 512  # batch 1 of the 7B: 256 blocks, 4 chunks
    assert chunk(5, 2048, 4096) == 768  # 640 programs: 3 chunks (1,920 programs, 2 waves)
    assert chunk(64, 2048, 8192) == 2048  # 15.5 waves already: splitting only trims the last
    assert chunk(1, 100, 8192) == 100  # shorter than CHK
    assert chunk(1, 200, 8192) == 128  # chunks start on saved states
    assert chunk(2, 4096, 256) == 128  # 16 programs a chunk: as many chunks as CHK allows


def test_empty_length_returns_initial_state(rng):
    x, dt, A, Bm, Cm, Dv, z, dtb, h0, _ = scan_inputs(2, 0, 8, 4, torch.float32, DEV, rng)
    y, h = triton_backend.selective_scan(x, dt, A, Bm, Cm, Dv, z, dtb, h0)
    assert y.shape == (2, 0, 8)
    assert torch.equal(h, h0)


def test_cpu_tensors_without_interpreter_are_refused(rng, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 2, 4)
    with pytest.raises(UserError, match="needs CUDA"):
        triton_backend.selective_scan(x, x, -torch.ones(4, 2), torch.randn(1, 2, 2),
                                      torch.randn(1, 2, 2))


# ---- GPU -----------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("L", [1, 17, 4096])
@pytest.mark.parametrize("D", [40, 512])
def test_forward_cuda(dtype, L, D, rng):
    check_forward(2, L, D, 16, dtype, rng, reset=(L == 4096))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_cuda_chunked_equals_sequential(dtype, rng):
    """Length-chunked and single-pass forwards agree (resets, initial state, 7B-like width)."""
    x, dt, A, Bm, Cm, Dv, z, dtb, h0, rst = scan_inputs(1, 4096, 1024, 16, dtype, DEV, rng, reset=True)
    y1, h1, _ = triton_scan.scan_fwd(x, dt, A, Bm, Cm, Dv, z, dtb, h0, rst, chunk=4096)
    y2, h2, _ = triton_scan.scan_fwd(x, dt, A, Bm, Cm, Dv, z, dtb, h0, rst, chunk=256)
    assert_close(y2.float(), y1.float(), *TOL[dtype], "y chunked vs sequential")
    assert_close(h2, h1, 6e-4, 2e-3, "state chunked vs sequential")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_cuda_past_65k(dtype, rng):
    check_forward(1, 65_600, 40, 16, dtype, rng)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("L", [1, 17, 4096])
def test_backward_cuda(dtype, L, rng):
    check_backward(2, L, 40, 16, dtype, rng, reset=(L == 4096))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_cuda_length_chunks_match_reference(dtype, rng):
    """The chunked backward at a realistic size (B=2, L=4096, D=256: 32 chunks of 128 by default;
    resets, h0 and dhT) against the float64 reference."""
    assert triton_scan_bwd.backward_chunk(2, 4096, 256, triton_scan_bwd.BWD_BLOCK_D, triton_scan.CHK,
                                          triton_scan_bwd.resident_programs(torch.device(DEV))) < 4096
    check_backward_options(rng, 2, 4096, 256, 16, dtype=dtype,
                           resets=((0, 128), (0, 1000), (1, 2047), (1, 2048), (1, 4095)))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk,window", [(128, 16), (512, 16), (1024, 128), (4096, 128)])
def test_backward_cuda_chunked_equals_single_chunk(dtype, chunk, window, rng):
    """scan_bwd over length chunks (and recompute windows) against one chunk with one level (the
    single-pass kernel): every gradient, B=2, L=4096, D=256, resets, h0 and dhT."""
    x, dt, A, Bm, Cm, Dv, z, dtb, h0, rst = scan_inputs(2, 4096, 256, 16, dtype, DEV, rng, reset=True)
    rst[0, 1024] = True  # at a chunk start
    _, _, chk = triton_scan.scan_fwd(x, dt, A, Bm, Cm, Dv, z, dtb, h0, rst, save_chk=True)
    dy = torch.randn(x.shape, generator=rng).to(DEV, dtype)
    dhT = torch.randn(2, 256, 16, generator=rng).to(DEV)
    args = (x, dt, A, Bm, Cm, Dv, z, dtb, rst, chk, dy, dhT, triton_scan.CHK)
    ref = triton_scan.scan_bwd(*args, chunk=4096, window=triton_scan.CHK)
    got = triton_scan.scan_bwd(*args, chunk=chunk, window=window)
    rtol, atol = TOL[dtype]
    for name, g, gr in zip("x dt A B C D z dt_bias h0".split(), got, ref):
        scale = gr.float().abs().max().clamp(min=1.0)
        assert_close(g.float() / scale, gr.float() / scale, rtol, atol, f"d{name} chunk={chunk}")


@pytest.mark.cuda
@pytest.mark.slow
def test_backward_cuda_past_65k(rng):
    check_backward(1, 65_600, 8, 4, torch.float32, rng)


@pytest.mark.cuda
@pytest.mark.slow
def test_forward_cuda_past_int32_offsets(rng):
    """(B, L, D) = (1, 66000, 32768): 2.16e9 elements per tensor, past 2^31. The reference runs on
    the last 16 channels, whose offsets are the largest."""
    B, L, D, N = 1, 66_000, 32_768, 16
    dev = torch.device("cuda")
    x = torch.randn(B, L, D, dtype=torch.bfloat16, device=dev)
    dt = (torch.randn(B, L, D, dtype=torch.bfloat16, device=dev) * 0.5 - 1)
    z = torch.randn(B, L, D, dtype=torch.bfloat16, device=dev)
    A = -torch.exp(torch.randn(D, N, device=dev) * 0.5)
    Bm = torch.randn(B, L, N, dtype=torch.bfloat16, device=dev)
    Cm = torch.randn(B, L, N, dtype=torch.bfloat16, device=dev)
    Dv, dtb = torch.randn(D, device=dev), torch.randn(D, device=dev) * 0.5
    y, h = triton_backend.selective_scan(x, dt, A, Bm, Cm, Dv, z, dtb)
    sel = slice(D - 16, D)
    f64 = lambda t: t.cpu().double()  # noqa: E731
    yr, hr = reference.selective_scan(f64(x[..., sel]), f64(dt[..., sel]), f64(A[sel]), f64(Bm),
                                      f64(Cm), f64(Dv[sel]), f64(z[..., sel]), f64(dtb[sel]))
    assert_close(y[..., sel].cpu(), yr, 3e-2, 5e-2, "y (last channels)")
    assert_close(h[:, sel].cpu(), hr, 6e-4, 2e-3, "state (last channels)")
    yc, _ = triton_backend.causal_conv1d(x, torch.randn(D, 4, device=dev, dtype=torch.bfloat16), None)
    assert torch.isfinite(yc[0, -1]).all()
