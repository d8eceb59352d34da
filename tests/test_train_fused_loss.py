"""Training with the fused lm_head + cross-entropy (the default) follows the plain objective's loss
curve: fp32 to rounding, bf16 autocast within its noise; on packed text and on assistant-masked
chat data (SFT). And the MFU line says which peak it divides by."""

import json

import pytest
import torch

import falcon_mamba as fm
from falcon_mamba.data.prepare import prepare
from falcon_mamba.train import train
from falcon_mamba.train.metrics import read_metrics
from tests.test_data import make_text
from tests.test_train import tiny_cfg


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from tests.test_data import make_data

    return make_data(tmp_path_factory.mktemp("d"), lines=150)


def curves(cfg, data, tmp_path):
    """-> (plain, fused) lists of (train loss per step, final val loss)."""
    out = []
    for fused in (False, True):
        run = tmp_path / f"fused{int(fused)}"
        res = train(cfg.replace(fused_loss=fused), data, run, progress=False, export=False,
                    log=lambda *a: None)
        out.append(([r["loss"] for r in read_metrics(run) if "loss" in r], res.val_loss))
    return out


@pytest.mark.parametrize("precision,rel", [("fp32", 2e-5), ("bf16", 5e-3)])
def test_loss_curve_equals_the_plain_objectives(data_dir, tmp_path, precision, rel):
    cfg = tiny_cfg(steps=12, lr=1e-2, warmup_steps=2, precision=precision, loss_chunk=13)
    (plain, val_plain), (fused, val_fused) = curves(cfg, data_dir, tmp_path)
    assert len(plain) == len(fused) == 12 and plain[-1] < plain[0] - 0.3  # it learns
    for step, (a, b) in enumerate(zip(plain, fused)):
        assert b == pytest.approx(a, rel=rel), (precision, step, plain, fused)
    assert val_fused == pytest.approx(val_plain, rel=rel)


def test_sft_mask_loss_curve_equals_the_plain_objectives(tmp_path):
    """Chat data: only assistant tokens are targets (the fused loss drops the others first)."""
    from tests.test_data import make_data

    text_data = make_data(tmp_path, lines=40)
    lines = make_text(5, 120).splitlines()
    chats = [{"messages": [{"role": "user", "content": lines[i]},
                           {"role": "assistant", "content": lines[i + 1]}]} for i in range(0, 120, 2)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    data = prepare([str(tmp_path / "chat.jsonl")], tmp_path / "chat", str(text_data / "tokenizer.json"),
                   chat=True, val_fraction=0.1, log=lambda *a: None)
    cfg = tiny_cfg(steps=6, lr=1e-2, warmup_steps=1, seq_len=40, loss_chunk=7)
    (plain, val_plain), (fused, val_fused) = curves(cfg, data, tmp_path)
    for step, (a, b) in enumerate(zip(plain, fused)):
        assert b == pytest.approx(a, rel=2e-5), (step, plain, fused)
    assert val_fused == pytest.approx(val_plain, rel=2e-5)


def test_tied_embeddings_train_the_same(data_dir, tmp_path):
    cfg = tiny_cfg(steps=4, lr=1e-2, warmup_steps=1)
    cfg = cfg.replace(model=cfg.model.replace(tie_word_embeddings=True))
    (plain, _), (fused, _) = curves(cfg, data_dir, tmp_path)
    assert fused == pytest.approx(plain, rel=2e-5)


def test_mfu_line_names_its_peak(data_dir, tmp_path):
    from falcon_mamba.train.flops import mamba_flops_per_token

    lines: list[str] = []
    res = train(tiny_cfg(steps=2, log_every=1, peak_tflops=0.5), data_dir, tmp_path / "a", progress=False,
                export=False, log=lines.append)
    assert "MFU against peak_tflops=0.5 (given)" in lines
    rows = [r for r in read_metrics(tmp_path / "a") if "tok_s" in r]
    fpt = mamba_flops_per_token(res.config.model)
    assert rows and all(r["mfu"] == pytest.approx(r["tok_s"] * fpt / 0.5e12, rel=1e-6) for r in rows)
    lines.clear()
    train(tiny_cfg(steps=1), data_dir, tmp_path / "b", progress=False, export=False, log=lines.append)
    assert any(line.startswith("MFU against none on the CPU") for line in lines)
    assert all(r["mfu"] is None for r in read_metrics(tmp_path / "b") if "tok_s" in r)


def test_fused_adamw_gives_the_same_update(rng):
    """The fused AdamW (the default on a GPU) and the default one take the same steps."""
    from falcon_mamba.train.optim import build_optimizer

    cfg = tiny_cfg()
    models = [fm.FalconMamba(cfg.model.replace(vocab_size=64)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    start = models[0].lm_head.weight.detach().clone()
    opts = [build_optimizer(models[0], cfg), build_optimizer(models[1], cfg, fused=True)]
    assert not opts[0].defaults["fused"] and opts[1].defaults["fused"]
    ids = torch.randint(0, 64, (2, 9), generator=rng)
    for _ in range(3):
        for m, o in zip(models, opts):
            m(ids)[0].logsumexp(-1).mean().backward()
            o.step()
            o.zero_grad()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    assert not torch.equal(models[0].lm_head.weight, start)  # the steps did move the weights
