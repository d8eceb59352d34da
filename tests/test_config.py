import json

import pytest

import falcon_mamba as fm
from falcon_mamba.config import ModelConfig


def test_7b_preset_parameter_count():
    cfg = fm.get_preset("falcon-mamba-7b")
    assert cfg.num_parameters == 7_272_665_088
    assert cfg.params_per_layer == 105_312_256
    assert not cfg.tie_word_embeddings and cfg.model_type == "falcon_mamba"


def test_intermediate_size_wins_over_expand():
    d = {"model_type": "falcon_mamba", "hidden_size": 4096, "num_hidden_layers": 64, "expand": 16,
         "intermediate_size": 8192, "vocab_size": 65024, "time_step_rank": 256}
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.intermediate_size == 8192 and cfg == fm.get_preset("falcon-mamba-7b").replace(
        pad_token_id=0, eos_token_id=0)


def test_expand_used_when_no_intermediate_size():
    cfg = ModelConfig.from_hf_dict({"model_type": "mamba", "hidden_size": 24, "num_hidden_layers": 1,
                                    "expand": 2, "vocab_size": 50})
    assert cfg.intermediate_size == 48 and cfg.time_step_rank == 2 and not cfg.bcdt_rms


def test_hf_json_roundtrip(tmp_path):
    for name, cfg in fm.PRESETS.items():
        cfg.write_json(tmp_path / f"{name}.json")
        assert ModelConfig.from_json_file(tmp_path / f"{name}.json") == cfg


def test_bad_fields():
    with pytest.raises(fm.UserError, match="missing field 'hidden_size'"):
        ModelConfig.from_hf_dict({"model_type": "mamba", "num_hidden_layers": 1, "vocab_size": 5})
    with pytest.raises(fm.UserError, match="hidden_act"):
        ModelConfig.from_hf_dict({"model_type": "mamba", "hidden_size": 8, "num_hidden_layers": 1,
                                  "vocab_size": 5, "hidden_act": "gelu"})
    with pytest.raises(fm.UserError, match="positive integer"):
        ModelConfig(hidden_size=0, num_hidden_layers=1, intermediate_size=2, vocab_size=3)
    with pytest.raises(fm.UserError, match="unknown preset"):
        fm.get_preset("nope")
    with pytest.raises(fm.UserError, match="unknown config field"):
        fm.get_preset("tiny").replace(hiden_size=3)


def test_config_json_is_an_object(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(fm.UserError, match="JSON object"):
        ModelConfig.from_json_file(tmp_path / "config.json")
