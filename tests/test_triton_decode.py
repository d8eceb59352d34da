"""Triton decode-step kernels (ops/triton_decode.py) against their reference twins: conv step, the
plain and fused SSM steps, add+RMSNorm, RMSNorm. Interpreter on CPU; cuda-marked grid on a GPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from falcon_mamba.ops import fused_reference, reference, triton_backend  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (6e-4, 2e-3), torch.bfloat16: (3e-2, 5e-2), torch.float16: (3e-2, 5e-2)}


def _r(gen, *s, dtype=torch.float32, scale=1.0):
    return (torch.randn(*s, generator=gen) * scale).to(DEV, dtype)


def check_conv_step(B, D, K, dtype, gen):
    st, x, w, b = _r(gen, B, K - 1, D, dtype=dtype), _r(gen, B, D, dtype=dtype), \
        _r(gen, D, K, dtype=dtype), _r(gen, D, dtype=dtype)
    st2 = st.clone()
    y = triton_backend.conv_step(st, x, w, b)
    yr = reference.conv_step(st2, x, w, b)
    assert_close(y, yr, *TOL[dtype], "conv step y")
    assert torch.equal(st, st2), "conv state shift"


def check_ssm_steps(B, D, N, R, dtype, gen, norm=True, state_dtype=torch.float32):
    """A bf16 state (the state pool's opt-in): both sides read it into fp32 and round the new state
    once, so the states agree within a bf16 rounding step where the fp32 values differ slightly."""
    rtol, atol = TOL[dtype]
    srtol, satol = (rtol, atol) if state_dtype == torch.float32 else (max(rtol, 1e-2), max(atol, 1e-2))
    h = _r(gen, B, D, N, dtype=state_dtype)
    xz = _r(gen, B, 2 * D, dtype=dtype)  # z is a strided half, as in the model
    xc = _r(gen, B, D, dtype=dtype)
    xdbl = _r(gen, B, R + 2 * N, dtype=dtype)
    Wdt = _r(gen, D, R, dtype=dtype, scale=R ** -0.5)
    dtb, A_log, Dv = _r(gen, D, scale=0.5), _r(gen, D, N, scale=0.5), _r(gen, D)
    h2 = h.clone()
    eps = 1e-6 if norm else None
    y = triton_backend.mixer_ssm_step(h, xc, xz[:, D:], xdbl, Wdt, dtb, A_log, Dv, eps)
    yr = fused_reference.mixer_ssm_step(h2, xc, xz[:, D:], xdbl, Wdt, dtb, A_log, Dv, eps)
    assert_close(y, yr, rtol, atol, f"fused ssm step y {dtype}")
    assert h.dtype == state_dtype
    assert_close(h.float(), h2.float(), srtol, satol, f"fused ssm step state {dtype}")
    dt, Bm, Cm = _r(gen, B, D, dtype=dtype), _r(gen, B, N, dtype=dtype), _r(gen, B, N, dtype=dtype)
    A = -torch.exp(A_log)
    y = triton_backend.ssm_step(h, xc, dt, A, Bm, Cm, Dv, xz[:, D:], dtb)
    yr = reference.ssm_step(h2, xc, dt, A, Bm, Cm, Dv, xz[:, D:], dtb)
    assert_close(y, yr, rtol, atol, f"ssm step y {dtype}")
    assert h.dtype == state_dtype
    assert_close(h.float(), h2.float(), srtol, satol, f"ssm step state {dtype}")


def check_norms(M, H, dtype, gen):
    rtol, atol = TOL[dtype]
    h, out, w = _r(gen, M, H), _r(gen, M, H, dtype=dtype), _r(gen, H, dtype=dtype)
    ho, ho2 = torch.empty(M, H, device=DEV), torch.empty(M, H, device=DEV)
    u = triton_backend.add_rms_norm(h, out, w, 1e-5, round_to=dtype, h_out=ho)
    ur = fused_reference.add_rms_norm(h, out, w, 1e-5, round_to=dtype, h_out=ho2)
    assert u.dtype == ur.dtype == dtype
    assert_close(u, ur, rtol, atol, "block add+norm")
    assert_close(ho, ho2, 1e-6, 1e-6, "residual sum")
    u = triton_backend.add_rms_norm(h, out, w, 1e-5, round_to=None, out_dtype=dtype)
    ur = fused_reference.add_rms_norm(h, out, w, 1e-5, round_to=None, out_dtype=dtype)
    assert_close(u, ur, rtol, atol, "norm_f")
    x = _r(gen, 3, M, H, dtype=dtype)
    for weight in (w, None):
        y, yr = triton_backend.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6)
        assert y.dtype == yr.dtype
        assert_close(y, yr, rtol, atol, "rms_norm")


@pytest.mark.parametrize("block_d", [16, 512])
def test_conv_step_small(rng, block_d, monkeypatch):
    """The conv step with channel blocks narrower than D (the last partial) and wider (all masked
    past D: the default 512)."""
    from falcon_mamba.ops import triton_decode

    monkeypatch.setattr(triton_decode, "CONV_STEP_BLOCK_D", block_d)
    check_conv_step(3, 40, 4, torch.float32, rng)
    check_conv_step(2, 20, 3, torch.bfloat16, rng)


def test_ssm_steps_small_odd_sizes(rng):
    check_ssm_steps(2, 40, 5, 7, torch.float32, rng, norm=True)
    check_ssm_steps(1, 20, 4, 8, torch.bfloat16, rng, norm=False)
    check_ssm_steps(6, 24, 4, 8, torch.float32, rng, norm=True)  # dt by one GEMM above 4 rows


def test_ssm_steps_with_a_bf16_state(rng):
    """The in-kernel dt_proj (2 rows) and the rows kernel (6 rows) on a bf16 state."""
    check_ssm_steps(2, 40, 5, 7, torch.bfloat16, rng, norm=True, state_dtype=torch.bfloat16)
    check_ssm_steps(6, 24, 4, 8, torch.bfloat16, rng, norm=True, state_dtype=torch.bfloat16)


@pytest.mark.parametrize("block_d", [16, 32])
def test_ssm_rows_kernel(rng, block_d):
    """The plain step (dt given), B = 7, D = 40 (the last channel block partial): y and every state
    row as the reference, for A and A_log, with and without the B/C norms."""
    from falcon_mamba.ops import triton_decode

    B, D, N = 7, 40, 5
    for norm, a_log in ((None, False), (1e-6, True)):
        h = _r(rng, B, D, N)
        xz = _r(rng, B, 2 * D, dtype=torch.bfloat16)
        dt = _r(rng, B, D, dtype=torch.bfloat16)
        Bm, Cm = _r(rng, B, N, dtype=torch.bfloat16), _r(rng, B, N, dtype=torch.bfloat16)
        A_log, Dv, dtb = _r(rng, D, N, scale=0.5), _r(rng, D), _r(rng, D, scale=0.5)
        h2 = h.clone()
        y = triton_decode.ssm_step(h, xz[:, :D], dt, A_log if a_log else -torch.exp(A_log), Bm, Cm, Dv,
                                   xz[:, D:], dtb, norm_eps=norm, a_is_log=a_log, block_d=block_d)
        Bn, Cn = (Bm, Cm) if norm is None else (reference.rms_norm(t, None, norm) for t in (Bm, Cm))
        yr = reference.ssm_step(h2, xz[:, :D], dt, -torch.exp(A_log), Bn, Cn, Dv, xz[:, D:], dtb)
        assert_close(y, yr, *TOL[torch.bfloat16], f"block_d={block_d} y norm={norm}")
        assert_close(h, h2, *TOL[torch.bfloat16], f"block_d={block_d} state norm={norm}")  # B, C in bf16


def test_ssm_step_conv_needs_the_projection(rng):
    from falcon_mamba.ops import triton_decode

    h, x, dt = _r(rng, 1, 8, 4), _r(rng, 1, 8), _r(rng, 1, 8)
    Bm, A = _r(rng, 1, 4), -torch.ones(8, 4, device=DEV)
    conv = (_r(rng, 1, 3, 8), _r(rng, 8, 4), None)
    with pytest.raises(ValueError, match="need the in-kernel dt_proj"):
        triton_decode.ssm_step(h, x, dt, A, Bm, Bm, None, None, None, conv=conv)


def check_ssm_conv_in(B, D, N, R, CK, dtype, gen, bias=True):
    """The fused SSM step's conv option (xz_x + conv state in, conv step inside) vs conv_step then the
    fused SSM step on its xc: same xc bits, so the y and both states agree exactly."""
    from falcon_mamba.ops import triton_decode

    h = _r(gen, B, D, N)
    xz = _r(gen, B, 2 * D, dtype=dtype)
    cst = _r(gen, B, CK - 1, D, dtype=dtype)
    cw, cb = _r(gen, D, CK, dtype=dtype, scale=0.5), (_r(gen, D, dtype=dtype) if bias else None)
    xdbl = _r(gen, B, R + 2 * N, dtype=dtype)
    Wdt = _r(gen, D, R, dtype=dtype, scale=R ** -0.5)
    dtb, A_log, Dv = _r(gen, D, scale=0.5), _r(gen, D, N, scale=0.5), _r(gen, D)
    h2, h0, cst2 = h.clone(), h.clone(), cst.clone()
    args = (xdbl[:, :R], A_log, xdbl[:, R:R + N], xdbl[:, R + N:], Dv, xz[:, D:], dtb)
    kw = dict(W_dt=Wdt, norm_eps=1e-6, a_is_log=True, block_d=16)
    y = triton_decode.ssm_step(h, xz[:, :D], *args, conv=(cst, cw, cb), **kw)
    xc = triton_decode.conv_step(cst2, xz[:, :D], cw, cb)
    y2 = triton_decode.ssm_step(h2, xc, *args, **kw)
    assert torch.equal(cst, cst2), "conv state shift + insert"
    assert torch.equal(y, y2), f"y with the conv option {dtype}"
    assert torch.equal(h, h2), f"ssm state with the conv option {dtype}"
    yr = fused_reference.mixer_ssm_step(h0, xc, xz[:, D:], xdbl, Wdt, dtb, A_log, Dv, 1e-6)
    assert_close(y, yr, *TOL[dtype], "y vs the reference")  # not a vacuous kernel-vs-itself check
    assert_close(h, h0, *TOL[dtype], "state vs the reference")


def test_ssm_step_conv_option(rng):
    check_ssm_conv_in(1, 40, 5, 7, 4, torch.float32, rng)
    check_ssm_conv_in(2, 20, 4, 8, 3, torch.bfloat16, rng, bias=False)


def _quant_dt(W_DR, bits, group):
    """W_dt quantized (quant/formats.py) as the GemvWeight the fused SSM step takes, and the fp32
    weight it stands for."""
    from falcon_mamba.ops.triton_gemv import GemvWeight
    from falcon_mamba.quant import formats

    t = formats.quantize_weight(W_DR, bits, group)
    gw = GemvWeight(w=t["qweight"], bits=bits, scales=t["scales"], zeros=t.get("zeros"), group=group or 0,
                    K=W_DR.shape[1])
    return gw, formats.dequantize(t["qweight"], t["scales"], t.get("zeros"), bits, group, W_DR.shape[1],
                                  torch.float32)


def check_ssm_quant_dt(B, D, N, R, bits, group, dtype, gen, norm=True, rb=None, conv=False):
    """The fused SSM step with a quantized dt_proj vs the unfused reference on the dequantized weight
    (dense math; for bf16 the weight rounded to bf16, as the reference's F.linear needs)."""
    from falcon_mamba.ops import triton_decode

    rtol, atol = TOL[dtype]
    h = _r(gen, B, D, N)
    xz = _r(gen, B, 2 * D, dtype=dtype)
    xdbl = _r(gen, B, R + 2 * N, dtype=dtype)
    gw, Wdq = _quant_dt(_r(gen, D, R, scale=R ** -0.5), bits, group)
    dtb, A_log, Dv = _r(gen, D, scale=0.5), _r(gen, D, N, scale=0.5), _r(gen, D)
    h2 = h.clone()
    eps = 1e-6 if norm else None
    args = (xdbl[:, :R], A_log, xdbl[:, R:R + N], xdbl[:, R + N:], Dv, xz[:, D:], dtb)
    if conv:  # the conv option (conv-folded decode mode): x is in_proj's x half, xc computed inside
        cst = _r(gen, B, 3, D, dtype=dtype)
        cw, cb = _r(gen, D, 4, dtype=dtype, scale=0.5), _r(gen, D, dtype=dtype)
        xc = reference.conv_step(cst.clone(), xz[:, :D], cw, cb)
        y = triton_decode.ssm_step(h, xz[:, :D], *args, W_dt=gw, norm_eps=eps, a_is_log=True, rb=rb,
                                   conv=(cst, cw, cb))
    else:
        xc = _r(gen, B, D, dtype=dtype)
        y = triton_decode.ssm_step(h, xc, *args, W_dt=gw, norm_eps=eps, a_is_log=True, rb=rb)
    yr = fused_reference.mixer_ssm_step(h2, xc, xz[:, D:], xdbl, Wdq.to(dtype), dtb, A_log, Dv, eps)
    what = f"int{bits} g{group} {dtype} B{B} R{R}"
    assert_close(y, yr, rtol, atol, f"quantized-dt ssm step y {what}")
    assert_close(h, h2, rtol, atol, f"quantized-dt ssm step state {what}")


def test_ssm_step_quantized_dt(rng):
    check_ssm_quant_dt(2, 40, 5, 7, 8, None, torch.float32, rng)
    check_ssm_quant_dt(1, 20, 4, 24, 8, None, torch.bfloat16, rng, norm=False, rb=8, conv=True)
    check_ssm_quant_dt(6, 24, 4, 9, 8, None, torch.float32, rng)  # dt by one quantized GEMM above 4 rows
    # int4 g32: R 24 and 23 stored padded to 32; 8-wide slices end mid-group and mid-byte (R 23)
    check_ssm_quant_dt(2, 40, 5, 24, 4, 32, torch.float32, rng, rb=8)
    check_ssm_quant_dt(1, 20, 4, 23, 4, 32, torch.bfloat16, rng, norm=False, conv=True)
    check_ssm_quant_dt(1, 24, 4, 40, 4, 32, torch.float32, rng, rb=16)  # two groups, group index per column
    # two groups inside one 64-wide slice (each group's scale repeated over its columns), the second
    # partial (R 50 of 64): as the 7B's 256-wide slice of two g128 groups
    check_ssm_quant_dt(1, 24, 4, 50, 4, 32, torch.float32, rng)
    check_ssm_quant_dt(5, 20, 4, 24, 4, 32, torch.float32, rng)


def _quant_dt_model(bits, group):
    """tiny-odd (R 7, bcdt norms) cut to 2 layers, every linear quantized, dt_proj included."""
    import dataclasses

    from falcon_mamba.config import get_preset
    from falcon_mamba.model import FalconMamba
    from falcon_mamba.quant import QuantLinear, quantizable_modules, quantize_model

    torch.manual_seed(0)
    with torch.device(DEV):
        model = FalconMamba(dataclasses.replace(get_preset("tiny-odd"), num_hidden_layers=2)).eval()
    quantize_model(model, bits=bits, group_size=group, modules=quantizable_modules(model))
    assert all(isinstance(b.mixer.dt_proj, QuantLinear) for b in model.backbone.layers)
    return model


@pytest.mark.parametrize("quant", [(8, None), (4, 32)])
def test_fast_step_quantized_dt_proj_matches_model_step(quant, rng):
    """fast_step with a quantized dt_proj, layer by layer and conv-folded, vs model.step over two
    steps: the fused SSM kernel takes the quantized weight (dt_proj's module is never called)."""
    from falcon_mamba.decode.step import conv_fold_supported, fast_step

    model = _quant_dt_model(*quant)
    assert conv_fold_supported(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 4), generator=rng).to(DEV)
    with torch.no_grad():
        _, state0 = model(ids)
    tok0 = torch.randint(0, model.config.vocab_size, (1,), generator=rng).to(DEV)

    def unfused(*a, **k):
        raise AssertionError("dt_proj's module was called: the fused SSM kernel was not used")

    for mode in ({}, {"gemv": True, "conv_fold": True}):
        state, twin, tok = state0.clone(), state0.clone(), tok0
        for _ in range(2):
            for b in model.backbone.layers:
                b.mixer.dt_proj.forward = unfused
            logits = fast_step(model, tok, state.conv, state.ssm, **mode)
            for b in model.backbone.layers:
                del b.mixer.dt_proj.forward
            ref = model.step(tok, twin)
            assert_close(logits, ref, 1e-4, 1e-4, f"{mode} step logits {quant}")
            assert_close(state.conv, twin.conv, 1e-5, 1e-5, f"{mode} conv state {quant}")
            tok = ref.argmax(-1)
        assert_close(state.ssm, twin.ssm, 1e-5, 1e-5, f"{mode} ssm state {quant}")


def test_norms_small(rng):
    check_norms(3, 24, torch.float32, rng)
    check_norms(2, 48, torch.bfloat16, rng)


def test_norm_with_grad_uses_autograd_formula(rng):
    x = _r(rng, 2, 16).requires_grad_()
    y = triton_backend.rms_norm(x, None, 1e-6)
    y.sum().backward()  # the reference formula runs when a gradient is needed
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [1, 5, 64])
def test_decode_kernels_cuda(dtype, B, rng):
    check_conv_step(B, 8192, 4, dtype, rng)
    check_ssm_steps(B, 8192, 16, 256, dtype, rng, norm=True)
    check_ssm_steps(B, 1000, 16, 64, dtype, rng, norm=False)
    check_norms(B, 4096, dtype, rng)


@pytest.mark.cuda
@pytest.mark.parametrize("B", [1, 5, 64, 256])
def test_ssm_steps_bf16_state_cuda(B, rng):
    check_ssm_steps(B, 8192, 16, 256, torch.bfloat16, rng, norm=True, state_dtype=torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("quant", [(8, None), (4, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3, 8])
def test_ssm_step_quantized_dt_7b_cuda(quant, dtype, B, rng):
    """7B widths (D 8192, R 256, N 16), with and without the conv option (in-kernel dt_proj only:
    B 8 takes the GEMM path, where conv is refused, test_ssm_step_conv_needs_the_projection)."""
    from falcon_mamba.ops import triton_decode

    check_ssm_quant_dt(B, 8192, 16, 256, *quant, dtype, rng)
    if B <= triton_decode.DT_PROJ_MAX_BATCH:
        check_ssm_quant_dt(B, 8192, 16, 256, *quant, dtype, rng, conv=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_forward_fused_add_norm_cuda(dtype, monkeypatch, rng):
    """model.forward on CUDA fuses residual add + block norm into one kernel (inference only);
    logits and states equal the layer-by-layer path to rounding."""
    from falcon_mamba.config import get_preset
    from falcon_mamba.model import FalconMamba

    torch.manual_seed(0)
    model = FalconMamba(get_preset("tiny-odd")).to(DEV, dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 37), generator=rng).to(DEV)
    assert model._fused_add_norm() is None  # parameters require grad, grad enabled: unfused
    with torch.no_grad():
        assert model._fused_add_norm() is not None
        lf, sf = model(ids)
        monkeypatch.setattr(FalconMamba, "_fused_add_norm", lambda self: None)
        lr, sr = model(ids)
    rtol, atol = TOL[dtype]
    assert_close(lf, lr, rtol, atol, "logits fused add+norm")
    assert_close(sf.ssm, sr.ssm, rtol, atol, "ssm state")
    assert_close(sf.conv.float(), sr.conv.float(), rtol, atol, "conv state")


def test_rms_rows_gathers_table_rows(rng):
    """rows=: row r of the input is table[rows[r]] (the decode step's token embeddings), the same
    result as gathering first; x_out receives the gathered rows in fp32."""
    from falcon_mamba.ops import triton_decode

    table = torch.randn(50, 48, generator=rng).to(torch.bfloat16)
    idx = torch.tensor([3, 49, 3, 0], dtype=torch.int64)
    w = torch.randn(48, generator=rng).to(torch.bfloat16)
    xo, xo2 = torch.empty(4, 48), torch.empty(4, 48)
    y = triton_decode.rms_rows(table, w, 1e-5, x_out=xo, round_in=torch.bfloat16, round_y=torch.bfloat16,
                               rows=idx)
    ref = triton_decode.rms_rows(table[idx], w, 1e-5, x_out=xo2, round_in=torch.bfloat16,
                                 round_y=torch.bfloat16)
    assert y.shape == (4, 48) and torch.equal(y, ref) and torch.equal(xo, xo2)


def check_xproj_rows(M, K, E, R, dtype, gen, norm=True):
    """ops/triton_xproj.py: x_proj as split-K partials, summed with dt_r's norm, against F.linear
    then rms_rows on the first R columns (the step's plain path)."""
    from falcon_mamba.ops import triton_decode, triton_xproj

    x = _r(gen, M, K, dtype=dtype)
    w = _r(gen, E, K, dtype=dtype, scale=K ** -0.5)
    eps = 1e-6 if norm else None
    y = triton_xproj.xproj_rows(x, w, R, eps)
    ref = torch.nn.functional.linear(x, w)
    if norm:
        ref = torch.cat([triton_decode.rms_rows(ref[:, :R], None, eps, round_y=dtype), ref[:, R:]], 1)
    assert y.dtype == dtype and y.shape == (M, E)
    assert_close(y, ref, *TOL[dtype], f"xproj rows {M}x{K}x{E} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_xproj_rows_small_odd_sizes(dtype, rng):
    # K not a multiple of the split, E not of the column block, M over one row block (64)
    check_xproj_rows(70, 300, 50, 20, dtype, rng)
    check_xproj_rows(6, 128, 37, 37, dtype, rng, norm=False)


def test_xproj_rows_sums_in_a_fixed_order(rng):
    """A row's result depends on nothing but its own row (the partials are summed in split order,
    no atomics): the same rows give the same bits when the other rows change, run after run."""
    from falcon_mamba.ops import triton_xproj

    x = _r(rng, 70, 300, dtype=torch.bfloat16)
    w = _r(rng, 50, 300, dtype=torch.bfloat16, scale=300 ** -0.5)
    other = x.clone()
    other[10:] = _r(rng, 60, 300, dtype=torch.bfloat16)
    y = triton_xproj.xproj_rows(x, w, 20, 1e-6)
    assert torch.equal(y[:10], triton_xproj.xproj_rows(other, w, 20, 1e-6)[:10])
    assert torch.equal(y, triton_xproj.xproj_rows(x, w, 20, 1e-6))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [5, 64, 256])
def test_xproj_rows_7b_cuda(dtype, M, rng):
    check_xproj_rows(M, 8192, 288, 256, dtype, rng)
