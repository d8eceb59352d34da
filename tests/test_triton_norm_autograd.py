"""The training RMSNorm with the Triton norm as its forward and the Triton backward (what ops.rms_norm
runs under autograd on a GPU) against autograd through reference.rms_norm. Interpreter on CPU;
the GPU on a GPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from falcon_mamba.ops import norm_autograd, reference, triton_backend  # noqa: E402
from tests.helpers import assert_close  # noqa: E402
from tests.test_norm_autograd import TOL, grads  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("xdtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, None),
                                           (torch.bfloat16, torch.float32)])
def test_triton_forward_and_backward(rng, xdtype, wdtype):
    x = (torch.randn(2, 5, 48, generator=rng) * 2).to(DEV, xdtype)
    w = None if wdtype is None else (1 + 0.3 * torch.randn(48, generator=rng)).to(DEV, wdtype)
    out_dtype = xdtype if w is None else torch.promote_types(xdtype, wdtype)
    g = torch.randn(2, 5, 48, generator=rng).to(DEV, out_dtype)
    want = grads(lambda a, b: reference.rms_norm(a, b, 1e-5), x, w, g)
    got = grads(lambda a, b: norm_autograd.rms_norm(a, b, 1e-5, triton_backend.rms_norm,
                                                    triton_backend.rms_norm_backward), x, w, g)
    rtol, atol = TOL[torch.bfloat16 if torch.bfloat16 in (xdtype, wdtype) else torch.float32]
    for name, a, b in zip(("y", "grad x", "grad weight"), got, want):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype
        scale = b.float().abs().max().clamp(min=1e-30)
        assert_close(a.float() / scale, b.float() / scale, rtol, atol, f"{name} {xdtype} {wdtype}")


def test_ops_rms_norm_takes_the_triton_backward(rng, monkeypatch):
    """ops.rms_norm under autograd on the triton backend runs triton_norm_bwd (counted)."""
    from falcon_mamba import ops
    from falcon_mamba.ops import triton_norm_bwd

    calls = []
    real = triton_norm_bwd.rms_norm_backward
    monkeypatch.setattr(triton_norm_bwd, "rms_norm_backward",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    ops.set_backend("triton")
    try:
        x = torch.randn(3, 16, generator=rng).to(DEV).requires_grad_()
        w = torch.ones(16, device=DEV, requires_grad=True)
        ops.rms_norm(x, w, 1e-5).sum().backward()
    finally:
        ops.set_backend(None)
    assert calls == [1] and x.grad is not None and w.grad is not None
