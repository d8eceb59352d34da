"""The training RMSNorm with the Triton norm as its forward (what ops.rms_norm runs under autograd
on a GPU) against autograd through reference.rms_norm. Interpreter on CPU; the GPU on a GPU."""

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
def test_triton_forward_reference_gradients(rng, xdtype, wdtype):
    x = (torch.randn(2, 5, 48, generator=rng) * 2).to(DEV, xdtype)
    w = None if wdtype is None else (1 + 0.3 * torch.randn(48, generator=rng)).to(DEV, wdtype)
    out_dtype = xdtype if w is None else torch.promote_types(xdtype, wdtype)
    g = torch.randn(2, 5, 48, generator=rng).to(DEV, out_dtype)
    want = grads(lambda a, b: reference.rms_norm(a, b, 1e-5), x, w, g)
    got = grads(lambda a, b: norm_autograd.rms_norm(a, b, 1e-5, triton_backend.rms_norm), x, w, g)
    rtol, atol = TOL[torch.bfloat16 if torch.bfloat16 in (xdtype, wdtype) else torch.float32]
    for name, a, b in zip(("y", "grad x", "grad weight"), got, want):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype
        scale = b.float().abs().max().clamp(min=1e-30)
        assert_close(a.float() / scale, b.float() / scale, rtol, atol, f"{name} {xdtype} {wdtype}")
