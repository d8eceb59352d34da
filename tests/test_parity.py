"""Parity with transformers' FalconMambaForCausalLM / MambaForCausalLM, both directions.

transformers save_pretrained -> our load_model -> same logits (fp32, relative error <= 1e-4) and the
same greedy 32-token continuation; our save_model -> transformers from_pretrained -> same logits.
"""

import pytest
import torch

import falcon_mamba as fm

transformers = pytest.importorskip("transformers")  # a dev dependency: installed in CI

# (model_type, kwargs): odd sizes, tied and untied, with and without conv bias.
CONFIGS = [
    ("falcon_mamba", dict(vocab_size=301, hidden_size=48, num_hidden_layers=3, intermediate_size=100,
                          state_size=5, conv_kernel=3, time_step_rank=7, tie_word_embeddings=False)),
    ("falcon_mamba", dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                          state_size=16, conv_kernel=4, tie_word_embeddings=True, use_conv_bias=False)),
    ("falcon_mamba", dict(vocab_size=257, hidden_size=40, num_hidden_layers=2, intermediate_size=80,
                          state_size=8, conv_kernel=4, time_step_rank=5, use_bias=True,
                          tie_word_embeddings=False, mixer_rms_eps=1e-5)),
    ("mamba", dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, intermediate_size=72,
                   state_size=6, conv_kernel=4, time_step_rank=3, tie_word_embeddings=True)),
    ("mamba", dict(vocab_size=311, hidden_size=48, num_hidden_layers=3, intermediate_size=96,
                   state_size=16, conv_kernel=2, tie_word_embeddings=False, use_conv_bias=False)),
]
IDS = [f"{mt}-{i}" for i, (mt, _) in enumerate(CONFIGS)]


def _hf_model(model_type, kwargs, seed):
    torch.manual_seed(seed)
    if model_type == "falcon_mamba":
        cfg = transformers.FalconMambaConfig(**kwargs)
        model = transformers.FalconMambaForCausalLM(cfg)
    else:
        cfg = transformers.MambaConfig(**kwargs)
        model = transformers.MambaForCausalLM(cfg)
    # Perturb the small parameters so the test does not rest on their default init values.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", "mixer.D", "conv1d.bias", "in_proj.bias",
                              "out_proj.bias")):
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _greedy(model, ids, n):
    logits, state = model(ids, last_only=True)
    out = []
    tok = logits[:, -1].argmax(-1)
    for _ in range(n):
        out.append(tok)
        tok = model.step(tok, state).argmax(-1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("model_type,kwargs", CONFIGS, ids=IDS)
def test_transformers_to_ours(tmp_path, model_type, kwargs):
    hf = _hf_model(model_type, kwargs, seed=len(IDS) + kwargs["vocab_size"])
    hf.save_pretrained(tmp_path)
    ours = fm.load_model(tmp_path, dtype=torch.float32)
    assert ours.config.model_type == model_type
    assert ours.config.tie_word_embeddings == kwargs["tie_word_embeddings"]
    ids = torch.randint(0, kwargs["vocab_size"], (2, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        got, _ = ours(ids)
    err = _rel_err(got, ref)
    assert err <= 1e-4, f"logits relative error {err:.2e}"

    prompt = ids[:1, :11]
    with torch.no_grad():
        hf_out = hf.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32,
                             pad_token_id=0)[:, prompt.shape[1]:]
    ours_out = _greedy(ours, prompt, 32)
    assert torch.equal(ours_out, hf_out), f"greedy continuations differ:\n{ours_out}\n{hf_out}"


@pytest.mark.parametrize("model_type,kwargs", CONFIGS, ids=IDS)
def test_ours_to_transformers(tmp_path, model_type, kwargs):
    cfg = fm.ModelConfig.from_hf_dict({"model_type": model_type, **kwargs})
    torch.manual_seed(7)
    ours = fm.FalconMamba(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fm.save_model(ours, tmp_path / "m")
    cls = (transformers.FalconMambaForCausalLM if model_type == "falcon_mamba"
           else transformers.MambaForCausalLM)
    hf = cls.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, kwargs["vocab_size"], (3, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got, _ = ours(ids)
    err = _rel_err(got, ref)
    assert err <= 1e-4, f"logits relative error {err:.2e}"


def test_sharded_save_loads_in_transformers(tmp_path):
    cfg = fm.get_preset("tiny")
    torch.manual_seed(3)
    ours = fm.FalconMamba(cfg).eval()
    out = fm.save_model(ours, tmp_path / "m", max_shard_size="60KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    hf = transformers.FalconMambaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 13))
    with torch.no_grad():
        assert _rel_err(ours(ids)[0], hf(ids).logits) <= 1e-4
    again = fm.load_model(out)
    with torch.no_grad():
        assert torch.equal(again(ids)[0], ours(ids)[0])
