"""PEFT LoRA adapter folders: fm.load_model(base, adapter=DIR) merges one; `finetune --adapter-only`
writes one that peft.PeftModel.from_pretrained loads onto transformers' model with the same logits;
adapters for another base, and LoRA targets PEFT cannot reproduce on Mamba, are clear errors.
A fine-tuned export keeps the base's dtype."""

import copy
import json

import pytest
import torch

import falcon_mamba as fm
from falcon_mamba.checkpoint import stored_dtype
from falcon_mamba.cli import main
from falcon_mamba.errors import UserError

transformers = pytest.importorskip("transformers")  # dev dependencies: installed in CI
peft = pytest.importorskip("peft")

CFG = dict(vocab_size=301, hidden_size=48, num_hidden_layers=2, intermediate_size=100, state_size=5,
           conv_kernel=4, time_step_rank=7, tie_word_embeddings=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a 2-core CI machine
    yield
    torch.set_num_threads(n)


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _base(folder, seed=0, **over):
    """A random transformers FalconMamba saved at folder, loaded back from it (so its name_or_path,
    which PEFT records as base_model_name_or_path, is the folder)."""
    torch.manual_seed(seed)
    cfg = transformers.FalconMambaConfig(**(CFG | over))
    transformers.FalconMambaForCausalLM(cfg).save_pretrained(folder)
    return transformers.FalconMambaForCausalLM.from_pretrained(folder).eval()


def _adapter(base, folder, targets, **lora):
    """A PEFT LoRA adapter with random (non-zero) A and B, saved at folder."""
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False, **lora)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    pm.save_pretrained(folder)
    return pm


IDS = torch.randint(0, CFG["vocab_size"], (2, 23), generator=torch.Generator().manual_seed(0))


def test_merged_adapter_matches_peft_on_transformers(tmp_path):
    base = _base(tmp_path / "base")
    pm = _adapter(base, tmp_path / "ad", ["in_proj", "x_proj", "lm_head"])
    ours = fm.load_model(tmp_path / "base", adapter=tmp_path / "ad")
    with torch.no_grad():
        want = pm(IDS).logits
        got = ours(IDS)[0]
        plain = base(IDS).logits
    assert _rel_err(want, plain) > 1e-2  # the adapter does change the model
    assert _rel_err(got, want) <= 1e-4


def test_dt_proj_rslora_and_alpha_pattern_merge_as_merge_and_unload(tmp_path):
    """transformers' mixer multiplies by dt_proj.weight directly, so PEFT's own forward ignores an
    adapter there (checked: the claim in falcon_mamba.hf.adapter's docstring); merging applies it,
    as merge_and_unload does."""
    base = _base(tmp_path / "base", seed=2)
    pm = _adapter(base, tmp_path / "ad", ["dt_proj", "in_proj"], use_rslora=True,
                  alpha_pattern={"in_proj": 3.0})
    with torch.no_grad():
        only_dt = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=2, target_modules=["dt_proj"], init_lora_weights=False)).eval()
        assert torch.equal(only_dt(IDS).logits, base(IDS).logits)
        want = pm.merge_and_unload()(IDS).logits
        got = fm.load_model(tmp_path / "base", adapter=tmp_path / "ad")(IDS)[0]
    assert _rel_err(got, want) <= 1e-4


def test_adapter_for_another_base_is_refused(tmp_path):
    base = _base(tmp_path / "base")
    wider = _base(tmp_path / "wider", hidden_size=56)
    deeper = _base(tmp_path / "deeper", num_hidden_layers=3)
    _adapter(wider, tmp_path / "ad-wider", ["in_proj"])
    _adapter(deeper, tmp_path / "ad-deeper", ["x_proj"])
    _adapter(base, tmp_path / "ad-base", ["in_proj"])
    with pytest.raises(UserError, match="do not fit its weight"):
        fm.load_model(tmp_path / "base", adapter=tmp_path / "ad-wider", check_adapter_base=False)
    with pytest.raises(UserError, match="layers.2.mixer.x_proj, which does not exist"):
        fm.load_model(tmp_path / "base", adapter=tmp_path / "ad-deeper", check_adapter_base=False)
    # Same shapes, another name: refused unless the user says it is the same model.
    (tmp_path / "base").rename(tmp_path / "renamed")
    with pytest.raises(UserError, match="was made for .*base"):
        fm.load_model(tmp_path / "renamed", adapter=tmp_path / "ad-base")
    fm.load_model(tmp_path / "renamed", adapter=tmp_path / "ad-base", check_adapter_base=False)


def test_unsupported_adapters_are_clear_errors(tmp_path):
    base = _base(tmp_path / "base")
    with pytest.raises(UserError, match="no such adapter folder"):
        fm.load_model(tmp_path / "base", adapter=tmp_path / "nowhere")
    _adapter(base, tmp_path / "dora", ["in_proj"], use_dora=True)
    with pytest.raises(UserError, match="DoRA"):
        fm.load_model(tmp_path / "base", adapter=tmp_path / "dora")
    _adapter(base, tmp_path / "bias", ["in_proj"], bias="all")
    with pytest.raises(UserError, match="bias='all'"):
        fm.load_model(tmp_path / "base", adapter=tmp_path / "bias")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2,
                                                                      "lora_alpha": 4}))
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match="pickle"):
        fm.load_model(tmp_path / "base", adapter=tmp_path / "bin")


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A base model folder (our save_model, with its BPE tokenizer) and chat data for it."""
    from falcon_mamba.data import prepare
    from tests.test_data import make_data, make_text

    root = tmp_path_factory.mktemp("sft")
    text = make_data(root, lines=60)
    tok = fm.load_tokenizer(text / "tokenizer.json")
    cfg = fm.ModelConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, vocab_size=304,
                         state_size=4, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    fm.save_model(fm.FalconMamba(cfg), root / "base", tokenizer_dir=text)
    fm.save_model(fm.FalconMamba(cfg).to_dtype(torch.bfloat16), root / "base-bf16", tokenizer_dir=text)
    lines = make_text(5, 80).splitlines()
    chats = [{"messages": [{"role": "user", "content": lines[i]},
                           {"role": "assistant", "content": lines[i + 1]}]} for i in range(0, 80, 2)]
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    data = prepare([str(root / "chat.jsonl")], root / "chat", str(root / "base"), chat=True,
                   val_fraction=0.1, log=lambda *a: None)
    return root, data


def _finetune(base, data, out, *extra):
    return main(["finetune", "--model", str(base), "--data", str(data), "--out", str(out), "--steps", "3",
                 "--no-progress", "--set", "seq_len=48", "--set", "global_batch=4", "--set", "micro_batch=2",
                 "--set", "warmup_steps=1", "--set", "lr=1e-2", *extra])


def test_finetune_adapter_only_loads_in_peft_with_the_same_logits(sft, tmp_path):
    root, data = sft
    assert _finetune(root / "base", data, tmp_path / "ft", "--lora-rank", "4", "--adapter-only") == 0
    adapter = tmp_path / "ft" / "adapter"
    assert not (tmp_path / "ft" / "model").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["in_proj", "x_proj"]
    assert config["base_model_name_or_path"] == str(root / "base")
    ids = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(3))
    hf = transformers.FalconMambaForCausalLM.from_pretrained(root / "base").eval()
    with torch.no_grad():
        plain = hf(ids).logits
        theirs = peft.PeftModel.from_pretrained(hf, adapter).eval()(ids).logits
        ours = fm.load_model(root / "base", adapter=adapter)(ids)[0]
    assert _rel_err(theirs, plain) > 1e-4  # three steps of training moved the adapter off zero
    assert _rel_err(ours, theirs) <= 1e-4


def test_adapter_only_refuses_what_peft_cannot_reproduce(sft, tmp_path, capsys):
    root, data = sft
    lora = ["--lora-rank", "4", "--set"]
    for out, extra, message in [
            ("a", lora + ["lora_targets=in_proj,out_proj"], "PEFT refuses LoRA on out_proj"),
            ("b", lora + ["lora_targets=dt_proj"], "dt_proj would be silently ignored"),
            ("c", [], "needs LoRA")]:
        assert _finetune(root / "base", data, tmp_path / out, "--adapter-only", *extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err  # one line, no traceback
        assert not (tmp_path / out / "checkpoint.pt").exists()  # refused before any training


def test_finetuned_export_keeps_the_base_dtype(sft, tmp_path):
    root, data = sft
    assert stored_dtype(root / "base-bf16") == torch.bfloat16
    assert _finetune(root / "base-bf16", data, tmp_path / "lora", "--lora-rank", "4") == 0
    assert stored_dtype(tmp_path / "lora" / "model") == torch.bfloat16
    assert _finetune(root / "base", data, tmp_path / "full") == 0
    assert stored_dtype(tmp_path / "full" / "model") == torch.float32
