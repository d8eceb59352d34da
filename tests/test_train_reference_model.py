"""The benchmark's Transformer reference: same parameter count as the Mamba it is compared with,
documents isolated in packed sequences as in the Mamba, and trainable by the same loop."""

import json

import pytest
import torch

import falcon_mamba as fm
from benchmarks.small_model.transformer import TransformerLM, match_mamba
from falcon_mamba.train import apply_overrides, get_recipe, train
from falcon_mamba.train.recipes import default_model
from tests.helpers import assert_close


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The CI machine has 2 cores; tiny models run fastest without intra-op threads.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_sized_like_the_mamba():
    for mc in (default_model().model.replace(vocab_size=8192), fm.get_preset("tiny")):
        tc = match_mamba(mc)
        model = TransformerLM(tc)
        n = sum(p.numel() for p in model.parameters())
        assert n == tc.num_parameters
        assert abs(n - mc.num_parameters) / mc.num_parameters < 0.005, (n, mc.num_parameters)


def test_documents_do_not_see_each_other(rng):
    torch.manual_seed(0)
    model = TransformerLM(match_mamba(fm.get_preset("tiny")))
    a = torch.randint(0, 512, (1, 7), generator=rng)
    b = torch.randint(0, 512, (1, 10), generator=rng)
    reset = torch.zeros(1, 17, dtype=torch.bool)
    reset[0, 7] = True
    packed = model(torch.cat([a, b], 1), reset_BL=reset)
    assert_close(packed[:, 7:], model(b), 1e-5, 1e-5, "doc 2 packed vs alone")
    assert_close(packed[:, :7], model(a), 1e-5, 1e-5, "doc 1 packed vs alone")
    assert (model(torch.cat([a, b], 1))[:, 7:] - model(b)).abs().max() > 1e-3


def test_trains_in_the_same_loop(tmp_path):
    from tests.test_data import make_data

    data = make_data(tmp_path, lines=60)
    cfg = apply_overrides(get_recipe("tiny"), ["seq_len=24", "steps=3", "model.hidden_size=32"])
    tc = match_mamba(cfg.model.replace(vocab_size=304))
    res = train(cfg, data, tmp_path / "t", model_fn=lambda mc: TransformerLM(tc), progress=False,
                log=lambda *a: None)
    assert res.model_dir is None and res.val_bpb is not None and res.steps == 3


def test_compare_script_writes_the_table_plot_and_model(tmp_path, capsys):
    from benchmarks.small_model import compare
    from tests.test_data import make_data

    data = make_data(tmp_path, lines=60)
    sets = ["seq_len=24", "steps=2", "model.hidden_size=32", "model.num_hidden_layers=2",
            "model.intermediate_size=64", "eval_tokens=64", "global_batch=4", "micro_batch=4"]
    assert compare.main(["--data", str(data), "--out", str(tmp_path / "runs"), "--preset", "tiny",
                         "--no-progress", *[a for s in sets for a in ("--set", s)]]) == 0
    res = tmp_path / "runs" / "results"
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["model"] for r in record["rows"]] == ["Falcon Mamba", "Transformer"]
    assert record["steps"] == 2 and all(r["val_bpb"] > 0 for r in record["rows"])
    n_mamba, n_trans = (r["parameters"] for r in record["rows"])
    assert abs(n_mamba - n_trans) < 0.01 * n_mamba
    assert (res / "loss_curves.png").stat().st_size > 5000
    assert "| Falcon Mamba |" in (res / "results.md").read_text()
    from safetensors.torch import load_file

    weights = load_file(res / "mamba_model" / "model.safetensors")  # exported in bf16, A_log/D/dt bias fp32
    assert weights["backbone.embeddings.weight"].dtype == torch.bfloat16
    assert weights["backbone.layers.0.mixer.A_log"].dtype == torch.float32
    fm.load_model(res / "mamba_model")
