"""The packed-bf16 int4 GEMV (ops/triton_gemv_i4.py) against the dequantized weight's product.
Interpreter on CPU (the fp32 data flow: ASM off); cuda-marked: the inline-PTX path at the 7B shapes."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from falcon_mamba.ops import triton_gemv_i4  # noqa: E402
from falcon_mamba.ops.triton_gemv import TUNED, GemvConfig, GemvWeight, fused_gemv  # noqa: E402
from falcon_mamba.quant import formats  # noqa: E402
from tests.helpers import assert_close, gemv_weight  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
C = GemvConfig


def _rel(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


CPU_CASES = [  # (N, K, group, act, config): masked rows, padded K, groups wider / narrower than a block
    (40, 256, 32, torch.float32, C(bn=16, bk=128, i4x2=4)),
    (21, 100, 32, torch.float32, C(bn=8, bk=64, i4x2=4)),  # Kp 128: masked input tail, masked rows
    (64, 512, 128, torch.bfloat16, C(bn=8, bk=256, i4x2=4)),  # two groups per block
    (24, 256, 128, torch.float32, C(bn=8, bk=64, i4x2=1)),  # half a group per block
    (16, 192, 64, torch.bfloat16, C(bn=16, bk=64, i4x2=1)),
]


@pytest.mark.parametrize("N,K,group,act,cfg", CPU_CASES)
def test_i4x2_matches_dequantized_product(N, K, group, act, cfg, rng):
    gw, Wf = gemv_weight(torch.randn(N, K, generator=rng) * K ** -0.5, f"int4g{group}")
    gw = GemvWeight(**{**gw.__dict__, "w": gw.w.to(DEV), "scales": gw.scales.to(DEV),
                       "zeros": gw.zeros.to(DEV)})
    x = torch.randn(K, generator=rng).to(DEV, act)
    assert triton_gemv_i4.fits(gw, cfg)
    ref = Wf.to(DEV).double() @ x.double()
    y = triton_gemv_i4.gemv_i4x2(gw, x, torch.empty(N, dtype=torch.float32, device=DEV), 0, cfg)
    # fp32 data flow on CPU; on a GPU the packed bf16 sums (module docstring: ~0.5% at most)
    assert _rel(y, ref) < (1e-5 if DEV == "cpu" else 1e-2), _rel(y, ref)
    # through the common launcher: same kernel, rounded to the input dtype (the interpreter's
    # fp32 -> bf16 cast may differ from torch's by an ulp)
    y2 = fused_gemv(gw, x, config=cfg)
    assert y2.dtype == act
    torch.testing.assert_close(y2.float(), y.to(act).float(), rtol=8e-3, atol=1e-6)


def test_fits_rejects_tiles_it_cannot_take(rng):
    gw, _ = gemv_weight(torch.randn(8, 200, generator=rng), "int4g32")  # Kp 224
    assert not triton_gemv_i4.fits(gw, C(bk=64, i4x2=4))  # 224 is not whole blocks of 64
    assert triton_gemv_i4.fits(gw, C(bk=32, i4x2=4))
    assert not triton_gemv_i4.fits(gw, C(bk=32, i4x2=2))  # chains of 1 or 4 words only
    assert not triton_gemv_i4.fits(gw, C(bk=32, i4x2=0))
    dense, _ = gemv_weight(torch.randn(8, 64, generator=rng), "bf16")
    assert not triton_gemv_i4.fits(dense, C(bk=32, i4x2=2))


def test_unfit_tile_falls_back_to_the_fp32_kernel(rng):
    """A tile the packed kernel cannot take runs the fp32 int4 kernel: same answer, no error."""
    gw, Wf = gemv_weight(torch.randn(8, 200, generator=rng) * 0.1, "int4g32")
    gw = GemvWeight(**{**gw.__dict__, "w": gw.w.to(DEV), "scales": gw.scales.to(DEV),
                       "zeros": gw.zeros.to(DEV)})
    x = torch.randn(200, generator=rng).to(DEV)
    y = fused_gemv(gw, x, config=C(bn=8, bk=64, i4x2=4))
    assert_close(y, Wf.to(DEV) @ x, 6e-4, 2e-3, "fallback")


def _exact_case(N, K, gen):
    """Codes over the whole range 0..15 (each row holds both extremes), zero points 0..15, power-of-two
    scales and x in {-2..2}: every product and every bf16 lane sum is a small integer times a power
    of two, exact in bf16, so the packed path must reproduce the exact product bit for bit."""
    codes = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    codes[:, 0], codes[:, 1] = 0, 15
    G = 128
    zeros = torch.randint(0, 16, (N, K // G), generator=gen, dtype=torch.uint8)
    scales = (2.0 ** torch.randint(-8, -2, (N, K // G), generator=gen)).to(torch.float16)
    q = codes[:, 0::2] | (codes[:, 1::2] << 4)
    x = torch.randint(-2, 3, (K,), generator=gen).to(torch.bfloat16)
    w = formats.dequantize(q, scales, zeros, 4, G, K, torch.float64)
    return GemvWeight(w=q, bits=4, scales=scales, zeros=zeros, group=G, K=K), x, w @ x.double()


def test_i4x2_decodes_every_code_exactly(rng):
    gw, x, ref = _exact_case(16, 512, rng)
    gw = GemvWeight(**{**gw.__dict__, "w": gw.w.to(DEV), "scales": gw.scales.to(DEV),
                       "zeros": gw.zeros.to(DEV)})
    y = fused_gemv(gw, x.to(DEV), out_dtype=torch.float32, config=C(bn=16, bk=256, i4x2=4))
    torch.testing.assert_close(y.double(), ref.to(DEV), rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
def test_i4x2_ptx_decodes_every_code_exactly():
    gen = torch.Generator().manual_seed(3)
    gw, x, ref = _exact_case(4096, 8192, gen)
    gw = GemvWeight(**{**gw.__dict__, "w": gw.w.cuda(), "scales": gw.scales.cuda(), "zeros": gw.zeros.cuda()})
    for ch in (1, 4):
        y = fused_gemv(gw, x.cuda(), out_dtype=torch.float32, config=C(bn=8, bk=2048, i4x2=ch))
        torch.testing.assert_close(y.double(), ref.cuda(), rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("N,K", [(16384, 4096), (4096, 8192), (65024, 4096)])
@pytest.mark.parametrize("cfg", [C(bn=16, bk=1024, i4x2=4), C(bn=32, bk=1024, warps=8, i4x2=4),
                                 C(bn=8, bk=2048, i4x2=1), C(bn=4, bk=2048, i4x2=4)])
def test_i4x2_ptx_7b_shapes(N, K, cfg):
    """The bf16x2 arithmetic's error stays a small fraction of a percent (the bf16 rounding of the
    exact result is ~0.2%) and the fp32 int4 kernel agrees with the exact product."""
    gen = torch.Generator(device="cuda").manual_seed(N + K)
    gw, _ = gemv_weight((torch.randn(N, K, device="cuda", generator=gen) * K ** -0.5).to(torch.bfloat16),
                        "int4g128")
    ref = formats.dequantize(gw.w, gw.scales, gw.zeros, 4, 128, K, torch.float64) @ (
        x := torch.randn(K, device="cuda", generator=gen).to(torch.bfloat16)).double()
    y = fused_gemv(gw, x, out_dtype=torch.float32, config=cfg)
    assert _rel(y, ref) < 8e-3, _rel(y, ref)
    assert _rel(fused_gemv(gw, x, out_dtype=torch.float32, config=C(bn=16, bk=1024, xsplit=True)), ref) < 1e-5


def _pair_order(K: int) -> torch.Tensor:
    """k for each slot of the pair layout: slot 2 * (j * K/8 + w) + h holds x[8w + j + 4h]."""
    j, w, h = torch.meshgrid(torch.arange(4), torch.arange(K // 8), torch.arange(2), indexing="ij")
    return (8 * w + j + 4 * h).reshape(-1)


def test_producers_write_the_pair_layout(rng):
    """The norm and the SSM step kernels also store their one-row output in the layout the packed
    GEMV reads (triton_decode._pair_index): a permutation of the same values."""
    from falcon_mamba.ops import triton_decode

    H = 48
    h = torch.randn(1, H, generator=rng).to(DEV)
    res = torch.randn(1, H, generator=rng).to(DEV, torch.bfloat16)
    w = torch.randn(H, generator=rng).to(DEV, torch.bfloat16)
    pairs = torch.empty(H, dtype=torch.bfloat16, device=DEV)
    u = triton_decode.rms_rows(h, w, 1e-5, residual=res, round_in=torch.bfloat16, round_y=torch.bfloat16,
                               out_dtype=torch.bfloat16, pairs_out=pairs)
    assert torch.equal(pairs, u[0, _pair_order(H)])
    D, N = 40, 8
    state = torch.randn(1, D, N, generator=rng).to(DEV)
    R = 8  # pairs_out is the fused form's (dt_proj in the kernel: batch 1)
    x, z = (torch.randn(1, D, generator=rng).to(DEV, torch.bfloat16) for _ in range(2))
    dtr = torch.randn(1, R, generator=rng).to(DEV, torch.bfloat16)
    W_dt = (torch.randn(D, R, generator=rng) * R ** -0.5).to(DEV, torch.bfloat16)
    Bm, Cm = (torch.randn(1, N, generator=rng).to(DEV, torch.bfloat16) for _ in range(2))
    A = -torch.rand(D, N, generator=rng).to(DEV)
    pairs = torch.empty(D, dtype=torch.bfloat16, device=DEV)
    y = triton_decode.ssm_step(state, x, dtr, A, Bm, Cm, torch.randn(D, generator=rng).to(DEV), z, None,
                               W_dt=W_dt, pairs_out=pairs)
    assert torch.equal(pairs, y[0, _pair_order(D)])


@pytest.mark.cuda
@pytest.mark.parametrize("N,K,cfg", [(16384, 4096, C(bn=8, bk=1024, i4x2=4)),
                                     (4096, 8192, C(bn=4, bk=2048, i4x2=4)),
                                     (65024, 4096, C(bn=16, bk=1024, warps=8, i4x2=1))])
def test_i4x2_reads_the_pair_layout_bit_for_bit(N, K, cfg):
    """Given x's pair-layout copy, the kernel skips building the pairs: the same bits out."""
    gen = torch.Generator(device="cuda").manual_seed(N)
    gw, _ = gemv_weight((torch.randn(N, K, device="cuda", generator=gen) * K ** -0.5).to(torch.bfloat16),
                        "int4g128")
    x = torch.randn(K, device="cuda", generator=gen).to(torch.bfloat16)
    pairs = x[_pair_order(K).cuda()].contiguous()
    assert torch.equal(fused_gemv(gw, x, config=cfg, x_pairs=pairs), fused_gemv(gw, x, config=cfg))


def test_i4x2_conv_epilogue_matches_the_fp32_kernel(rng):
    """in_proj's conv step as the packed kernel's epilogue (rows < D): the same xz, xc and conv
    state as the fp32 int4 kernel's epilogue (interpreter: both fp32 data flows)."""
    D, H, CK = 32, 64, 4
    gw, _ = gemv_weight(torch.randn(2 * D, H, generator=rng) * H ** -0.5, "int4g32")
    gw = GemvWeight(**{**gw.__dict__, "w": gw.w.to(DEV), "scales": gw.scales.to(DEV),
                       "zeros": gw.zeros.to(DEV)})
    u = torch.randn(H, generator=rng).to(DEV, torch.bfloat16)
    st = torch.randn(CK - 1, D, generator=rng).to(DEV, torch.bfloat16)
    cw, cb = (torch.randn(D, CK, generator=rng).to(DEV, torch.bfloat16),
              torch.randn(D, generator=rng).to(DEV, torch.bfloat16))
    st2 = st.clone()
    xz, xc = fused_gemv(gw, u, conv=(st, cw, cb), config=C(bn=8, bk=64, i4x2=4))
    xz2, xc2 = fused_gemv(gw, u, conv=(st2, cw, cb), config=C(bn=8, bk=64))
    for a, b, what in ((xz, xz2, "xz"), (xc, xc2, "xc"), (st, st2, "conv state")):
        torch.testing.assert_close(a.float(), b.float(), rtol=8e-3, atol=1e-5, msg=what)
    assert torch.equal(st[:-1], st2[:-1]), "conv state shift"


@pytest.mark.parametrize("D,XN,xgroup,cfg", [(32, 40, 32, C(bn=8, bk=64, i4x2=4)),
                                              (64, 48, 64, C(bn=16, bk=32, i4x2=1))])
def test_merged_x_proj_matches_its_own_launch(D, XN, xgroup, cfg, rng):
    """x_proj as extra programs of the packed in_proj launch (they wait for the x half's xc, split
    K, sum the partials in order): the same xz, xc and conv state as without it, and xdbl as the
    fp32 int4 kernel computes x_proj of that xc; the counters are left at zero (a second launch
    gives the same result)."""
    H, CK = 64, 4
    gw, _ = gemv_weight(torch.randn(2 * D, H, generator=rng) * H ** -0.5, "int4g32")
    xw, _ = gemv_weight(torch.randn(XN, D, generator=rng) * D ** -0.5, f"int4g{xgroup}")
    gw, xw = (GemvWeight(**{**g.__dict__, "w": g.w.to(DEV), "scales": g.scales.to(DEV),
                            "zeros": g.zeros.to(DEV)}) for g in (gw, xw))
    assert triton_gemv_i4.xproj_fits(gw, cfg, xw)
    u = torch.randn(H, generator=rng).to(DEV, torch.bfloat16)
    st = torch.randn(CK - 1, D, generator=rng).to(DEV, torch.bfloat16)
    cw, cb = (torch.randn(D, CK, generator=rng).to(DEV, torch.bfloat16),
              torch.randn(D, generator=rng).to(DEV, torch.bfloat16))
    st0, st2 = st.clone(), st.clone()
    xz, xc, xdbl = fused_gemv(gw, u, conv=(st, cw, cb), config=cfg, xproj=xw)
    xz2, xc2 = fused_gemv(gw, u, conv=(st2, cw, cb), config=cfg)
    assert torch.equal(xz, xz2) and torch.equal(xc, xc2) and torch.equal(st, st2)
    ref = fused_gemv(xw, xc2, out_dtype=torch.float32)
    assert xdbl.dtype == xc.dtype and xdbl.shape == (XN,)
    torch.testing.assert_close(xdbl.float(), ref, rtol=8e-3, atol=1e-5)
    _, _, again = fused_gemv(gw, u, conv=(st0, cw, cb), config=cfg, xproj=xw)
    assert torch.equal(again, xdbl)


@pytest.mark.cuda
@pytest.mark.parametrize("use_pdl", [False, True])
def test_merged_x_proj_7b_shapes_cuda(use_pdl):
    """The 7B's in_proj (16384 x 4096, its tuned packed tile) with x_proj (288 x 8192) as extra
    programs: xz and xc bit-equal to the launch without them, xdbl as the fp32 int4 kernel's x_proj
    of that xc, and five launches in a row (with PDL: each waits for the previous) agree: the
    counters the x_proj programs wait on are left at zero."""
    from falcon_mamba.ops import pdl

    gen = torch.Generator(device="cuda").manual_seed(3)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    gw, _ = gemv_weight((rnd(16384, 4096) * 4096 ** -0.5).to(torch.bfloat16), "int4g128")
    xw, _ = gemv_weight((rnd(288, 8192) * 8192 ** -0.5).to(torch.bfloat16), "int4g128")
    cfg = TUNED[("int4g128", 16384, 4096, False)]
    assert triton_gemv_i4.xproj_fits(gw, cfg, xw)
    u = rnd(4096).to(torch.bfloat16)
    st0 = rnd(3, 8192).to(torch.bfloat16)
    cw, cb = rnd(8192, 4).to(torch.bfloat16), rnd(8192).to(torch.bfloat16)
    st = st0.clone()
    xz0, xc0 = fused_gemv(gw, u, conv=(st, cw, cb), config=cfg)
    ref = fused_gemv(xw, xc0, out_dtype=torch.float32)
    outs = []
    with pdl.enabled(use_pdl):
        for _ in range(5):
            st = st0.clone()
            outs.append(fused_gemv(gw, u, conv=(st, cw, cb), config=cfg, xproj=xw))
    for xz, xc, xdbl in outs:
        assert torch.equal(xz, xz0) and torch.equal(xc, xc0)
        assert torch.equal(xdbl, outs[0][2])
    assert _rel(outs[0][2].float(), ref) < 5e-3, _rel(outs[0][2].float(), ref)


@pytest.mark.cuda
@pytest.mark.parametrize("key", [k for k, c in TUNED.items() if c.i4x2])
def test_every_tuned_packed_tile_matches_the_exact_product(key):
    """The tiles the decoder uses (triton_gemv.TUNED entries with i4x2), with and without the pair
    layout: the pack=4 chains must group one row's consecutive words in their compiled layout."""
    fmt, N, K, _ = key
    gen = torch.Generator(device="cuda").manual_seed(N + 7)
    gw, _ = gemv_weight((torch.randn(N, K, device="cuda", generator=gen) * K ** -0.5).to(torch.bfloat16), fmt)
    x = torch.randn(K, device="cuda", generator=gen).to(torch.bfloat16)
    ref = formats.dequantize(gw.w, gw.scales, gw.zeros, 4, gw.group, K, torch.float64) @ x.double()
    for pairs in (None, x[_pair_order(K).cuda()].contiguous()):
        y = fused_gemv(gw, x, out_dtype=torch.float32, config=TUNED[key], x_pairs=pairs)
        assert _rel(y, ref) < 8e-3, (key, _rel(y, ref))
