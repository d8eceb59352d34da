"""The batch-1 GEMV kernels (ops/triton_gemv.py) against torch math, and the decode step's GEMV
modes (decode/step.py fast_step) against model.step. Interpreter on CPU; cuda-marked 7B shapes."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from falcon_mamba import FalconMamba, get_preset  # noqa: E402
from falcon_mamba.decode.step import fast_step  # noqa: E402
from falcon_mamba.ops import fused_reference, reference  # noqa: E402
from falcon_mamba.ops.triton_gemv import GemvConfig, GemvWeight, fused_gemv  # noqa: E402
from falcon_mamba.quant import quantize_model  # noqa: E402
from tests.helpers import assert_close, gemv_weight  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (6e-4, 2e-3), torch.bfloat16: (3e-2, 5e-2), torch.float16: (3e-2, 5e-2)}


def _r(gen, *s, dtype=torch.float32, scale=1.0):
    return (torch.randn(*s, generator=gen) * scale).to(DEV, dtype)


def check_plain(N, K, fmt, act, cfg, gen):
    gw, Wf = gemv_weight(_r(gen, N, K, scale=K ** -0.5), fmt)
    x = _r(gen, K, dtype=act)
    y = fused_gemv(gw, x, config=cfg)
    assert y.dtype == act and y.shape == (N,)
    assert_close(y, Wf @ x.float(), *TOL[act], f"gemv {fmt} {N}x{K} {cfg}")
    logits = fused_gemv(gw, x, config=cfg, out_dtype=torch.float32, round_to=act)
    assert logits.dtype == torch.float32 and torch.equal(logits, y.float()), "fp32 output rounded to act"


def check_fused(D, H, fmt, act, cfg, gen, with_res=True, CK=4):
    """add+RMSNorm prologue + in_proj (N = 2D) + conv epilogue vs the unfused reference ops."""
    gw, Wf = gemv_weight(_r(gen, 2 * D, H, scale=H ** -0.5), fmt)
    h = _r(gen, H) if with_res else _r(gen, H, dtype=act)  # layer 0 reads the embedding row
    res = _r(gen, H, dtype=act) if with_res else None
    wn = _r(gen, H, dtype=act)
    st = _r(gen, CK - 1, D, dtype=act)
    cw, cb = _r(gen, D, CK, dtype=act), _r(gen, D, dtype=act)
    st_ref = st.clone()
    ho, ho_ref = torch.full((H,), float("nan"), device=DEV), torch.empty(1, H, device=DEV)
    xz, xc = fused_gemv(gw, h, residual=res, norm_weight=wn, eps=1e-5, h_out=ho, round_in=act,
                        round_y=act, conv=(st, cw, cb), config=cfg)
    u = fused_reference.add_rms_norm(h[None], None if res is None else res[None], wn, 1e-5, round_to=act,
                                     h_out=ho_ref)
    xz_ref = (Wf @ u[0].float()).to(act)
    xc_ref = reference.conv_step(st_ref[None], xz_ref[None, :D], cw, cb)[0]
    rtol, atol = TOL[act]
    assert_close(ho, ho_ref[0], 1e-6, 1e-6, "residual sum written by program 0")
    assert_close(xz, xz_ref, rtol, atol, f"fused in_proj {fmt} {cfg}")
    assert_close(xc, xc_ref, rtol, atol, f"fused conv {fmt} {cfg}")
    assert_close(st, st_ref, rtol, atol, "conv state")
    assert torch.equal(st[:-1], st_ref[:-1]), "conv state shift"
    # norm_f + lm_head form: no residual write, fp32 norm input, fp32 logits of act-rounded values
    logits = fused_gemv(gw, h, residual=res, norm_weight=wn, eps=1e-5, out_dtype=torch.float32,
                        round_to=act, config=cfg)
    un = fused_reference.add_rms_norm(h[None], None if res is None else res[None], wn, 1e-5, round_to=None)
    assert_close(logits, (Wf @ un[0].float()).to(act).float(), rtol, atol, "norm_f + lm_head")


C = GemvConfig
PLAIN_CASES = [  # (N, K, fmt, act, config): N and K not multiples of the blocks, split-K both ways
    (37, 100, "fp32", torch.float32, C(bn=8, bk=32)),
    (37, 100, "fp32", torch.float32, C(bn=16, bk=32, split=3)),
    (37, 100, "bf16", torch.bfloat16, C(bn=8, bk=64, split=2, reduce="kernel")),
    (40, 128, "bf16", torch.bfloat16, C(bn=8, bk=64)),  # no masks at all
    (33, 90, "int8", torch.float32, C(bn=8, bk=32, split=2)),
    (33, 90, "int8", torch.bfloat16, C(bn=4, bk=128)),  # K % 4 != 0: the byte-load path
    (33, 96, "int8", torch.bfloat16, C(bn=8, bk=32, split=2)),  # int32 words, masked last block
    (32, 128, "int8", torch.float32, C(bn=8, bk=64)),  # int32 words, no masks
    (29, 100, "int4g32", torch.float32, C(bn=8, bk=64, split=2)),  # padded K, 2 groups per block
    (29, 100, "int4g32", torch.bfloat16, C(bn=8, bk=16, split=3, reduce="kernel")),  # half groups
    (24, 256, "int4g128", torch.float32, C(bn=8, bk=128)),
    # one block per K slice: the weight tile is loaded before the PDL wait (PRE); masked K tail
    (37, 100, "bf16", torch.bfloat16, C(bn=8, bk=32, split=4)),
    (40, 128, "int8", torch.bfloat16, C(bn=8, bk=32, split=4)),
    (24, 256, "int4g32", torch.float32, C(bn=8, bk=64, split=4)),
    (24, 256, "int4g32", torch.bfloat16, C(bn=8, bk=64, split=4, xsplit=True)),
]


def test_plain_gemv_formats(rng):
    for N, K, fmt, act, cfg in PLAIN_CASES:
        check_plain(N, K, fmt, act, cfg, rng)


def _one_code_per_row(codes, background, K):
    """(N, K) with N = len(codes) * K: row r * K + k holds codes[r] at column k, background[r] elsewhere
    (so every extreme code sits at every byte / nibble position of a 32-bit word)."""
    rows = []
    for c, b in zip(codes, background):
        block = torch.full((K, K), b, dtype=torch.int32)
        block.fill_diagonal_(c)
        rows.append(block)
    return torch.cat(rows)


@pytest.mark.parametrize("cfg", [C(bn=8, bk=16), C(bn=16, bk=32, split=2)])
def test_int8_extreme_codes_decode_exactly(cfg, rng):
    """-128 (outside formats' [-127, 127], still a valid int8), -127, 127 and 1 among zero codes, scale 1:
    each output is one code * x product, so it must equal torch's product bit for bit."""
    K = 32
    codes = _one_code_per_row([-128, -127, 127, 1], [0, 0, 0, 0], K)
    gw = GemvWeight(w=codes.to(DEV, torch.int8), bits=8, scales=torch.ones(codes.shape[0], device=DEV), K=K)
    x = _r(rng, K)
    y = fused_gemv(gw, x, config=cfg)
    assert torch.equal(y, (codes.to(DEV).float() * x).sum(1))


@pytest.mark.parametrize("cfg", [C(bn=8, bk=32), C(bn=8, bk=64), C(bn=16, bk=16, split=2)])
def test_int4_extreme_codes_decode_exactly(cfg, rng):
    """Codes 0 and 15 against zero points 0, 8 and 15 (scale 1); the other codes equal the zero point
    (they decode to 0). Each output is (code - zero) * x exactly."""
    K, G = 64, 32
    pairs = [(15, 0), (0, 15), (0, 8), (15, 8)]  # (code, zero point)
    codes = _one_code_per_row([c for c, _ in pairs], [z for _, z in pairs], K)
    zeros = torch.tensor([z for _, z in pairs]).repeat_interleave(K)[:, None].expand(-1, K // G)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    gw = GemvWeight(w=packed.to(DEV), bits=4, scales=torch.ones(zeros.shape, dtype=torch.float16, device=DEV),
                    zeros=zeros.to(DEV, torch.uint8).contiguous(), group=G, K=K)
    x = _r(rng, K)
    y = fused_gemv(gw, x, config=cfg)
    assert torch.equal(y, ((codes - zeros.repeat_interleave(G, 1)).to(DEV).float() * x).sum(1))


def test_fused_norm_gemv_conv(rng):
    check_fused(20, 48, "fp32", torch.float32, C(bn=8, bk=32), rng)
    check_fused(20, 48, "bf16", torch.bfloat16, C(bn=16, bk=32, split=2, norm_bk=16), rng, with_res=False)
    check_fused(21, 40, "int8", torch.float32, C(bn=8, bk=16, split=2, reduce="kernel"), rng, CK=3)
    check_fused(20, 48, "int4g32", torch.float32, C(bn=8, bk=32, norm_bk=32), rng)


def check_conv_in(D, N, fmt, act, cfg, gen, CK=4, bias=True):
    """x_proj with the conv-step input (CIN) vs triton conv_step + the plain GEMV on its xc: equal up
    to the GEMV's summation order (the same xc), and the conv state untouched."""
    from falcon_mamba.ops import triton_decode

    gw, Wf = gemv_weight(_r(gen, N, D, scale=D ** -0.5), fmt)
    x = _r(gen, D, dtype=act)
    st = _r(gen, CK - 1, D, dtype=act)
    cw, cb = _r(gen, D, CK, dtype=act, scale=0.5), (_r(gen, D, dtype=act) if bias else None)
    st0 = st.clone()
    y = fused_gemv(gw, x, conv_in=(st, cw, cb), config=cfg)
    assert torch.equal(st, st0), "the CIN GEMV must not write the conv state"
    xc = triton_decode.conv_step(st.clone()[None], x[None], cw, cb)[0]
    y_ref = fused_gemv(gw, xc, config=cfg)
    assert y.dtype == act and y.shape == (N,)
    assert_close(y, y_ref, 1e-5 if act == torch.float32 else TOL[act][0], 1e-5 if act == torch.float32
                 else TOL[act][1], f"conv-in gemv {fmt} {cfg}")
    assert_close(y, (Wf @ xc.float()).to(act), *TOL[act], f"conv-in gemv vs torch {fmt} {cfg}")
    if act == torch.float32 and cfg.split == 1:  # one summation order: the inputs are the same bits
        assert torch.equal(y, y_ref), f"conv-in xc differs from conv_step's {fmt} {cfg}"


def test_conv_in_gemv(rng):
    check_conv_in(37, 19, "fp32", torch.float32, C(bn=8, bk=16), rng)
    check_conv_in(37, 19, "bf16", torch.bfloat16, C(bn=4, bk=16, split=3), rng, bias=False)
    check_conv_in(40, 16, "fp32", torch.float32, C(bn=8, bk=8, split=5, reduce="kernel"), rng, CK=3)
    check_conv_in(33, 21, "int8", torch.float32, C(bn=8, bk=16), rng)  # byte loads
    check_conv_in(36, 21, "int8", torch.bfloat16, C(bn=8, bk=16, split=2), rng)  # int32 words
    check_conv_in(40, 13, "int4g32", torch.float32, C(bn=8, bk=32), rng)  # padded K
    check_conv_in(40, 13, "int4g32", torch.bfloat16, C(bn=4, bk=16, split=2, reduce="kernel"), rng)


XS = dict(xsplit=True)
XSPLIT_CASES = [  # (N, K, fmt, act, config with xsplit): odd K (masked input), split-K, both int4 groups
    (33, 100, "int8", torch.float32, C(bn=8, bk=64, split=2, **XS)),  # words, masked last block
    (32, 128, "int8", torch.bfloat16, C(bn=16, bk=128, **XS)),  # no masks
    (29, 100, "int4g32", torch.float32, C(bn=8, bk=64, **XS)),  # padded K, 2 groups per block
    (13, 40, "int4g32", torch.bfloat16, C(bn=8, bk=16, split=2, reduce="kernel", **XS)),  # half groups
    (24, 300, "int4g128", torch.float32, C(bn=8, bk=256, **XS)),  # padded K, 2 groups per block
]


def _same_bits_as_strided(gw, x, cfg, **kw):
    """The xsplit tile input is the strided path's, split without arithmetic: the same bits out."""
    from dataclasses import replace

    y_new = fused_gemv(gw, x, config=cfg, **kw)
    y_old = fused_gemv(gw, x, config=replace(cfg, xsplit=False), **kw)
    assert torch.equal(y_new, y_old), f"xsplit differs from the strided input: {cfg} {sorted(kw)} " \
        f"max diff {(y_new.float() - y_old.float()).abs().max().item():.3e}"


def test_xsplit_input_matches_strided_and_reference(rng):
    """xsplit=True (int4, int8 words): against torch math (check_plain / check_fused / check_conv_in)
    and bit for bit against the strided-input kernel, plain, with the add+RMSNorm prologue and with the
    conv-step input (CIN)."""
    for N, K, fmt, act, cfg in XSPLIT_CASES:
        check_plain(N, K, fmt, act, cfg, rng)
        gw, _ = gemv_weight(_r(rng, N, K, scale=K ** -0.5), fmt)
        _same_bits_as_strided(gw, _r(rng, K, dtype=act), cfg)
        _same_bits_as_strided(gw, _r(rng, K), cfg, residual=_r(rng, K, dtype=act),
                              norm_weight=_r(rng, K, dtype=act), round_in=act, round_y=act)
        cin = (_r(rng, 3, K, dtype=act), _r(rng, K, 4, dtype=act, scale=0.5), _r(rng, K, dtype=act))
        _same_bits_as_strided(gw, _r(rng, K, dtype=act), cfg, conv_in=cin)
    check_fused(20, 100, "int4g32", torch.float32, C(bn=8, bk=64, norm_bk=32, **XS), rng)
    check_fused(21, 40, "int8", torch.bfloat16, C(bn=8, bk=16, split=2, **XS), rng, with_res=False, CK=3)
    check_conv_in(40, 13, "int4g32", torch.float32, C(bn=8, bk=32, **XS), rng)
    check_conv_in(36, 21, "int8", torch.bfloat16, C(bn=8, bk=16, split=2, **XS), rng)


def test_h_out_must_not_alias_input(rng):
    gw, _ = gemv_weight(_r(rng, 8, 16), "fp32")
    h = _r(rng, 16)
    with pytest.raises(AssertionError, match="alias"):
        fused_gemv(gw, h, norm_weight=_r(rng, 16), h_out=h)


def _model(preset, seed=0):
    torch.manual_seed(seed)
    with torch.device(DEV):
        return FalconMamba(get_preset(preset)).eval()


def _check_step_mode(preset, quant, rng, conv_patch=None, **mode):
    """fast_step in one batch-1 mode vs model.step over two steps (the second reads the states the
    first wrote): logits, SSM and conv states. conv_patch: a monkeypatch context that makes any
    conv_step launch fail (the conv-folded mode must not launch it)."""
    from falcon_mamba.ops import triton_backend

    model = _model(preset)
    if quant is not None:
        quantize_model(model, bits=quant[0], group_size=quant[1])
    ids = torch.randint(0, model.config.vocab_size, (1, 4), generator=rng).to(DEV)
    with torch.no_grad():
        _, state = model(ids)
    twin = state.clone()
    tok = torch.randint(0, model.config.vocab_size, (1,), generator=rng).to(DEV)
    for _ in range(2):
        if conv_patch is not None:
            with conv_patch.context() as mp:
                mp.setattr(triton_backend, "conv_step", None)  # a conv_step launch would fail
                logits = fast_step(model, tok, state.conv, state.ssm, **mode)
        else:
            logits = fast_step(model, tok, state.conv, state.ssm, **mode)
        ref = model.step(tok, twin)
        assert_close(logits, ref, 1e-4, 1e-4, f"{mode} step logits {preset} {quant}")
        assert_close(state.conv, twin.conv, 1e-5, 1e-5, "conv state")
        tok = ref.argmax(-1)
    assert_close(state.ssm, twin.ssm, 1e-5, 1e-5, "ssm state")
    return model


@pytest.mark.parametrize("preset,quant", [("tiny-odd", None), ("tiny-mamba", None), ("tiny-odd", (8, None)),
                                          ("tiny-mamba", (4, 32))])
def test_gemv_fast_step_matches_model_step(preset, quant, rng):
    """The "triton" mode (every batch-1 projection by the Triton GEMV) vs model.step."""
    _check_step_mode(preset, quant, rng, gemv=True)


@pytest.mark.parametrize("preset,quant", [("tiny-odd", None), ("tiny-mamba", None), ("tiny-odd", (8, None)),
                                          ("tiny-mamba", (8, None))])
def test_conv_folded_fast_step_matches_model_step(preset, quant, rng, monkeypatch):
    """The "triton_gemv_cx" mode (conv step inside x_proj's GEMV and the SSM kernel) vs model.step;
    the conv_step op is never called."""
    from falcon_mamba.decode.step import conv_fold_supported

    model = _check_step_mode(preset, quant, rng, conv_patch=monkeypatch, gemv=True, conv_fold=True)
    assert conv_fold_supported(model)


# ---- GPU: 7B shapes -------------------------------------------------------------------------------
SHAPES_7B = {"in_proj": (16384, 4096), "out_proj": (4096, 8192), "x_proj": (288, 8192)}


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4g128", "fp32"])
@pytest.mark.parametrize("name", list(SHAPES_7B))
def test_gemv_7b_shapes_cuda(name, fmt, rng):
    N, K = SHAPES_7B[name]
    act = torch.float32 if fmt == "fp32" else torch.bfloat16
    tuned_bk = 1024 if fmt == "int4g128" else 512
    for cfg in (None, C(bn=8, bk=512, split=4), C(bn=8, bk=512, split=4, reduce="kernel"),
                C(bn=16, bk=tuned_bk, xsplit=True), C(bn=8, bk=512, split=4, xsplit=True)):
        check_plain(N, K, fmt, act, cfg, rng)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4g128"])
def test_fused_in_proj_7b_cuda(fmt, rng):
    for cfg in (None, C(bn=16, bk=256), C(bn=32, bk=256, warps=8), C(bn=16, bk=512, xsplit=True)):
        check_fused(8192, 4096, fmt, torch.bfloat16, cfg, rng)


@pytest.mark.cuda
def test_fused_split_replays_in_a_graph_cuda(rng):
    """The "last" split reduction leaves its tickets at zero: graph replays stay exact."""
    gw, Wf = gemv_weight(_r(rng, 288, 8192, scale=8192 ** -0.5), "bf16")
    x = _r(rng, 8192, dtype=torch.bfloat16)
    cfg = C(bn=4, bk=512, split=8)
    fused_gemv(gw, x, config=cfg)  # compile and allocate the tickets outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = fused_gemv(gw, x, config=cfg)
    for _ in range(5):
        x.copy_(_r(rng, 8192, dtype=torch.bfloat16))
        g.replay()
        assert_close(y, (Wf @ x.float()).to(torch.bfloat16), 3e-2, 5e-2, "graph replay")


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4g128"])
def test_conv_in_x_proj_7b_cuda(fmt, rng):
    for cfg in (None, C(bn=16, bk=512, split=8), C(bn=8, bk=1024, split=4, reduce="kernel"),
                C(bn=16, bk=512, split=8, xsplit=True)):
        check_conv_in(8192, 288, fmt, torch.bfloat16, cfg or default_config_for(fmt), rng)


def default_config_for(fmt):
    """The launcher's own choice for the 7B x_proj with the conv input (check_conv_in needs a config)."""
    from falcon_mamba.ops.triton_gemv import default_config

    gw, _ = gemv_weight(torch.randn(288, 8192) * 0.01, fmt)
    return default_config(gw, torch.device(DEV), conv_in=True)


@pytest.mark.cuda
@pytest.mark.parametrize("quant,mode", [
    *[(q, m) for q in (None, (8, None), (4, 128)) for m in ("triton_cx", "triton")],
    ((4, 128), "triton_xp")])
def test_gemv_modes_step_7b_widths_cuda(quant, mode, rng):
    """The GEMV decode modes at the 7B's hidden/inner widths (2 layers, small vocab, bf16), graphed,
    against model.step over several steps: with int4 g128 the packed kernel runs in_proj (with the
    conv step as its epilogue in triton_gemv mode; and x_proj as more programs of that launch in
    triton_gemv_xp mode) and out_proj, reading the pair layout written by the norm and SSM kernels."""
    from falcon_mamba.config import ModelConfig
    from falcon_mamba.decode.modes import DecodeOptions
    from tests.test_decode_graphs import PoolStepper

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=4096, intermediate_size=8192, num_hidden_layers=2, vocab_size=4096,
                      time_step_rank=256)
    with torch.device("cuda"):
        model = FalconMamba(cfg).to_dtype(torch.bfloat16).eval()
    if quant is not None:
        quantize_model(model, bits=quant[0], group_size=quant[1])
    ids = torch.randint(0, cfg.vocab_size, (1, 5), generator=rng).cuda()
    with torch.no_grad():
        _, state = model(ids)
    dec = PoolStepper(model, state, DecodeOptions(mode=mode))
    twin = state.clone()
    tok = torch.randint(0, cfg.vocab_size, (1,), generator=rng).cuda()
    for _ in range(4):
        logits = dec.step(tok)
        ref = model.step(tok, twin)
        assert_close(logits, ref, 3e-2, 5e-2, f"{mode} logits {quant}")
        tok = ref.argmax(-1)
    assert dec.graphs.batch1_choice()[0].name == mode and dec.graphs.use_graphs
    got = dec.state()
    assert_close(got.conv, twin.conv, 3e-2, 5e-2, "conv state")
    assert_close(got.ssm, twin.ssm, 3e-2, 5e-2, "ssm state")
