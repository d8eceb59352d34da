"""The op layer: the reference (the spec) against independent formulas, and the chunked ``torch``
backend against the reference, forward and backward, on fresh random inputs.

Legend: B batch, L length, D inner width, N state size, K conv taps.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import falcon_mamba as fm
from falcon_mamba import ops
from falcon_mamba.ops import chunked, reference
from tests.helpers import assert_close

TOL = {torch.float32: (6e-4, 2e-3), torch.bfloat16: (3e-2, 5e-2)}
BACKENDS = {"reference": reference, "torch": chunked}


def _scan_inputs(rng, Bsz, L, D, N, dtype, *, D_skip=True, z=True, bias=True, state=True, reset=True):
    """Random selective-scan inputs; A, D, dt_bias and the state fp32 (as the model passes them)."""
    r = lambda *s: torch.randn(*s, generator=rng)
    inp = {
        "x_BLD": r(Bsz, L, D).to(dtype),
        "dt_BLD": (r(Bsz, L, D) - 1.0).to(dtype),
        "A_DN": -torch.exp(0.5 * r(D, N)),
        "B_BLN": r(Bsz, L, N).to(dtype),
        "C_BLN": r(Bsz, L, N).to(dtype),
        "D_D": r(D) if D_skip else None,
        "z_BLD": r(Bsz, L, D).to(dtype) if z else None,
        "dt_bias_D": 0.5 * r(D) if bias else None,
        "state_BDN": r(Bsz, D, N) if state else None,
    }
    if reset:
        rst = torch.rand(Bsz, L, generator=rng) < 0.08
        rst[0, 0] = True  # a reset at t = 0 drops the initial state
        if L > 3:
            rst[-1, L // 2] = True
        inp["reset_BL"] = rst
    return inp


def _run_scan(mod, inp, g_y, g_h):
    """Forward + backward of one backend on leaf copies of inp: (y, h, grads by name)."""
    leaves = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor)
                  and v.is_floating_point() else v) for k, v in inp.items()}
    y, h = mod.selective_scan(**leaves)
    ((y.float() * g_y).sum() + (h * g_h).sum()).backward()
    grads = {k: v.grad for k, v in leaves.items()
             if isinstance(v, torch.Tensor) and v.is_floating_point()}
    return y.detach(), h.detach(), grads


# ---- the reference against independent formulas ------------------------------------------------
def test_reference_scan_equals_a_float64_loop(rng):
    Bsz, L, D, N = 2, 9, 3, 4
    inp = _scan_inputs(rng, Bsz, L, D, N, torch.float32, reset=False)
    y, h = reference.selective_scan(**inp)
    # The recurrence written out element by element in float64.
    x, dtr, A = inp["x_BLD"].double(), inp["dt_BLD"].double(), inp["A_DN"].double()
    Bm, Cm, Dd = inp["B_BLN"].double(), inp["C_BLN"].double(), inp["D_D"].double()
    z, bias, s = inp["z_BLD"].double(), inp["dt_bias_D"].double(), inp["state_BDN"].double()
    y64 = torch.zeros(Bsz, L, D, dtype=torch.float64)
    h64 = s.clone()
    for b in range(Bsz):
        for d in range(D):
            for t in range(L):
                v = dtr[b, t, d].item() + bias[d].item()
                dt = v if v > 20 else math.log1p(math.exp(v))
                acc = 0.0
                for n in range(N):
                    h64[b, d, n] = (math.exp(dt * A[d, n].item()) * h64[b, d, n]
                                    + dt * x[b, t, d] * Bm[b, t, n])
                    acc += h64[b, d, n].item() * Cm[b, t, n].item()
                zz = z[b, t, d].item()
                y64[b, t, d] = (acc + Dd[d] * x[b, t, d]) * zz / (1 + math.exp(-zz))
    assert_close(y, y64, 1e-5, 1e-5, "reference scan y vs float64 loop")
    assert_close(h, h64, 1e-5, 1e-5, "reference scan final state vs float64 loop")


@pytest.mark.parametrize("K", [2, 4])
def test_reference_conv_equals_F_conv1d(rng, K):
    Bsz, L, D = 2, 11, 7
    x = torch.randn(Bsz, L, D, generator=rng)
    w = torch.randn(D, K, generator=rng)
    bias = torch.randn(D, generator=rng)
    state = torch.randn(Bsz, K - 1, D, generator=rng)
    y, new_state = reference.causal_conv1d(x, w, bias, None, silu=False)
    want = F.conv1d(x.transpose(1, 2), w[:, None], bias, padding=K - 1, groups=D)[..., :L]
    assert_close(y, want.transpose(1, 2), 1e-5, 1e-5, "conv, zero state")
    y, new_state = reference.causal_conv1d(x, w, bias, state, silu=True)
    want = F.conv1d(torch.cat([state, x], 1).transpose(1, 2), w[:, None], bias, groups=D)
    assert_close(y, F.silu(want.transpose(1, 2)), 1e-5, 1e-5, "conv with a state, silu")
    assert torch.equal(new_state, x[:, -(K - 1):])


def test_reference_resets_equal_separate_documents(rng):
    """A packed row with a reset == the documents run alone from zero states."""
    Bsz, L, D, N, K, p = 1, 12, 6, 3, 4, 5
    inp = _scan_inputs(rng, Bsz, L, D, N, torch.float32, reset=False)
    reset = torch.zeros(Bsz, L, dtype=torch.bool)
    reset[0, p] = True
    y, h = reference.selective_scan(**inp, reset_BL=reset)
    second = {k: (v[:, p:] if k in ("x_BLD", "dt_BLD", "B_BLN", "C_BLN", "z_BLD") else v)
              for k, v in inp.items()}
    second["state_BDN"] = None
    y2, h2 = reference.selective_scan(**second)
    assert_close(y[:, p:], y2, 1e-6, 1e-6, "scan after the reset vs the document alone")
    assert_close(h, h2, 1e-6, 1e-6, "final state vs the document alone")
    y1, _ = reference.selective_scan(**inp)
    assert torch.equal(y[:, :p], y1[:, :p])  # the first document is untouched
    # A reset at t = 0 drops the initial state.
    r0 = torch.zeros(Bsz, L, dtype=torch.bool)
    r0[0, 0] = True
    assert torch.equal(reference.selective_scan(**inp, reset_BL=r0)[0],
                       reference.selective_scan(**{**inp, "state_BDN": None})[0])
    # The conv: no tap reaches before the reset, and the state is dropped at t = 0.
    x, w = inp["x_BLD"], torch.randn(D, K, generator=rng)
    st = torch.randn(Bsz, K - 1, D, generator=rng)
    yc, _ = reference.causal_conv1d(x, w, None, st, reset_BL=reset)
    yc2, _ = reference.causal_conv1d(x[:, p:], w, None, None)
    assert_close(yc[:, p:], yc2, 1e-6, 1e-6, "conv after the reset vs the document alone")
    yc0, _ = reference.causal_conv1d(x, w, None, st, reset_BL=r0)
    assert torch.equal(yc0, reference.causal_conv1d(x, w, None, None)[0])


# ---- both backends: steps, state chaining, inputs left alone --------------------------------------
@pytest.mark.parametrize("name", list(BACKENDS))
def test_step_ops_equal_the_length_one_op(rng, name):
    mod = BACKENDS[name]
    Bsz, D, N, K = 3, 10, 5, 4
    inp = _scan_inputs(rng, Bsz, 1, D, N, torch.float32, reset=False)
    y_full, h_full = mod.selective_scan(**inp)
    state = inp["state_BDN"].clone()
    y = mod.ssm_step(state, inp["x_BLD"][:, 0], inp["dt_BLD"][:, 0], inp["A_DN"], inp["B_BLN"][:, 0],
                     inp["C_BLN"][:, 0], inp["D_D"], inp["z_BLD"][:, 0], inp["dt_bias_D"])
    assert_close(y, y_full[:, 0], 1e-6, 1e-6, f"{name} ssm_step y")
    assert_close(state, h_full, 1e-6, 1e-6, f"{name} ssm_step state (in place)")
    w, b = torch.randn(D, K, generator=rng), torch.randn(D, generator=rng)
    cst = torch.randn(Bsz, K - 1, D, generator=rng)
    yc_full, cst_full = mod.causal_conv1d(inp["x_BLD"], w, b, cst)
    yc = mod.conv_step(cst, inp["x_BLD"][:, 0], w, b)
    assert_close(yc, yc_full[:, 0], 1e-6, 1e-6, f"{name} conv_step y")
    assert torch.equal(cst, cst_full)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_scanning_in_two_pieces_equals_one_piece(rng, name):
    """[a; b] in one call == a, then b from a's states (scan and conv), resets included; the
    input states are not modified."""
    mod = BACKENDS[name]
    Bsz, L, D, N, K, cut = 2, 23, 9, 4, 4, 14
    inp = _scan_inputs(rng, Bsz, L, D, N, torch.float32)
    inp["reset_BL"][1, cut - 2] = True  # inside the conv state's window at the cut
    seq = ("x_BLD", "dt_BLD", "B_BLN", "C_BLN", "z_BLD", "reset_BL")
    part = lambda sl, st: {k: (v[:, sl] if k in seq else v) for k, v in {**inp, "state_BDN": st}.items()}
    s0 = inp["state_BDN"].clone()
    y, h = mod.selective_scan(**inp)
    ya, ha = mod.selective_scan(**part(slice(0, cut), inp["state_BDN"]))
    yb, hb = mod.selective_scan(**part(slice(cut, L), ha))
    assert torch.equal(inp["state_BDN"], s0)
    assert_close(torch.cat([ya, yb], 1), y, 1e-5, 1e-5, f"{name} scan y in two pieces")
    assert_close(hb, h, 1e-5, 1e-5, f"{name} scan state in two pieces")
    x, rst = inp["x_BLD"], inp["reset_BL"]
    w, b = torch.randn(D, K, generator=rng), torch.randn(D, generator=rng)
    cst = torch.randn(Bsz, K - 1, D, generator=rng)
    c0 = cst.clone()
    yc, sc = mod.causal_conv1d(x, w, b, cst, reset_BL=rst)
    yca, sca = mod.causal_conv1d(x[:, :cut], w, b, cst, reset_BL=rst[:, :cut])
    ycb, scb = mod.causal_conv1d(x[:, cut:], w, b, sca, reset_BL=rst[:, cut:])
    assert torch.equal(cst, c0)
    assert_close(torch.cat([yca, ycb], 1), yc, 1e-6, 1e-6, f"{name} conv in two pieces")
    assert torch.equal(scb, sc)


# ---- the chunked backend against the reference, forward and backward ----------------------------
# (length, D, N, option set): widths odd and even; each option set on a few lengths.
OPTIONS = {
    "all": {},
    "bare": dict(D_skip=False, z=False, bias=False, state=False, reset=False),
    "no-reset": dict(reset=False),
    "reset-no-state": dict(state=False, z=False),
}
GRID = [(1, 7, 4, "all"), (1, 16, 16, "bare"), (17, 33, 5, "all"), (17, 8, 16, "no-reset"),
        (64, 24, 16, "reset-no-state"), (64, 5, 3, "bare"), (100, 13, 8, "all"),
        (257, 9, 6, "all"), (257, 16, 4, "no-reset")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("L,D,N,opts", GRID, ids=[f"L{g[0]}-D{g[1]}-N{g[2]}-{g[3]}" for g in GRID])
def test_chunked_scan_matches_reference(rng, dtype, L, D, N, opts):
    inp = _scan_inputs(rng, 2, L, D, N, dtype, **OPTIONS[opts])
    g_y = torch.randn(2, L, D, generator=rng)
    g_h = torch.randn(2, D, N, generator=rng)
    y_r, h_r, gr = _run_scan(reference, inp, g_y, g_h)
    y_c, h_c, gc = _run_scan(chunked, inp, g_y, g_h)
    rtol, atol = TOL[dtype]
    assert y_c.dtype == dtype and h_c.dtype == torch.float32
    assert_close(y_c, y_r, rtol, atol, "y")
    assert_close(h_c, h_r, rtol, atol, "final state")
    assert set(gc) == set(gr)
    for k in gr:
        assert_close(gc[k], gr[k], rtol, atol, f"grad {k}")


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_scan_tiles_and_blocks_match_reference(rng, monkeypatch, chunk):
    """Force several channel tiles, several length blocks and ragged last chunks and blocks."""
    monkeypatch.setattr(chunked, "CHUNK", chunk)
    monkeypatch.setattr(chunked, "TILE_D", {"cpu": 8})
    monkeypatch.setattr(chunked, "TILE_ELEMS", {"cpu": 2 * 3 * 8 * 3 * chunk})  # 3 chunks a block
    L, D, N = 61, 21, 3
    inp = _scan_inputs(rng, 2, L, D, N, torch.float32)
    d_ranges, l_ranges = chunked._tiles(2, L, D, N, torch.device("cpu"))
    assert len(d_ranges) == 3 and len(l_ranges) == -(-L // (3 * chunk))
    g_y, g_h = torch.randn(2, L, D, generator=rng), torch.randn(2, D, N, generator=rng)
    y_r, h_r, gr = _run_scan(reference, inp, g_y, g_h)
    y_c, h_c, gc = _run_scan(chunked, inp, g_y, g_h)
    assert_close(y_c, y_r, 6e-4, 2e-3, "y")
    assert_close(h_c, h_r, 6e-4, 2e-3, "final state")
    for k in gr:
        assert_close(gc[k], gr[k], 6e-4, 2e-3, f"grad {k}")


def test_chunked_scan_one_tile_as_on_other_devices(rng, monkeypatch):
    """Devices other than the CPU get the default tiling: one tile here."""
    monkeypatch.setattr(chunked, "TILE_D", {})
    monkeypatch.setattr(chunked, "TILE_ELEMS", {})
    L, D, N = 45, 19, 4
    d_ranges, l_ranges = chunked._tiles(2, L, D, N, torch.device("cpu"))
    assert d_ranges == [(0, D)] and l_ranges == [(0, L)]
    inp = _scan_inputs(rng, 2, L, D, N, torch.float32)
    g_y, g_h = torch.randn(2, L, D, generator=rng), torch.randn(2, D, N, generator=rng)
    y_r, h_r, gr = _run_scan(reference, inp, g_y, g_h)
    y_c, h_c, gc = _run_scan(chunked, inp, g_y, g_h)
    assert_close(y_c, y_r, 6e-4, 2e-3, "y")
    for k in gr:
        assert_close(gc[k], gr[k], 6e-4, 2e-3, f"grad {k}")


def test_chunked_scan_survives_large_decays(rng):
    """dt*A far below -88 (exp underflows to 0) and long chunks: no inf or nan, same as reference."""
    inp = _scan_inputs(rng, 2, 40, 6, 4, torch.float32)
    inp["dt_BLD"] = inp["dt_BLD"] + 30.0
    inp["A_DN"] = inp["A_DN"] * 10
    y_r, h_r = reference.selective_scan(**inp)
    y_c, h_c = chunked.selective_scan(**inp)
    assert torch.isfinite(y_c).all() and torch.isfinite(h_c).all()
    assert_close(y_c, y_r, 6e-4, 2e-3, "y")
    assert_close(h_c, h_r, 6e-4, 2e-3, "final state")


CONV_GRID = [(1, 7, 4), (17, 33, 3), (64, 16, 2), (100, 13, 4), (257, 9, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("L,D,K", CONV_GRID, ids=[f"L{g[0]}-D{g[1]}-K{g[2]}" for g in CONV_GRID])
def test_chunked_conv_matches_reference(rng, dtype, L, D, K):
    Bsz = 3
    x = torch.randn(Bsz, L, D, generator=rng).to(dtype)
    w = torch.randn(D, K, generator=rng)
    b = torch.randn(D, generator=rng)
    st = torch.randn(Bsz, K - 1, D, generator=rng).to(dtype)
    rst = torch.rand(Bsz, L, generator=rng) < 0.15
    rst[0, 0] = True
    rtol, atol = TOL[dtype]
    g = torch.randn(Bsz, L, D, generator=rng)
    for state, bias, silu, reset in [(st, b, True, rst), (None, None, False, None), (st, b, False, None)]:
        outs = []
        for mod in (reference, chunked):
            leaves = [t.detach().clone().requires_grad_() if t is not None else None
                      for t in (x, w, bias, state)]
            y, new_state = mod.causal_conv1d(*leaves, silu=silu, reset_BL=reset)
            (y.float() * g).sum().backward()
            outs.append((y.detach(), new_state.detach(), [t.grad for t in leaves if t is not None]))
        (y_r, s_r, g_r), (y_c, s_c, g_c) = outs
        assert y_c.dtype == dtype and s_c.dtype == dtype
        assert_close(y_c, y_r, rtol, atol, f"conv y (reset={reset is not None})")
        assert torch.equal(s_c, s_r)
        for i, (a, e) in enumerate(zip(g_c, g_r)):
            assert_close(a, e, rtol, atol, f"conv grad of input {i}")


def test_no_gradient_crosses_a_document_boundary(rng):
    """The chunked ops give exactly zero gradient to inputs of an earlier document."""
    L, D, N, K, p = 40, 6, 4, 4, 23
    inp = _scan_inputs(rng, 1, L, D, N, torch.float32, reset=False)
    reset = torch.zeros(1, L, dtype=torch.bool)
    reset[0, p] = True
    x = inp["x_BLD"].clone().requires_grad_()
    xc, _ = chunked.causal_conv1d(x, torch.randn(D, K, generator=rng), None, None, reset_BL=reset)
    y, _ = chunked.selective_scan(**{**inp, "x_BLD": xc, "state_BDN": None}, reset_BL=reset)
    y[:, p:].sum().backward()
    assert x.grad[:, :p].abs().max() == 0
    assert x.grad[:, p:].abs().max() > 0


# ---- dispatch and the model -------------------------------------------------------------------
@pytest.fixture
def restore_backend():
    saved = ops._override
    yield
    ops._override = saved


def test_cpu_default_backend_is_torch(restore_backend, capsys):
    ops.set_backend(None)
    assert ops.backend_name("cpu") == "torch"
    from falcon_mamba.cli import main

    assert main(["info", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["op_backend"] == "torch"


@pytest.mark.parametrize("preset", ["tiny", "tiny-odd"])
def test_model_logits_torch_backend_equal_reference(rng, restore_backend, preset):
    cfg = fm.get_preset(preset)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    model = fm.FalconMamba(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 37), generator=rng)
    out = {}
    for name in ("reference", "torch"):
        ops.set_backend(name)
        model.zero_grad()
        logits, state = model(ids)
        logits.logsumexp(-1).mean().backward()
        out[name] = (logits.detach(), state, model.backbone.layers[0].mixer.A_log.grad.clone())
    (l_r, s_r, g_r), (l_t, s_t, g_t) = out["reference"], out["torch"]
    assert_close(l_t, l_r, 6e-4, 2e-3, f"{preset} logits torch vs reference")
    assert_close(s_t.ssm, s_r.ssm, 6e-4, 2e-3, f"{preset} final ssm state")
    assert_close(s_t.conv, s_r.conv, 6e-4, 2e-3, f"{preset} final conv state")
    assert_close(g_t, g_r, 6e-4, 2e-3, f"{preset} A_log gradient")


def test_chunked_workspace_works_across_inference_mode():
    """Scratch buffers first made under inference_mode are reused by a later autograd call."""
    from falcon_mamba.ops import chunked

    chunked._ws.bufs.clear()
    g = torch.Generator().manual_seed(5)
    x, dt, A, Bm, Cm = (torch.randn(2, 40, 24, generator=g), torch.randn(2, 40, 24, generator=g),
                        -torch.rand(24, 4, generator=g) - 0.1, torch.randn(2, 40, 4, generator=g),
                        torch.randn(2, 40, 4, generator=g))
    with torch.inference_mode():
        y_inf, _ = chunked.selective_scan(x, dt, A, Bm, Cm)
    x.requires_grad_(True)
    y, _ = chunked.selective_scan(x, dt, A, Bm, Cm)
    y.sum().backward()
    assert torch.equal(y.detach(), y_inf) and x.grad is not None and torch.isfinite(x.grad).all()
