"""The "chain" batch-1 decode step (decode_chain.py) and the two GEMV options it rests on: the norm
epilogue (norm_out: residual add + the next norm's 1/rms) and the given-rstd prologue. Interpreter on
CPU; cuda-marked 7B widths and graph replays."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from falcon_mamba import FalconMamba, get_preset  # noqa: E402
from falcon_mamba.decode_chain import chain_step, chain_supported  # noqa: E402
from falcon_mamba.ops.triton_gemv import GemvConfig, fused_gemv  # noqa: E402
from falcon_mamba.quant import quantize_model  # noqa: E402
from tests.helpers import assert_close, gemv_weight  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 5e-2)}  # (rtol, atol) of the GEMV outputs


def _r(gen, *s, dtype=torch.float32, scale=1.0):
    return (torch.randn(*s, generator=gen) * scale).to(DEV, dtype)


def _round(v, dtype):
    return v if dtype is None else v.to(dtype).float()


def check_norm_chain(N, K, fmt, act, round_in, cfg, rng, eps=1e-5):
    """out_proj-like GEMV with norm_out, then an in_proj-like GEMV with the given-rstd prologue,
    against torch: h_next = h + round(W x), rstd of round_in(h_next), u = round(round(round_in(h_next)
    * rstd) * w) in w's dtype."""
    gw, Wf = gemv_weight(_r(rng, N, K, scale=K ** -0.5), fmt)
    x = _r(rng, K, dtype=act)
    h = _r(rng, N)
    h_next = torch.full((N,), float("nan"), device=DEV)
    y, rstd = fused_gemv(gw, x, norm_out=(h, h_next, eps, round_in), config=cfg)
    y_ref = (Wf @ x.float()).to(act)
    assert_close(y, y_ref, *TOL[act], f"y {fmt} {cfg}")
    hn_ref = h + y.float()  # the epilogue adds y as stored
    assert torch.equal(h_next, hn_ref), f"h_next {fmt} {cfg}"
    r = _round(hn_ref, round_in)
    rstd_ref = torch.rsqrt((r * r).mean() + eps)
    # bf16 rounding: the interpreter's fp32 -> bf16 cast is not torch's (1 ulp apart at times)
    assert_close(rstd, rstd_ref[None], 1e-5 if round_in is None else 8e-3, 0, f"rstd {fmt} {cfg}")
    # the consumer: a prologue that reads this rstd (norm weight in act's dtype)
    gw2, W2 = gemv_weight(_r(rng, 24, N, scale=N ** -0.5), fmt)
    wn = _r(rng, N, dtype=act)
    y2 = fused_gemv(gw2, h_next, norm_weight=wn, eps=eps, rstd=rstd, round_in=round_in, round_y=round_in)
    u = _round(_round(r * rstd, round_in) * wn.float(), act)
    assert_close(y2, (W2 @ u).to(act), *TOL[act], f"rstd prologue {fmt}")
    return y, rstd


C = GemvConfig


@pytest.mark.parametrize("N,K,fmt,act,round_in,cfg", [
    (40, 24, "fp32", torch.float32, None, C(bn=8, bk=16)),  # 5 programs, K masked
    (37, 64, "bf16", torch.bfloat16, torch.bfloat16, C(bn=4, bk=32)),  # ragged last block
    (36, 48, "int8", torch.bfloat16, torch.bfloat16, C(bn=8, bk=16, split=2)),  # split forced to 1
    (32, 100, "int4g32", torch.float32, None, C(bn=16, bk=32)),
])
def test_norm_out_and_rstd_prologue(N, K, fmt, act, round_in, cfg, rng):
    y, rstd = check_norm_chain(N, K, fmt, act, round_in, cfg, rng)
    # the ticket is back at zero: a second launch finds its last program again
    check_norm_chain(N, K, fmt, act, round_in, cfg, rng)


def test_norm_out_rejects_aliasing(rng):
    gw, _ = gemv_weight(_r(rng, 8, 16), "fp32")
    h = _r(rng, 8)
    with pytest.raises(AssertionError, match="alias"):
        fused_gemv(gw, _r(rng, 16), norm_out=(h, h, 1e-5, None))


def _model(preset, seed=0):
    torch.manual_seed(seed)
    with torch.device(DEV):
        return FalconMamba(get_preset(preset)).eval()


@pytest.mark.parametrize("preset,quant", [("tiny-odd", None), ("tiny-mamba", None), ("tiny-odd", (8, None)),
                                          ("tiny-mamba", (4, 32))])
def test_chain_step_matches_model_step(preset, quant, rng, monkeypatch):
    """chain_step vs model.step over two steps (the second reads the states the first wrote): logits,
    conv and SSM states; the add+RMSNorm op runs once (layer 0's norm) and the conv step never."""
    from falcon_mamba.ops import triton_backend

    model = _model(preset)
    if quant is not None:
        quantize_model(model, bits=quant[0], group_size=quant[1])
    assert chain_supported(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 4), generator=rng).to(DEV)
    with torch.no_grad():
        _, state = model(ids)
    twin = state.clone()
    tok = torch.randint(0, model.config.vocab_size, (1,), generator=rng).to(DEV)
    calls = []
    real_norm = triton_backend.add_rms_norm
    monkeypatch.setattr(triton_backend, "add_rms_norm", lambda *a, **k: calls.append(1) or real_norm(*a, **k))
    monkeypatch.setattr(triton_backend, "conv_step", None)  # a conv_step launch would fail
    for _ in range(2):
        logits = chain_step(model, tok, state.conv, state.ssm)
        ref = model.step(tok, twin)
        assert_close(logits, ref, 1e-4, 1e-4, f"chain logits {preset} {quant}")
        assert_close(state.conv, twin.conv, 1e-5, 1e-5, "conv state")
        tok = ref.argmax(-1)
    assert_close(state.ssm, twin.ssm, 1e-5, 1e-5, "ssm state")
    assert len(calls) == 2, f"add_rms_norm ran {len(calls)} times in two steps (want once per step)"


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4g128"])
def test_norm_chain_7b_widths_cuda(fmt, rng):
    """out_proj 4096 x 8192 with the norm epilogue, lm_head-like consumer, tuned and other tiles."""
    for cfg in (None, C(bn=2, bk=1024), C(bn=8, bk=512)):
        check_norm_chain(4096, 8192, fmt, torch.bfloat16, torch.bfloat16, cfg, rng)


@pytest.mark.cuda
def test_norm_chain_replays_in_a_graph_cuda(rng):
    """Graph replays: the ticket resets, the partials and rstd are recomputed each replay."""
    gw, Wf = gemv_weight(_r(rng, 4096, 8192, scale=8192 ** -0.5), "bf16")
    x = _r(rng, 8192, dtype=torch.bfloat16)
    h, h_next = _r(rng, 4096), torch.empty(4096, device=DEV)
    fused_gemv(gw, x, norm_out=(h, h_next, 1e-5, torch.bfloat16))  # compile, allocate the tickets
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y, rstd = fused_gemv(gw, x, norm_out=(h, h_next, 1e-5, torch.bfloat16))
    for _ in range(4):
        x.copy_(_r(rng, 8192, dtype=torch.bfloat16))
        h.copy_(_r(rng, 4096))
        g.replay()
        r = (h + y.float()).to(torch.bfloat16).float()
        assert torch.equal(h_next, h + y.float())
        assert_close(rstd, torch.rsqrt((r * r).mean() + 1e-5)[None], 1e-5, 0, "rstd after replay")
