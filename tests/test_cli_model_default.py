"""One convention for --model: every command that takes it defaults to the embedded model."""

import json

import pytest
import torch

import falcon_mamba as fm
from falcon_mamba import default_model
from falcon_mamba.cli import build_parser, main

COMMANDS = [["quantize"], ["convert"], ["finetune"], ["info"], ["eval", "perplexity"], ["eval", "passkey"],
            ["generate"], ["chat"], ["serve"]]


def _subparser(parser, path):
    for name in path:
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = sub.choices[name]
    return parser


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_model_is_optional_and_documented(path):
    opt = next(a for a in _subparser(build_parser(), path)._actions if "--model" in a.option_strings)
    assert not opt.required and opt.default is None
    assert "embedded in the package" in opt.help


def test_info_shows_the_embedded_model(capsys):
    assert main(["info", "--device", "cpu", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == str(default_model.path())
    assert info["parameters"] == 7_698_688


def test_quantize_takes_the_embedded_model(tmp_path, capsys):
    assert main(["quantize", "--bits", "8", "--out", str(tmp_path / "q8")]) == 0
    assert "int8" in capsys.readouterr().out
    q = fm.load_model(tmp_path / "q8")
    assert q.config == fm.load_model(default_model.path()).config
    assert q.quantization["bits"] == 8


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a 2-core CI machine
    yield
    torch.set_num_threads(n)


def test_finetune_takes_the_embedded_model(tmp_path, one_thread):
    """An adapter-only LoRA run on the embedded model; the adapter names it as its base and loads
    back onto it."""
    from falcon_mamba.data import prepare
    from tests.test_data import make_text

    lines = make_text(9, 40).splitlines()
    chats = [{"messages": [{"role": "user", "content": lines[i]},
                           {"role": "assistant", "content": lines[i + 1]}]} for i in range(0, 40, 2)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    data = prepare([str(tmp_path / "chat.jsonl")], tmp_path / "chat", str(default_model.path()), chat=True,
                   val_fraction=0.1, log=lambda *a: None)
    assert main(["finetune", "--data", str(data), "--out", str(tmp_path / "ft"), "--lora-rank", "2",
                 "--adapter-only", "--steps", "1", "--no-progress", "--set", "seq_len=32",
                 "--set", "global_batch=2", "--set", "micro_batch=2", "--set", "warmup_steps=0"]) == 0
    config = json.loads((tmp_path / "ft" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(default_model.path())
    fm.load_model(default_model.path(), adapter=tmp_path / "ft" / "adapter")
