"""falcon_mamba.hf.accelerate: a transformers FalconMamba / Mamba model on our ops computes what
transformers' own path computes: logits, parameter gradients, and greedy ``generate`` with its cache.

Each test checks that our ops really ran (a counting spy on falcon_mamba.ops), so an accelerate()
that silently left the model on transformers' path fails. fp32 tolerances as ENGINEERING.md:
logits relative error <= 1e-4 (the parity tests' bound), gradients rtol 6e-4 / atol 2e-3.
"""

import copy

import pytest
import torch

import falcon_mamba.hf as fh
from falcon_mamba import ops
from falcon_mamba.errors import UserError
from tests.helpers import assert_close

transformers = pytest.importorskip("transformers")  # a dev dependency: installed in CI

# (model_type, kwargs): odd sizes, with and without conv bias, tied and untied, in/out bias.
CONFIGS = [
    ("falcon_mamba", dict(vocab_size=301, hidden_size=48, num_hidden_layers=3, intermediate_size=100,
                          state_size=5, conv_kernel=3, time_step_rank=7, tie_word_embeddings=False)),
    ("falcon_mamba", dict(vocab_size=257, hidden_size=40, num_hidden_layers=2, intermediate_size=80,
                          state_size=8, conv_kernel=4, time_step_rank=5, use_conv_bias=False,
                          use_bias=True, tie_word_embeddings=True)),
    ("mamba", dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, intermediate_size=72,
                   state_size=6, conv_kernel=4, time_step_rank=3, tie_word_embeddings=True)),
    ("mamba", dict(vocab_size=311, hidden_size=44, num_hidden_layers=3, intermediate_size=92,
                   state_size=16, conv_kernel=2, use_conv_bias=False, tie_word_embeddings=False)),
]
IDS = [f"{mt}-{i}" for i, (mt, _) in enumerate(CONFIGS)]


def hf_model(model_type, kwargs, seed):
    """A random transformers model with perturbed small parameters (norm weights, D, biases), so
    nothing rests on their default init values."""
    torch.manual_seed(seed)
    cls, cfg_cls = ((transformers.FalconMambaForCausalLM, transformers.FalconMambaConfig)
                    if model_type == "falcon_mamba" else
                    (transformers.MambaForCausalLM, transformers.MambaConfig))
    model = cls(cfg_cls(**kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", "mixer.D", "conv1d.bias", "in_proj.bias",
                              "out_proj.bias")):
                p.add_(0.2 * torch.randn_like(p))
        # Wider embeddings make the next-token distribution depend on the context (greedy tests).
        model.get_input_embeddings().weight.normal_(0, 1.0)
    return model.eval()


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the public ops the accelerated mixers use."""
    calls = {}
    for name in ("causal_conv1d", "selective_scan", "ssm_step", "rms_norm"):
        real = getattr(ops, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*a, **k)

        monkeypatch.setattr(ops, name, counted)
    return calls


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _pair(model_type, kwargs, seed):
    ref = hf_model(model_type, kwargs, seed)
    return ref, fh.accelerate(copy.deepcopy(ref))


@pytest.mark.parametrize("model_type,kwargs", CONFIGS, ids=IDS)
def test_logits_and_gradients(model_type, kwargs, spy):
    ref, acc = _pair(model_type, kwargs, seed=kwargs["vocab_size"])
    assert fh.is_accelerated(acc) and not fh.is_accelerated(ref)
    ids = torch.randint(0, kwargs["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        n_before = dict(spy)
        got = acc(ids).logits
    assert spy["selective_scan"] - n_before.get("selective_scan", 0) == kwargs["num_hidden_layers"]
    err = _rel_err(got, want)
    assert err <= 1e-4, f"logits relative error {err:.2e}"

    # Training mode, no cache: transformers tries mamba_inner_fn first, then the unfused path.
    for m in (ref, acc):
        m.train()
        m(ids, labels=ids).loss.backward()
    grads_ref = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in acc.named_parameters():
        assert p.grad is not None, name
        assert_close(p.grad, grads_ref[name], 6e-4, 2e-3, what=f"grad of {name}")


@pytest.mark.parametrize("model_type,kwargs", [CONFIGS[0], CONFIGS[3]], ids=[IDS[0], IDS[3]])
def test_bf16(model_type, kwargs, spy):
    """In bf16 the two paths round differently (ours adds the dt bias and applies softplus in fp32,
    as the CUDA kernels do): close to transformers' bf16 logits, and no farther from the fp32
    model's than transformers' own bf16 path is."""
    ref = hf_model(model_type, kwargs, seed=7)
    ids = torch.randint(0, kwargs["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = ref(ids).logits
        theirs = copy.deepcopy(ref).to(torch.bfloat16)
        ours = fh.accelerate(copy.deepcopy(theirs))
        want, got = theirs(ids).logits, ours(ids).logits
    assert spy["selective_scan"] == kwargs["num_hidden_layers"]
    assert _rel_err(got, want) <= 1e-2
    assert _rel_err(got, exact) <= 1.1 * _rel_err(want, exact)


@pytest.mark.parametrize("model_type,kwargs", [CONFIGS[0], CONFIGS[2]], ids=[IDS[0], IDS[2]])
def test_gradient_checkpointing(model_type, kwargs, spy):
    """Recomputation in the backward pass runs the mixer again: still on our ops, same gradients."""
    ref, acc = _pair(model_type, kwargs, seed=3)
    ids = torch.randint(0, kwargs["vocab_size"], (2, 21), generator=torch.Generator().manual_seed(2))
    for m in (ref, acc):
        # activation_checkpointing_enable: the newer name; gradient_checkpointing_enable before
        (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)()
        m.train()
        m(ids, labels=ids).loss.backward()
    assert spy["selective_scan"] >= 2 * kwargs["num_hidden_layers"]  # forward + recomputation
    grads_ref = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in acc.named_parameters():
        assert_close(p.grad, grads_ref[name], 6e-4, 2e-3, what=f"grad of {name}")


@pytest.mark.parametrize("model_type,kwargs", CONFIGS, ids=IDS)
def test_generate_same_tokens(model_type, kwargs, spy):
    """Greedy generate with transformers' cache: a prefill through the scan, then single-token
    steps through the step ops; the same tokens and the same logits at every step. Prompts of one
    token (shorter than the conv) and of 13."""
    ref, acc = _pair(model_type, kwargs, seed=kwargs["vocab_size"] + 1)
    g = torch.Generator().manual_seed(5)
    for length in (1, 13):
        prompt = torch.randint(0, kwargs["vocab_size"], (2, length), generator=g)
        out = [m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                          min_new_tokens=16, do_sample=False, pad_token_id=0, output_logits=True,
                          return_dict_in_generate=True) for m in (ref, acc)]
        assert out[0].sequences.tolist() == out[1].sequences.tolist(), f"prompt length {length}"
        for step, (want, got) in enumerate(zip(out[0].logits, out[1].logits)):
            assert _rel_err(got, want) <= 1e-4, f"prompt length {length}, step {step}"
    assert spy["ssm_step"] >= 2 * 15 * kwargs["num_hidden_layers"]


def test_generate_left_padded_batch(spy):
    """Rows of different lengths, left-padded with an attention mask, as a batch."""
    model_type, kwargs = CONFIGS[0]
    ref, acc = _pair(model_type, kwargs, seed=11)
    g = torch.Generator().manual_seed(6)
    prompt = torch.randint(1, kwargs["vocab_size"], (3, 9), generator=g)
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    mask[2, :7] = 0
    prompt = prompt * mask
    out = [m.generate(prompt, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
           for m in (ref, acc)]
    assert out[0].tolist() == out[1].tolist()
    assert spy["ssm_step"] > 0


def test_other_models_unchanged(spy):
    """Accelerating one model leaves another (same class, same process) on transformers' path,
    computing exactly what it computed before."""
    model_type, kwargs = CONFIGS[0]
    other = hf_model(model_type, kwargs, seed=2)
    ids = torch.randint(0, kwargs["vocab_size"], (1, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = other(ids).logits
    fh.accelerate(hf_model(model_type, kwargs, seed=4))
    spy.clear()
    with torch.no_grad():
        after = other(ids).logits
    assert spy == {}
    assert torch.equal(before, after)


def test_accelerate_is_idempotent_and_keeps_state_dict(spy):
    model_type, kwargs = CONFIGS[2]
    ref, acc = _pair(model_type, kwargs, seed=5)
    fh.accelerate(acc)  # twice: the mixer must not count as active twice, nor hooks stack up
    mixer = acc.backbone.layers[0].mixer
    assert len(mixer._forward_pre_hooks) == 1 and len(mixer._forward_hooks) == 1
    assert acc.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(acc.state_dict()[k], v) for k, v in ref.state_dict().items())
    ids = torch.randint(0, kwargs["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert _rel_err(acc(ids).logits, ref(ids).logits) <= 1e-4


def test_refuses_other_models():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2,
                                                                vocab_size=50))
    with pytest.raises(UserError, match="has no FalconMamba/Mamba mixer"):
        fh.accelerate(gpt2)


def test_refuses_transformers_without_the_hooks(monkeypatch):
    """An older transformers (4.x: no kernel hook names in the modeling module) is a UserError."""
    from transformers.models.mamba import modeling_mamba

    monkeypatch.delattr(modeling_mamba, "mamba_selective_state_update")
    with pytest.raises(UserError, match="has no kernel hook mamba_selective_state_update"):
        fh.accelerate(hf_model(*CONFIGS[2], seed=0))


def test_hook_arguments_outside_our_ops_are_refused():
    """transformers never passes these; if a future version does, a clear error, not a silent
    different result."""
    from falcon_mamba.hf import kernels

    u = torch.randn(1, 4, 3)
    with pytest.raises(UserError, match="delta_softplus=False"):
        kernels.selective_scan_fn(u, u, -torch.rand(4, 2), torch.randn(1, 2, 3), torch.randn(1, 2, 3))
    with pytest.raises(UserError, match="seq_idx"):
        kernels.causal_conv1d_fn(u, torch.randn(4, 3), seq_idx=torch.zeros(1, 3, dtype=torch.int32))
    with pytest.raises(UserError, match="activation 'gelu'"):
        kernels.causal_conv1d_fn(u, torch.randn(4, 3), activation="gelu")
