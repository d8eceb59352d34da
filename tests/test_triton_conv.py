"""Triton causal conv1d (ops/triton_conv.py, triton_conv_bwd.py) against the reference, forward
and backward, with a carried state and document resets: the whole op against torch.autograd of
reference.causal_conv1d, and the backward kernel against its twin triton_conv.conv_bwd_reference.
Interpreter on CPU (small shapes); cuda-marked grid on a GPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from falcon_mamba.ops import reference, triton_backend, triton_conv  # noqa: E402
from falcon_mamba.ops.triton_conv_bwd import conv_bwd  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (6e-4, 2e-3), torch.bfloat16: (3e-2, 5e-2), torch.float16: (3e-2, 5e-2)}


def ref_conv(x, w, b, st, rst, silu=True):
    """The reference; resets emulated by restarting each document from a zero conv state."""
    if rst is None:
        return reference.causal_conv1d(x, w, b, st, silu)
    ys, ss = [], []
    Bsz, L, _ = x.shape
    for r in range(Bsz):
        s = st[r:r + 1]
        starts = [0] + [t for t in range(1, L) if rst[r, t]] + [L]
        yr = []
        for s0, s1 in zip(starts[:-1], starts[1:]):
            y, s = reference.causal_conv1d(x[r:r + 1, s0:s1], w, b,
                                           torch.zeros_like(s) if rst[r, s0] else s, silu)
            yr.append(y)
        ys.append(torch.cat(yr, 1))
        ss.append(s)
    return torch.cat(ys, 0), torch.cat(ss, 0)


def check(B, L, D, K, dtype, gen, reset=False, backward=False, strided=False, silu=True, loss="both"):
    """loss: "both" (y and the final state), "y" (dstate None) or "state" (dy None)."""
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    xz = r(B, L, 2 * D).to(DEV, dtype)
    x = xz[..., :D] if strided else xz[..., :D].contiguous()  # the model passes in_proj's half
    w, b, st = r(D, K).to(DEV, dtype), r(D).to(DEV, dtype), r(B, K - 1, D).to(DEV, dtype)
    rst = (torch.rand(B, L, generator=gen) < 0.2).to(DEV) if reset else None
    if reset and L > 1:
        rst[0, L - 1] = True  # a document starting at the last token
        rst[-1, 0] = True  # ... and at the first (the carried state is cut)
    leaves = [t.detach().clone().requires_grad_(backward) for t in (x, w, b, st)]
    y, s = triton_backend.causal_conv1d(*leaves, silu=silu, reset_BL=rst)
    ref_leaves = [t.detach().cpu().double().requires_grad_(backward) for t in (x, w, b, st)]
    yr, sr = ref_conv(*ref_leaves, None if rst is None else rst.cpu(), silu)
    rtol, atol = TOL[dtype]
    assert y.dtype == dtype and s.shape == (B, K - 1, D)
    assert_close(y.cpu(), yr, rtol, atol, f"y {dtype} L={L}")
    assert_close(s.cpu(), sr, rtol, atol, f"state {dtype} L={L}")
    if backward:
        gy, gs = r(*y.shape).to(DEV), r(*s.shape).to(DEV)
        # a term left out of the loss makes its output's gradient None in the backward (dy None:
        # only the state path; dstate None: no final-state term)
        terms = [(y, yr, gy)] * (loss != "state") + [(s, sr, gs)] * (loss != "y")
        sum((o.float() * g).sum() for o, _, g in terms).backward()
        sum((o_r * g.cpu().double()).sum() for _, o_r, g in terms).backward()
        for name, a, bb in zip(("x", "weight", "bias", "state"), leaves, ref_leaves):
            # the reference leaves a leaf that does not reach the loss without a .grad; ours zeros
            ga = a.grad.cpu().double() if a.grad is not None else torch.zeros_like(bb)
            gb = bb.grad if bb.grad is not None else torch.zeros_like(bb)
            scale = gb.abs().max().clamp(min=1.0)
            assert_close(ga / scale, gb / scale, rtol, atol, f"d{name} L={L}")


def test_forward_small_strided_with_resets(rng):
    check(2, 11, 20, 4, torch.float32, rng, reset=True, strided=True)


def test_backward_small_with_resets_odd_kernel(rng):
    check(2, 7, 12, 3, torch.float32, rng, reset=True, backward=True)


def test_final_state_equals_the_reference_state(rng):
    """The conv state a chunk leaves (triton_conv.final_state: one copy of the last K-1 inputs where
    the chunk is that long, a suffix "any" of the resets for which of them survive) is the
    reference op's, bit for bit: lengths below, at and above K-1, carried state or none, resets or
    none, a strided x (in_proj's x half) and bf16."""
    for K in (2, 3, 4, 5):
        for L in range(0, 8):
            for carried, with_resets, dtype in ((False, False, torch.bfloat16), (True, True, torch.float32),
                                                (False, True, torch.bfloat16), (True, False, torch.float32)):
                D = 6
                xz = torch.randn(2, L, 2 * D, generator=rng).to(DEV, dtype)
                x = xz[..., :D]
                st = torch.randn(2, K - 1, D, generator=rng).to(DEV, dtype) if carried else None
                rst = (torch.rand(2, L, generator=rng) < 0.4).to(DEV) if with_resets else None
                w = torch.randn(D, K, generator=rng).to(DEV, dtype)
                _, want = reference.causal_conv1d(x, w, None, st, True, reset_BL=rst)
                got = triton_conv.final_state(x, st, rst, K)
                assert got.is_contiguous() and got.dtype == want.dtype
                assert torch.equal(got, want), (K, L, carried, with_resets)


def test_length_shorter_than_state(rng):
    check(1, 2, 8, 4, torch.float32, rng)


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("dtype,loss", [(torch.float32, "both"), (torch.bfloat16, "y"),
                                        (torch.float32, "state")])
def test_backward_autograd_grid(K, silu, dtype, loss, rng):
    """The op's gradients (Triton backward) against torch.autograd of the double reference."""
    check(2, 9, 13, K, dtype, rng, reset=True, backward=True, strided=True, silu=silu, loss=loss)


# (L, dtype of x, weight dtype, bias, state, resets, dy, dstate): odd L and D, L=1 and L < K-1,
# a reset at t=0 and adjacent resets, mixed dtypes as under bf16 autocast (fp32 weights)
BWD_CASES = [
    (13, torch.float32, torch.float32, True, True, True, True, True),
    (13, torch.bfloat16, torch.float32, False, False, True, True, False),
    (13, torch.bfloat16, torch.bfloat16, True, True, False, True, True),
    (2, torch.float32, torch.float32, True, True, True, False, True),
    (1, torch.bfloat16, torch.float32, False, True, True, True, True),
    (11, torch.float32, torch.float32, True, False, True, True, True),
]


@pytest.mark.parametrize("K", [2, 3, 4, 5])  # 5: the per-step reductions (TAP_ACC is K <= 4)
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("case", BWD_CASES, ids=lambda c: "L{}-{}-w{}-b{:d}s{:d}r{:d}dy{:d}ds{:d}".format(
    c[0], str(c[1])[6:], str(c[2])[6:], *c[3:]))
def test_backward_kernel_vs_twin(K, silu, case, rng):
    """triton_conv_bwd.conv_bwd against triton_conv.conv_bwd_reference, argument for argument."""
    L, dtype, wdtype, has_b, has_s, has_r, has_dy, has_ds = case
    B, D = 3, 21
    r = lambda *s: torch.randn(*s, generator=rng)  # noqa: E731
    x = r(B, L, 2 * D).to(DEV, dtype)[..., :D]  # strided rows, as in the model
    w, b = r(D, K).to(DEV, wdtype), r(D).to(DEV, wdtype) if has_b else None
    st = r(B, K - 1, D).to(DEV, dtype) if has_s else None
    rst = None
    if has_r:
        rst = (torch.rand(B, L, generator=rng) < 0.25).to(DEV)
        rst[0, 0] = True
        rst[1, 1:3] = True  # adjacent document starts (a one-token document)
        rst[2, L - 1] = True
    dy = r(B, L, D).to(DEV, dtype) if has_dy else None
    dst = r(B, K - 1, D).to(DEV) if has_ds else None
    got = conv_bwd(x, w, b, st, rst, silu, dy, dst)
    want = triton_conv.conv_bwd_reference(x, w, b, st, rst, silu, dy, dst)
    rtol, atol = TOL[dtype]
    for name, g, e in zip(("dx", "dweight", "dbias", "dstate"), got, want):
        assert (g is None) == (e is None), name
        if e is not None:
            assert g.dtype == e.dtype and g.shape == e.shape, name
            scale = e.float().abs().max().clamp(min=1.0)  # dw, dbias: sums over B x L rows
            assert_close(g.cpu() / scale, e.cpu() / scale, rtol, atol, f"{name} {case}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("L", [1, 17, 4096, 65_600])
@pytest.mark.parametrize("D", [40, 1000])
def test_forward_cuda(dtype, L, D, rng):
    check(2 if L < 65_000 else 1, L, D, 4, dtype, rng, reset=L in (17, 4096), strided=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", [1, 17, 4096, 65_600])
def test_backward_cuda(dtype, L, rng):
    check(1, L, 40, 4, dtype, rng, reset=L in (17, 4096), backward=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_kernel_vs_twin_cuda_large(dtype, rng):
    """Training-like sizes (several L chunks and D blocks, ragged ends) against the twin, and the
    weight gradient bit-identical across runs (partial sums, no atomics)."""
    B, L, D, K = 2, 4133, 1037, 4
    r = lambda *s: torch.randn(*s, generator=rng)  # noqa: E731
    x = r(B, L, 2 * D).to(DEV, dtype)[..., :D]
    w, b, st = r(D, K).to(DEV), r(D).to(DEV), r(B, K - 1, D).to(DEV, dtype)
    rst = (torch.rand(B, L, generator=rng) < 0.01).to(DEV)
    rst[0, 0] = rst[1, 256] = rst[1, 257] = True  # at a chunk edge, adjacent
    dy, dst = r(B, L, D).to(DEV, dtype), r(B, K - 1, D).to(DEV)
    got = conv_bwd(x, w, b, st, rst, True, dy, dst)
    want = triton_conv.conv_bwd_reference(x, w, b, st, rst, True, dy, dst)
    rtol, atol = TOL[dtype]
    for name, g, e in zip(("dx", "dweight", "dbias", "dstate"), got, want):
        scale = e.float().abs().max().clamp(min=1.0)
        assert_close(g / scale, e / scale, rtol, atol, name)
    again = conv_bwd(x, w, b, st, rst, True, dy, dst)
    assert all(torch.equal(g, a) for g, a in zip(got, again))


def test_backward_falls_back_to_the_twin_when_triton_cannot_build_the_kernel(monkeypatch, caplog):
    """A Triton that cannot compile the backward kernel: the PyTorch twin computes the gradients
    (the same ones), with one warning, instead of training stopping."""
    from falcon_mamba.ops import triton_conv as tc

    class FakeCompileError(Exception):
        pass

    FakeCompileError.__module__ = "triton.compiler.errors"

    def broken(*a, **k):
        raise FakeCompileError("no")

    monkeypatch.setattr(tc, "conv_bwd", broken)
    monkeypatch.setattr(tc, "_BWD_KERNEL_FAILED", False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 12, generator=g, requires_grad=True)
    w = torch.randn(12, 4, generator=g, requires_grad=True)
    b = torch.randn(12, generator=g, requires_grad=True)
    y, _ = tc.CausalConv1dFn.apply(x, w, b, None, None, True)
    with caplog.at_level("WARNING", logger="falcon_mamba.ops"):
        y.sum().backward()
    assert "PyTorch twin" in caplog.text and tc._BWD_KERNEL_FAILED
    dx, dw, db, _ = tc.conv_bwd_reference(x.detach(), w.detach(), b.detach(), None, None, True,
                                          torch.ones_like(y), None)
    assert torch.allclose(x.grad, dx) and torch.allclose(w.grad, dw) and torch.allclose(b.grad, db)


def test_final_state_kernel_wide_rows_with_resets(rng):
    """The final-state kernel over several channel blocks (D past FINAL_BLOCK_D), resets on each of
    the last positions of a row (every entry dropped, some, none) and a row-strided x: equal to
    the PyTorch twin bit for bit."""
    D, K, L = triton_conv.FINAL_BLOCK_D + 70, 4, 9
    xz = torch.randn(4, L, 2 * D, generator=rng).to(DEV, torch.bfloat16)
    x = xz[..., :D]
    rst = torch.zeros(4, L, dtype=torch.bool)
    rst[0, L - 1] = True  # drops entries 0 and 1
    rst[1, L - 2] = True  # drops entry 0
    rst[2, 0] = True      # drops none
    rst = rst.to(DEV)
    got = triton_conv.final_state(x, None, rst, K)
    want = triton_conv.final_state_torch(x, None, rst, K)
    assert torch.equal(got, want)
    assert got[0, :2].abs().sum() == 0 and got[1, 0].abs().sum() == 0 and got[2].abs().sum() > 0
