"""Weight-only quantization: number formats, QuantLinear, quantized models, folders, the CLI."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import falcon_mamba as fm
from falcon_mamba.cli import main
from falcon_mamba.errors import UserError
from falcon_mamba.model import DtProj
from falcon_mamba.quant import (
    QuantLinear,
    default_modules,
    formats,
    quantizable_modules,
    quantize_model,
    save_quantized,
)
from falcon_mamba.quant import folder as qfolder
from tests.helpers import assert_close


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---- formats -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 64), (4, 128)])
def test_format_roundtrip_error(rng, bits, group):
    # Odd K (100) exercises the int4 padding; rows of very different scales check per-row/group scales.
    w = torch.randn(37, 100, generator=rng) * torch.logspace(-3, 0, 37)[:, None]
    t = formats.quantize_weight(w, bits, group)
    for name, (shape, dtype) in formats.buffer_shapes(37, 100, bits, group).items():
        assert t[name].shape == shape and t[name].dtype == dtype, name
    deq = formats.dequantize(t["qweight"], t["scales"], t.get("zeros"), bits, group, 100, torch.float32)
    assert deq.shape == w.shape
    row_err = ((deq - w).norm(dim=1) / w.norm(dim=1)).max().item()
    # Gaussian weights: int8 absmax has ~0.5% relative error per row, int4 (16 levels) ~8-10%.
    assert row_err < (0.01 if bits == 8 else 0.15), row_err
    if bits == 8:
        # Plain rounding: every weight within half a step of its row's scale.
        assert ((deq - w).abs() <= t["scales"][:, None] * 0.5 + 1e-7).all()
        assert t["qweight"].abs().max() <= 127
    else:
        assert int(t["zeros"].max()) <= 15
        codes = formats.unpack_int4(t["qweight"])
        assert codes.max() <= 15 and codes.shape == (37, -(-100 // group) * group)


def test_int4_clip_search_never_worse_than_minmax(rng):
    w = torch.randn(64, 256, generator=rng)
    w[0, 3] = 25.0  # an outlier: clipping it helps the rest of its group
    best = formats.quantize_int4(w, 64)
    deq = formats.dequantize(best["qweight"], best["scales"], best["zeros"], 4, 64, 256, torch.float32)
    wg = w.view(64, 4, 64)
    q, z, s = formats._int4_codes(wg, wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0))
    plain = ((q - z[..., None]) * s[..., None]).view(64, 256)
    err_best = (deq - w).pow(2).view(64, 4, 64).sum(-1)
    err_plain = (plain - w).pow(2).view(64, 4, 64).sum(-1)
    assert (err_best <= err_plain * (1 + 1e-5) + 1e-9).all()
    assert err_best[0, 0] < 0.97 * err_plain[0, 0]  # the outlier's group gains from clipping


# ---- QuantLinear ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_quant_linear_is_dequantized_linear(rng, bits, group):
    lin = torch.nn.Linear(100, 37, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(37, 100, generator=rng))
        lin.bias.copy_(torch.randn(37, generator=rng))
    q = QuantLinear.from_linear(lin, bits, group)
    x = torch.randn(2, 5, 100, generator=rng)
    expect = F.linear(x, q.dequantized_weight(), lin.bias)
    assert_close(q(x), expect, 1e-6, 1e-5, "QuantLinear vs F.linear(dequantized)")
    assert _rel(q(x), lin(x)) < (0.01 if bits == 8 else 0.15)
    # The dt_proj contract: a linear whose forward leaves the bias to the caller.
    q2 = QuantLinear.from_linear(lin, bits, group, bias_in_forward=False)
    assert_close(q2(x), expect - lin.bias, 1e-6, 1e-5, "bias_in_forward=False")
    assert set(q.state_dict()) == {"qweight", "scales", "bias"} | ({"zeros"} if bits == 4 else set())


# ---- quantized models ----------------------------------------------------------------------------
def _model(preset="tiny-odd", seed=0):
    torch.manual_seed(seed)
    return fm.FalconMamba(fm.get_preset(preset)).eval()


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_quantized_model_forward_step_and_error(rng, bits, group):
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=rng)
    dense, _ = model(ids)
    quantize_model(model, bits, group)
    names = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert names == set(default_modules(model)) == set(quantizable_modules(model))
    # Every linear by default, dt_proj included (quantizing it measured no worse; folder.py).
    assert sum(n.endswith(".dt_proj") for n in names) == model.config.num_hidden_layers
    assert "lm_head" in names
    # What stays high precision keeps its dtype (A_log, D, dt bias fp32; conv, norms, embeddings).
    assert model.backbone.layers[0].mixer.A_log.dtype == torch.float32
    assert isinstance(model.backbone.layers[0].mixer.conv1d, torch.nn.Conv1d)
    logits, state = model(ids)
    err = _rel(logits, dense)
    assert 0 < err < (0.02 if bits == 8 else 0.25), err
    # Decode token by token through the quantized layers gives the same logits as the forward.
    st = model.new_state(2)
    steps = torch.stack([model.step(ids[:, t], st) for t in range(ids.shape[1])], 1)
    assert_close(steps, logits, 6e-4, 2e-3, "quantized step vs forward")
    assert_close(st.ssm, state.ssm, 6e-4, 2e-3, "quantized step vs forward state")


def test_quantize_model_refuses_twice_and_bad_args():
    model = _model("tiny")
    with pytest.raises(UserError, match="group"):
        quantize_model(model, 4, 48)
    with pytest.raises(UserError, match="group-size applies to --bits 4"):
        quantize_model(model, 8, 64)
    with pytest.raises(UserError, match="8 or 4"):
        quantize_model(model, 3)
    with pytest.raises(UserError, match="not quantizable"):
        quantize_model(model, 8, modules=["backbone.layers.0.mixer.conv1d"])
    quantize_model(model, 8)
    with pytest.raises(UserError, match="already quantized"):
        quantize_model(model, 4)


def test_tied_model_keeps_head_dense(rng):
    model = _model("tiny-mamba")
    quantize_model(model, 4, 64)
    assert not isinstance(model.lm_head, QuantLinear)
    assert model.lm_head.weight is model.backbone.embeddings.weight


# ---- folders ---------------------------------------------------------------------------------------
def test_save_load_roundtrip(tmp_path, rng):
    model = _model()
    quantize_model(model, 4, 64)
    save_quantized(model, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert meta["format"] == "falcon-mamba-quant/1" and meta["bits"] == 4 and meta["group_size"] == 64
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("backbone.layers.0.mixer.in_proj.qweight").get_dtype() == "U8"
    assert "backbone.layers.0.mixer.in_proj.scales" in keys and "lm_head.zeros" in keys
    assert "backbone.layers.0.mixer.dt_proj.qweight" in keys  # quantized by default
    assert "backbone.layers.0.mixer.dt_proj.bias" in keys and meta["modules"] == default_modules(model)
    assert not any(k.endswith("in_proj.weight") for k in keys)
    loaded = fm.load_model(tmp_path / "q")
    assert isinstance(loaded.backbone.layers[1].mixer.out_proj, QuantLinear)
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=rng)
    assert torch.equal(loaded(ids)[0], model(ids)[0])
    bf = fm.load_model(tmp_path / "q", dtype="bfloat16")
    assert bf.backbone.embeddings.weight.dtype == torch.bfloat16
    assert bf.backbone.layers[0].mixer.D.dtype == torch.float32
    assert bf.lm_head.scales.dtype == torch.float16  # quantized tensors keep their stored types
    assert _rel(bf(ids)[0], model(ids)[0]) < 0.05


def test_folder_with_dense_dt_proj_still_loads(tmp_path, rng, monkeypatch):
    """Folders written before dt_proj was quantized by default keep it dense; the loader must take
    the module list from quantization.json, never from default_modules."""
    model = _model()
    quantize_model(model, 8, modules=quantizable_modules(model, include_dt_proj=False))
    save_quantized(model, tmp_path / "old")
    with safe_open(str(tmp_path / "old" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "backbone.layers.0.mixer.dt_proj.weight" in keys
    assert not any(k.endswith("dt_proj.qweight") for k in keys)

    def no_default(_model):
        raise AssertionError("the loader consulted default_modules")

    monkeypatch.setattr(qfolder, "default_modules", no_default)
    loaded = fm.load_model(tmp_path / "old")
    for blk in loaded.backbone.layers:
        assert type(blk.mixer.dt_proj) is DtProj and isinstance(blk.mixer.in_proj, QuantLinear)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=rng)
    assert torch.equal(loaded(ids)[0], model(ids)[0])
    st, twin = loaded.new_state(2), model.new_state(2)
    assert_close(loaded.step(ids[:, 0], st), model.step(ids[:, 0], twin), 0, 0, "step, dense dt_proj")


def _tamper(folder, fn):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_load_is_strict(tmp_path):
    model = _model("tiny")
    quantize_model(model, 8)
    save_quantized(model, tmp_path / "q")
    good = load_file(str(tmp_path / "q" / "model.safetensors"))

    def restore():
        save_file(good, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "pt"})

    _tamper(tmp_path / "q", lambda t: t.pop("lm_head.scales"))
    with pytest.raises(UserError, match="missing lm_head.scales"):
        fm.load_model(tmp_path / "q")
    restore()
    _tamper(tmp_path / "q", lambda t: t.__setitem__("lm_head.qweight", t["lm_head.qweight"].to(torch.int16)))
    with pytest.raises(UserError, match="lm_head.qweight is torch.int16"):
        fm.load_model(tmp_path / "q")
    restore()
    _tamper(tmp_path / "q", lambda t: t.__setitem__("lm_head.weight", torch.zeros(3)))
    with pytest.raises(UserError, match="unexpected lm_head.weight"):
        fm.load_model(tmp_path / "q")
    restore()
    qj = tmp_path / "q" / "quantization.json"
    meta = json.loads(qj.read_text())
    qj.write_text(json.dumps(meta | {"bits": 5}))
    with pytest.raises(UserError, match="quantization.json.*8 or 4"):
        fm.load_model(tmp_path / "q")
    qj.write_text(json.dumps(meta | {"modules": ["backbone.norm_f"]}))
    with pytest.raises(UserError, match="not quantizable"):
        fm.load_model(tmp_path / "q")
    qj.write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        fm.load_model(tmp_path / "q")
    qj.write_text(json.dumps(meta))
    assert isinstance(fm.load_model(tmp_path / "q").lm_head, QuantLinear)


# ---- CLI -----------------------------------------------------------------------------------------
def test_cli_quantize(tmp_path, rng, capsys):
    model = _model()
    fm.save_model(model, tmp_path / "m")
    assert main(["quantize", "--model", str(tmp_path / "m"), "--bits", "4", "--group-size", "32",
                 "--out", str(tmp_path / "q4")]) == 0
    assert "int4, group 32" in capsys.readouterr().out
    q = fm.load_model(tmp_path / "q4")
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=rng)
    assert 0 < _rel(q(ids)[0], model(ids)[0]) < 0.25
    assert q.backbone.embeddings.weight.dtype == torch.float32  # "as stored"

    def err(*argv):
        assert main(list(argv)) == 2
        return capsys.readouterr().err

    assert "already quantized" in err("quantize", "--model", str(tmp_path / "q4"), "--bits", "8",
                                      "--out", str(tmp_path / "again"))
    assert "group-size must be one of 32, 64, 128" in err(
        "quantize", "--model", str(tmp_path / "m"), "--bits", "4", "--group-size", "100", "--out",
        str(tmp_path / "x"))
    assert "--out is the --model folder" in err("quantize", "--model", str(tmp_path / "m"), "--bits",
                                                "8", "--out", str(tmp_path / "m"))
    assert not (tmp_path / "again").exists() and not (tmp_path / "x").exists()


def test_cli_quantize_dt_proj_choice(tmp_path, rng, capsys):
    model = _model("tiny")
    fm.save_model(model, tmp_path / "m")
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=rng)
    for choice, expect in ((None, "quantized"), ("dense", "dense"), ("quantized", "quantized")):
        out = tmp_path / f"q-{choice}"
        argv = ["quantize", "--model", str(tmp_path / "m"), "--bits", "8", "--out", str(out)]
        assert main(argv + ([] if choice is None else ["--dt-proj", choice])) == 0
        assert f"dt_proj {expect}" in capsys.readouterr().out
        modules = json.loads((out / "quantization.json").read_text())["modules"]
        want = quantizable_modules(model, include_dt_proj=expect == "quantized")
        assert modules == want
        q = fm.load_model(out)
        assert isinstance(q.backbone.layers[0].mixer.dt_proj, QuantLinear) == (expect == "quantized")
        assert 0 < _rel(q(ids)[0], model(ids)[0]) < 0.02
    with pytest.raises(SystemExit):  # argparse refuses an unknown choice
        main(["quantize", "--model", str(tmp_path / "m"), "--bits", "8", "--out", str(tmp_path / "x"),
              "--dt-proj", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err and not (tmp_path / "x").exists()
