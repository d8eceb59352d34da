"""The training RMSNorm (ops/norm_autograd.py, what ops.rms_norm runs under autograd) against
autograd through reference.rms_norm: output, grad of x and grad of the weight, over dtype x
weight (fp32, bf16, none) x odd sizes; the memory it saves; and a model's gradients on both."""

import pytest
import torch

import falcon_mamba as fm
from falcon_mamba import ops
from falcon_mamba.ops import norm_autograd, reference
from tests.helpers import assert_close

TOL = {torch.float32: (6e-4, 2e-3), torch.bfloat16: (3e-2, 5e-2)}


def grads(fn, x0, w0, g):
    x = x0.detach().clone().requires_grad_()
    w = None if w0 is None else w0.detach().clone().requires_grad_()
    y = fn(x, w)
    y.backward(g)
    return y.detach(), x.grad, None if w is None else w.grad


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, None])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 7, 33), (3, 5, 128)])
def test_matches_autograd_through_the_reference(rng, xdtype, wdtype, shape):
    x = (torch.randn(*shape, generator=rng) * 3).to(xdtype)
    w = None if wdtype is None else (1 + 0.5 * torch.randn(shape[-1], generator=rng)).to(wdtype)
    out_dtype = xdtype if w is None else torch.promote_types(xdtype, wdtype)
    g = torch.randn(*shape, generator=rng).to(out_dtype)
    want = grads(lambda a, b: reference.rms_norm(a, b, 1e-5), x, w, g)
    got = grads(lambda a, b: norm_autograd.rms_norm(a, b, 1e-5, reference.rms_norm), x, w, g)
    assert torch.equal(got[0], want[0])  # the forward is the reference's own
    for name, a, b in zip(("grad x", "grad weight"), got[1:], want[1:]):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype
        rtol, atol = TOL[torch.bfloat16 if torch.bfloat16 in (xdtype, wdtype) else torch.float32]
        scale = b.float().abs().max().clamp(min=1e-30)
        assert_close(a.float() / scale, b.float() / scale, rtol, atol, f"{name} {xdtype} {wdtype} {shape}")


def test_ops_rms_norm_takes_it_under_autograd_only(rng):
    x = torch.randn(2, 9, 16, generator=rng)
    w = torch.randn(16, generator=rng).requires_grad_()
    y = ops.rms_norm(x, w, 1e-5)
    assert type(y.grad_fn).__name__ == "_RMSNormFnBackward"
    with torch.no_grad():
        assert torch.equal(ops.rms_norm(x, w, 1e-5), y.detach())
    assert ops.rms_norm(x, w.detach(), 1e-5).grad_fn is None


def test_saves_no_fp32_copy(rng):
    """What the backward keeps: x (and the weight); the reference also keeps fp32 (..., H) copies."""
    x = torch.randn(4, 64, 256, generator=rng, dtype=torch.bfloat16).requires_grad_()
    w = torch.ones(256, requires_grad=True)
    sizes = {}
    for name, fn in (("reference", reference.rms_norm), ("lean", lambda a, b, e: ops.rms_norm(a, b, e))):
        saved: list[int] = []

        def pack(t, saved=saved):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x, w, 1e-5)
        sizes[name] = sum(saved)
    assert sizes["lean"] == x.numel() * 2 + 256 * 4
    assert sizes["reference"] >= sizes["lean"] + 2 * x.numel() * 4


@pytest.mark.parametrize("autocast", [False, True])
def test_model_gradients_equal_the_reference_norms(rng, monkeypatch, autocast):
    cfg = fm.get_preset("tiny-odd")
    ids = torch.randint(0, cfg.vocab_size, (2, 13), generator=rng)
    out = []
    for lean in (False, True):
        torch.manual_seed(0)
        model = fm.FalconMamba(cfg)
        if not lean:
            monkeypatch.setattr(ops, "rms_norm", reference.rms_norm)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids)[0].logsumexp(-1).mean()
        loss.backward()
        monkeypatch.undo()
        out.append({n: p.grad for n, p in model.named_parameters()})
    rtol, atol = TOL[torch.bfloat16 if autocast else torch.float32]
    for name in out[0]:
        scale = out[0][name].abs().max().clamp(min=1e-30)
        assert_close(out[1][name] / scale, out[0][name] / scale, rtol, atol, name)
