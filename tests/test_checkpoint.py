"""Checkpoint loading/saving: dtypes, sharding, strict checks, and bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import falcon_mamba as fm
from falcon_mamba.cli import main as cli_main
from tests.conftest import FALCON_TOKENIZER


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = fm.FalconMamba(fm.get_preset("tiny-odd")).eval()
    return model, fm.save_model(model, tmp_path / "model")


def test_roundtrip_exact(saved):
    model, folder = saved
    again = fm.load_model(folder)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_keeps_fp32_params(saved, dtype):
    model, folder = saved
    low = fm.load_model(folder, dtype=dtype)
    params = dict(low.named_parameters())
    assert params["backbone.layers.0.mixer.in_proj.weight"].dtype == dtype
    for name in ("mixer.A_log", "mixer.D", "mixer.dt_proj.bias"):
        assert params[f"backbone.layers.0.{name}"].dtype == torch.float32
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        ref = model(ids)[0]
        got, state = low(ids)
    assert got.dtype == torch.float32 and state.ssm.dtype == torch.float32
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 5e-2, rel


def test_load_from_string_dtype(saved):
    _, folder = saved
    assert fm.load_model(str(folder), dtype="bf16").dtype == torch.bfloat16


def test_missing_config(tmp_path):
    with pytest.raises(fm.UserError, match="config.json"):
        fm.load_model(tmp_path)


def test_not_a_folder(tmp_path):
    with pytest.raises(fm.UserError, match="no such folder"):
        fm.load_model(tmp_path / "nope")


def test_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(fm.UserError, match="offline"):
        fm.load_model("tiiuae/not-a-local-folder")


def test_unknown_model_type(saved):
    _, folder = saved
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fm.UserError, match="model_type 'llama'"):
        fm.load_model(folder)


def test_broken_config_json(saved):
    _, folder = saved
    (folder / "config.json").write_text("{not json")
    with pytest.raises(fm.UserError, match="not valid JSON"):
        fm.load_model(folder)


def test_truncated_safetensors(saved):
    _, folder = saved
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(fm.UserError, match="model.safetensors"):
        fm.load_model(folder)


def test_garbage_safetensors(saved):
    _, folder = saved
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(fm.UserError, match="not a readable safetensors"):
        fm.load_model(folder)


def test_missing_unexpected_and_misshaped_named(saved):
    _, folder = saved
    f = folder / "model.safetensors"
    tensors = load_file(f)
    del tensors["backbone.layers.1.mixer.D"]
    tensors["backbone.layers.0.mixer.bogus"] = torch.ones(3)
    tensors["backbone.layers.2.mixer.A_log"] = torch.ones(7, 7)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(fm.UserError) as e:
        fm.load_model(folder)
    msg = str(e.value)
    assert "missing backbone.layers.1.mixer.D" in msg
    assert "unexpected backbone.layers.0.mixer.bogus" in msg
    assert "backbone.layers.2.mixer.A_log has shape (7, 7)" in msg
    assert "\n" not in msg


def test_pickle_only_folder_refused(saved):
    _, folder = saved
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(fm.UserError, match="never loaded"):
        fm.load_model(folder)


def test_missing_shard(tmp_path):
    model = fm.FalconMamba(fm.get_preset("tiny"))
    folder = fm.save_model(model, tmp_path / "m", max_shard_size=50_000)
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(fm.UserError, match="shard named in"):
        fm.load_model(folder)


def test_device_that_cannot_run():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the test is for a machine without one")
    with pytest.raises(fm.UserError, match="no CUDA GPU"):
        fm.load_model("unused", device="cuda")


def test_unknown_dtype():
    with pytest.raises(fm.UserError, match="unknown dtype"):
        fm.load_model("unused", dtype="int3")


def test_save_replaces_atomically(saved, tmp_path):
    model, folder = saved
    other = fm.FalconMamba(fm.get_preset("tiny-odd"))
    fm.save_model(other, folder)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.old"))
    got = fm.load_model(folder)
    assert torch.equal(got.lm_head.weight, other.lm_head.weight)


def test_tokenizer_vocab_must_fit(saved):
    from falcon_mamba.tokenizer import check_fits

    model, _ = saved
    tok = fm.load_tokenizer(FALCON_TOKENIZER)
    with pytest.raises(fm.UserError, match="65024 tokens but the model's vocabulary is 301"):
        check_fits(tok, model.config.vocab_size)
    check_fits(tok, 65024)


def test_tie_left_out_of_config_json(tmp_path):
    # transformers 4.x writes a tied Falcon Mamba without the key (its default is true) and without
    # lm_head: that folder loads as tied; with lm_head stored, the missing key still means untied
    torch.manual_seed(0)
    for tied in (True, False):
        model = fm.FalconMamba(fm.get_preset("tiny").replace(tie_word_embeddings=tied)).eval()
        folder = fm.save_model(model, tmp_path / f"m{tied}")
        cfg = json.loads((folder / "config.json").read_text())
        del cfg["tie_word_embeddings"]
        (folder / "config.json").write_text(json.dumps(cfg))
        back = fm.load_model(folder)
        assert back.config.tie_word_embeddings == tied
        ids = torch.randint(0, model.config.vocab_size, (1, 9))
        with torch.no_grad():
            assert torch.equal(back(ids)[0], model(ids)[0])


def test_info_on_transformers_folder(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.FalconMambaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                         intermediate_size=64, tie_word_embeddings=False)
    transformers.FalconMambaForCausalLM(cfg).save_pretrained(tmp_path)
    assert cli_main(["info", "--model", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    n = sum(p.numel() for p in fm.load_model(tmp_path).parameters())
    assert f"parameters: {n:,}" in out
    assert "model_type: falcon_mamba" in out and "op_backend:" in out and "torch:" in out


def test_info_bad_folder(tmp_path, capsys):
    assert cli_main(["info", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "Traceback" not in err
