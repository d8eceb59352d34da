"""The training RMSNorm's Triton backward (ops/triton_norm_bwd.py) against its PyTorch twin,
norm_autograd.rms_norm_backward (the spec): dx and dweight over dtypes, weighted and weightless,
widths from 1 to past a power of two, more row tiles than programs (each program walks several),
rows strided inside a wider buffer and dx written into a slice of one (the fused mixer's dt/B/C
norms). Interpreter on CPU; the GPU on a GPU, where the 1.5B block norm's shape runs too."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from falcon_mamba.ops import norm_autograd, triton_norm_bwd  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1.6e-2, 1.6e-2)}


def inputs(rng, M, H, xdtype, wdtype, gdtype):
    x = (torch.randn(M, H, generator=rng) * 3 + 0.5).to(DEV, xdtype)
    w = None if wdtype is None else (1 + 0.5 * torch.randn(H, generator=rng)).to(DEV, wdtype)
    g = torch.randn(M, H, generator=rng).to(DEV, gdtype)
    return x, w, g


def check(got, want, what, low):
    rtol, atol = TOL[torch.bfloat16 if low else torch.float32]
    for name, a, b in zip(("dx", "dw"), got, want):
        if b is None:
            assert a is None, f"{what}: {name} should be None"
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {name} {a.dtype} {a.shape}"
        scale = b.float().abs().max().clamp(min=1e-30)
        assert_close(a.float() / scale, b.float() / scale, rtol, atol, f"{what} {name}")


@pytest.mark.parametrize("xdtype,wdtype,gdtype", [
    (torch.float32, torch.float32, torch.float32),  # the block norm on the fp32 residual stream
    (torch.bfloat16, None, torch.bfloat16),  # the dt norm
    (torch.bfloat16, None, torch.float32),  # the B / C norms: fp32 dB, dC rounded to x's dtype
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float32, None, torch.bfloat16),
])
@pytest.mark.parametrize("M,H", [(1, 1), (7, 33), (37, 16), (5, 128), (3, 300)])
def test_matches_the_pytorch_twin(rng, xdtype, wdtype, gdtype, M, H):
    x, w, g = inputs(rng, M, H, xdtype, wdtype, gdtype)
    want = norm_autograd.rms_norm_backward(x, w, 1e-5, g)
    got = triton_norm_bwd.rms_norm_backward(x, w, 1e-5, g)
    check(got, want, f"{xdtype} {wdtype} {gdtype} {M}x{H}", torch.bfloat16 in (xdtype, wdtype, gdtype))


def test_programs_walk_several_row_tiles(rng, monkeypatch):
    """More row tiles than programs: each program sums dw over several tiles (and a ragged last)."""
    monkeypatch.setattr(triton_norm_bwd, "PROGRAMS_PER_SM", 1)  # 4 programs on the CPU
    monkeypatch.setattr(triton_norm_bwd, "TILE", 64)  # 2 rows a tile at H = 32
    x, w, g = inputs(rng, 23, 32, torch.float32, torch.float32, torch.float32)
    check(triton_norm_bwd.rms_norm_backward(x, w, 1e-6, g),
          norm_autograd.rms_norm_backward(x, w, 1e-6, g), "23 rows, 12 tiles, 4 programs", False)


@pytest.mark.parametrize("need_dx,need_dw", [(True, False), (False, True), (False, False)])
def test_only_what_is_asked(rng, need_dx, need_dw):
    x, w, g = inputs(rng, 6, 24, torch.float32, torch.float32, torch.float32)
    got = triton_norm_bwd.rms_norm_backward(x, w, 1e-5, g, need_dx, need_dw)
    want = norm_autograd.rms_norm_backward(x, w, 1e-5, g, need_dx, need_dw)
    check(got, want, f"need_dx={need_dx} need_dw={need_dw}", False)


def test_strided_rows_and_dx_into_a_slice(rng):
    """The fused mixer's layout: x a slice of x_proj's output (B, L, R + 2N), dx written into the
    same slice of its gradient; the rest of that buffer untouched."""
    R, N = 12, 4
    xdbl = torch.randn(2, 9, R + 2 * N, generator=rng).to(DEV, torch.bfloat16)
    g = torch.randn(2, 9, N, generator=rng).to(DEV)  # fp32, as the scan's dB
    out = torch.full((2, 9, R + 2 * N), 7.0, dtype=torch.bfloat16, device=DEV)
    part = out[..., R:R + N]
    dx, dw = triton_norm_bwd.rms_norm_backward(xdbl[..., R:R + N], None, 1e-6, g, True, False, dx_out=part)
    assert dx.data_ptr() == part.data_ptr() and dw is None
    want, _ = norm_autograd.rms_norm_backward(xdbl[..., R:R + N], None, 1e-6, g, True, False)
    check((part, None), (want, None), "slice", True)
    assert torch.all(out[..., :R] == 7) and torch.all(out[..., R + N:] == 7)


def test_dx_out_must_be_a_row_view(rng):
    x, w, g = inputs(rng, 4, 8, torch.float32, None, torch.float32)
    with pytest.raises(AssertionError, match="dx_out"):
        wrong = torch.empty(4, 8, dtype=torch.bfloat16, device=DEV)  # x is fp32
        triton_norm_bwd.rms_norm_backward(x, w, 1e-5, g, dx_out=wrong)


def test_no_rows(rng):
    x, w, g = inputs(rng, 0, 8, torch.float32, torch.float32, torch.float32)
    dx, dw = triton_norm_bwd.rms_norm_backward(x, w, 1e-5, g)
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros(8, device=DEV))


@pytest.mark.cuda
def test_the_1p5b_block_norm_shape(rng):
    """16,384 rows of 2048 fp32 (the 1.5B training step's block norm): every program walks ~8 tiles."""
    x, w, g = inputs(rng, 16384, 2048, torch.float32, torch.float32, torch.float32)
    check(triton_norm_bwd.rms_norm_backward(x, w, 1e-5, g),
          norm_autograd.rms_norm_backward(x, w, 1e-5, g), "16384 x 2048", False)


def _add_norm_grads(fn, h0, out0, w0, a, b):
    h, out, w = (t.detach().clone().requires_grad_() for t in (h0, out0, w0))
    hn, u = fn(h, out, w)
    ((hn * a).sum() + (u.float() * b).sum()).backward()
    return [hn.detach(), u.detach(), h.grad, out.grad, w.grad]


@pytest.mark.parametrize("u_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("twin", [False, True])
def test_add_rms_norm_matches_autograd_through_the_pair(rng, u_dtype, twin):
    """norm_autograd.add_rms_norm (the training add + block norm as one Function, Triton forward,
    the Triton or the twin backward) against autograd through h + out, then the reference norm."""
    from falcon_mamba.ops import reference, triton_backend

    h = torch.randn(2, 9, 48, generator=rng).to(DEV)
    out = torch.randn(2, 9, 48, generator=rng).to(DEV, torch.bfloat16)
    w = (1 + 0.3 * torch.randn(48, generator=rng)).to(DEV)
    a, b = (torch.randn(2, 9, 48, generator=rng).to(DEV) for _ in range(2))

    def pair(h, out, w):
        hn = h.float() + out
        return hn, reference.rms_norm(hn, w, 1e-5).to(u_dtype)

    def fused(h, out, w):
        return norm_autograd.add_rms_norm(h, out, w, 1e-5, u_dtype, triton_backend.add_rms_norm,
                                          None if twin else triton_backend.rms_norm_backward)

    want = _add_norm_grads(pair, h, out, w, a, b)
    got = _add_norm_grads(fused, h, out, w, a, b)
    assert got[0].dtype == torch.float32 and got[1].dtype == u_dtype and got[3].dtype == torch.bfloat16
    assert torch.equal(got[0], want[0])  # the same fp32 add
    for name, x, y in zip(("u", "grad h", "grad out", "grad weight"), got[1:], want[1:]):
        low = name in ("grad out",) or (name == "u" and u_dtype == torch.bfloat16)
        rtol, atol = TOL[torch.bfloat16 if low else torch.float32]
        scale = y.float().abs().max().clamp(min=1e-30)
        assert_close(x.float() / scale, y.float() / scale, rtol, atol, f"{name} {u_dtype} twin={twin}")


@pytest.mark.cuda
def test_model_gradients_with_the_training_add_norm(rng, monkeypatch):
    """A model's gradients on the GPU with the block add + norm as one Function (the default
    there) equal those of the separate add and norm, under bf16 autocast."""
    import falcon_mamba as fm
    from falcon_mamba.model import FalconMamba

    cfg = fm.get_preset("tiny-odd")
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=rng).cuda()
    grads = []
    for on in (True, False):
        torch.manual_seed(0)
        model = FalconMamba(cfg).cuda()
        if on:
            assert model._train_add_norm(None)  # CUDA, the triton backend, autograd on
        else:
            monkeypatch.setattr(FalconMamba, "_train_add_norm", lambda self, state: False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids)[0].logsumexp(-1).mean()
        loss.backward()
        grads.append({n: p.grad.float() for n, p in model.named_parameters()})
    for name, g in grads[1].items():
        scale = g.abs().max().clamp(min=1e-30)
        assert_close(grads[0][name] / scale, g / scale, 3e-2, 5e-2, name)


@pytest.mark.parametrize("autocast", [True, False])
def test_model_plumbing_of_the_training_add_norm(rng, monkeypatch, autocast):
    """The model's training loop with the add + norm Function forced on (on the CPU through the
    interpreter; a GPU takes it by itself): its losses and gradients equal the separate add and
    norm's, under bf16 autocast and in fp32; under autocast a block whose norm weight is bf16 keeps
    the separate pair (its input is rounded first)."""
    import falcon_mamba as fm
    from falcon_mamba import model as model_mod
    from falcon_mamba.model import FalconMamba

    cfg = fm.get_preset("tiny-odd")
    ids = torch.randint(0, cfg.vocab_size, (2, 21), generator=rng)
    calls = []
    real = model_mod.joint_add_norm
    monkeypatch.setattr(model_mod, "joint_add_norm", lambda *a: calls.append(1) or real(*a))
    results = []
    for on in (True, False):
        torch.manual_seed(0)
        model = FalconMamba(cfg)
        if autocast:  # (a bf16 norm weight outside autocast would feed bf16 to fp32 projections)
            model.backbone.layers[2].norm.weight.data = model.backbone.layers[2].norm.weight.data.bfloat16()
        monkeypatch.setattr(FalconMamba, "_train_add_norm", lambda self, state, on=on: on)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids)[0].logsumexp(-1).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.float() for n, p in model.named_parameters()}))
    n = cfg.num_hidden_layers
    assert len(calls) == n - 1 - autocast  # every block but the first (and the bf16-normed one)
    rtol, atol = (3e-2, 5e-2) if autocast else (2e-4, 2e-4)
    assert_close(results[0][0], results[1][0], rtol, atol, "loss")
    for name, g in results[1][1].items():
        scale = g.abs().max().clamp(min=1e-30)
        assert_close(results[0][1][name] / scale, g / scale, rtol, atol, name)
