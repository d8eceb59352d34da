"""Triton causal conv1d (ops/triton_conv.py) against the reference, forward and backward, with a
carried state and document resets. Interpreter on CPU (small shapes); cuda-marked grid on a GPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from falcon_mamba.ops import reference, triton_backend  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (6e-4, 2e-3), torch.bfloat16: (3e-2, 5e-2), torch.float16: (3e-2, 5e-2)}


def ref_conv(x, w, b, st, rst):
    """The reference; resets emulated by restarting each document from a zero conv state."""
    if rst is None:
        return reference.causal_conv1d(x, w, b, st)
    ys, ss = [], []
    Bsz, L, _ = x.shape
    for r in range(Bsz):
        s = st[r:r + 1]
        starts = [0] + [t for t in range(1, L) if rst[r, t]] + [L]
        yr = []
        for s0, s1 in zip(starts[:-1], starts[1:]):
            y, s = reference.causal_conv1d(x[r:r + 1, s0:s1], w, b,
                                           torch.zeros_like(s) if rst[r, s0] else s)
            yr.append(y)
        ys.append(torch.cat(yr, 1))
        ss.append(s)
    return torch.cat(ys, 0), torch.cat(ss, 0)


def check(B, L, D, K, dtype, gen, reset=False, backward=False, strided=False):
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    xz = r(B, L, 2 * D).to(DEV, dtype)
    x = xz[..., :D] if strided else xz[..., :D].contiguous()  # the model passes in_proj's half
    w, b, st = r(D, K).to(DEV, dtype), r(D).to(DEV, dtype), r(B, K - 1, D).to(DEV, dtype)
    rst = (torch.rand(B, L, generator=gen) < 0.2).to(DEV) if reset else None
    if reset and L > 1:
        rst[0, L - 1] = True  # a document starting at the last token
    leaves = [t.detach().clone().requires_grad_(backward) for t in (x, w, b, st)]
    y, s = triton_backend.causal_conv1d(*leaves, reset_BL=rst)
    ref_leaves = [t.detach().cpu().double().requires_grad_(backward) for t in (x, w, b, st)]
    yr, sr = ref_conv(*ref_leaves, None if rst is None else rst.cpu())
    rtol, atol = TOL[dtype]
    assert y.dtype == dtype and s.shape == (B, K - 1, D)
    assert_close(y.cpu(), yr, rtol, atol, f"y {dtype} L={L}")
    assert_close(s.cpu(), sr, rtol, atol, f"state {dtype} L={L}")
    if backward:
        gy, gs = r(*y.shape).to(DEV), r(*s.shape).to(DEV)
        ((y.float() * gy).sum() + (s.float() * gs).sum()).backward()
        ((yr * gy.cpu().double()).sum() + (sr * gs.cpu().double()).sum()).backward()
        for name, a, bb in zip(("x", "weight", "bias", "state"), leaves, ref_leaves):
            scale = bb.grad.abs().max().clamp(min=1.0)
            assert_close(a.grad.cpu().double() / scale, bb.grad / scale, rtol, atol, f"d{name} L={L}")


def test_forward_small_strided_with_resets(rng):
    check(2, 11, 20, 4, torch.float32, rng, reset=True, strided=True)


def test_backward_small_with_resets_odd_kernel(rng):
    check(2, 7, 12, 3, torch.float32, rng, reset=True, backward=True)


def test_length_shorter_than_state(rng):
    check(1, 2, 8, 4, torch.float32, rng)


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
