"""LoRA adapters (train only A, B; merge into the weights) and supervised fine-tuning on chat data."""

import json

import pytest
import torch

import falcon_mamba as fm
from falcon_mamba.data import ShardSet, prepare
from falcon_mamba.lora import apply_lora, has_lora, merge_lora
from falcon_mamba.sft import encode_chat
from falcon_mamba.tokenizer import load_tokenizer
from tests.helpers import assert_close
from tests.test_data import make_text

TARGETS = ("in_proj", "x_proj", "dt_proj", "out_proj")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The CI machine has 2 cores; tiny models run fastest without intra-op threads.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train_a_little(model, rng, steps=4):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, model.config.vocab_size, (2, 12), generator=rng)
    for _ in range(steps):
        logits, _ = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_lora_starts_as_the_base_model_and_trains_only_adapters(rng):
    model = fm.FalconMamba(fm.get_preset("tiny-odd"))
    x = torch.randint(0, 301, (2, 9), generator=rng)
    before = model(x)[0]
    base = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = apply_lora(model, rank=4, alpha=8, targets=",".join(TARGETS))
    assert len(adapted) == 4 * model.config.num_hidden_layers
    assert torch.equal(model(x)[0], before)  # B = 0: the adapter starts as a no-op
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    _train_a_little(model, rng)
    assert (model(x)[0] - before).abs().max() > 1e-3
    merge_lora(model)
    assert not has_lora(model)
    after = model.state_dict()
    assert set(after) == set(base)
    for k in base:
        changed = not torch.equal(after[k], base[k])
        assert changed == any(f".{t}.weight" in k for t in TARGETS), k


def test_merged_model_equals_the_adapted_one_and_saves_as_plain_weights(rng, tmp_path):
    model = fm.FalconMamba(fm.get_preset("tiny"))
    apply_lora(model, rank=3, alpha=6)
    _train_a_little(model, rng)
    x = torch.randint(0, 512, (2, 10), generator=rng)
    with torch.no_grad():
        adapted = model(x)[0]
        merge_lora(model)
        merged = model(x)[0]
    assert_close(merged, adapted, 6e-4, 2e-3, "merged vs adapted")
    fm.save_model(model, tmp_path / "m")
    loaded = fm.load_model(tmp_path / "m")
    assert torch.equal(loaded(x)[0], merged)


def test_chat_loss_mask_covers_only_assistant_tokens(tmp_path):
    from tests.test_data import make_data

    data = make_data(tmp_path, lines=60)
    tok = load_tokenizer(data / "tokenizer.json")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The cat runs?"},
            {"role": "assistant", "content": "The dog sings."}, {"role": "user", "content": "And then?"},
            {"role": "assistant", "content": "A red fish jumps."}]
    ids, mask = encode_chat(tok, msgs)
    assert len(ids) == len(mask)
    taught = tok.decode([i for i, m in zip(ids, mask) if m])
    context = tok.decode([i for i, m in zip(ids, mask) if not m])
    eos = tok.id_to_token(tok.eos_token_id)
    assert taught == f" The dog sings.\n\n{eos} A red fish jumps.\n\n{eos}"
    assert "The cat runs?" in context and "Assistant:" in context and "dog" not in context
    # the whole sequence is the rendered conversation (plus the eos ending each turn)
    assert tok.decode(ids).replace(eos, "") == tok.apply_chat_template(msgs, add_generation_prompt=False)
    with pytest.raises(fm.UserError, match="no assistant message"):
        encode_chat(tok, msgs[:2])


def test_finetune_with_lora_end_to_end(tmp_path, rng):
    from falcon_mamba.cli import main
    from tests.test_data import make_data

    text_data = make_data(tmp_path, lines=60)
    tok = load_tokenizer(text_data / "tokenizer.json")
    cfg = fm.ModelConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, vocab_size=304,
                         state_size=4, eos_token_id=tok.eos_token_id)
    fm.save_model(fm.FalconMamba(cfg), tmp_path / "base", tokenizer_dir=text_data)
    lines = make_text(5, 80).splitlines()
    chats = [{"messages": [{"role": "user", "content": lines[i]},
                           {"role": "assistant", "content": lines[i + 1]}]} for i in range(0, 80, 2)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    data = prepare([str(tmp_path / "chat.jsonl")], tmp_path / "chat", str(tmp_path / "base"), chat=True,
                   val_fraction=0.1, log=lambda *a: None)
    src = ShardSet(data).source("train", "chat")
    assert src.mask is not None and 0 < src.mask.mean() < 0.8
    rc = main(["finetune", "--model", str(tmp_path / "base"), "--data", str(data), "--out",
               str(tmp_path / "ft"), "--lora-rank", "4", "--steps", "3", "--no-progress",
               "--set", "seq_len=48", "--set", "global_batch=4", "--set", "micro_batch=2",
               "--set", "warmup_steps=1"])
    assert rc == 0
    base = fm.load_model(tmp_path / "base").state_dict()
    tuned = fm.load_model(tmp_path / "ft" / "model").state_dict()
    assert set(base) == set(tuned)
    for k in base:
        changed = not torch.equal(base[k], tuned[k])
        assert changed == any(f".{t}.weight" in k for t in TARGETS), k
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] > 0 for r in rows if "loss" in r)
    assert (tmp_path / "ft" / "model" / "tokenizer.json").is_file()


def test_full_finetune_from_a_model_folder(tmp_path):
    from falcon_mamba.train import apply_overrides, get_recipe, train
    from tests.test_data import make_data

    data = make_data(tmp_path, lines=60)
    cfg = fm.ModelConfig(hidden_size=32, num_hidden_layers=1, intermediate_size=64, vocab_size=300,
                         state_size=4, eos_token_id=0)
    fm.save_model(fm.FalconMamba(cfg), tmp_path / "base", tokenizer_dir=data)
    rc = apply_overrides(get_recipe("sft"), ["seq_len=32", "global_batch=4", "steps=2", "lr=1e-2",
                                             "warmup_steps=1"]).replace(init_from=str(tmp_path / "base"))
    res = train(rc, data, tmp_path / "ft", progress=False, log=lambda *a: None)
    assert res.config.model == cfg  # the model's own config (vocab 300), not the recipe's
    base = fm.load_model(tmp_path / "base").state_dict()
    tuned = fm.load_model(res.model_dir).state_dict()
    assert all(not torch.equal(base[k], tuned[k]) for k in base if not k.endswith(("A_log", ".D")))
    small = fm.ModelConfig(hidden_size=32, num_hidden_layers=1, intermediate_size=64, vocab_size=256)
    fm.save_model(fm.FalconMamba(small), tmp_path / "small")
    with pytest.raises(fm.UserError, match="vocabulary of 256"):
        train(rc.replace(init_from=str(tmp_path / "small")), data, tmp_path / "x", progress=False)
