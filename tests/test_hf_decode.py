"""falcon_mamba.hf.decode: a transformers mixer's decode step on our fused kernels, on transformers'
own cache tensors, against transformers' own forward (accelerate() sends CUDA decode steps there).

On the CPU the kernels run in Triton's interpreter (``_kernel_device`` widened for the test); the
cuda-marked test runs accelerated ``generate`` on the GPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
transformers = pytest.importorskip("transformers")

import falcon_mamba.hf as fh  # noqa: E402
from falcon_mamba.hf import decode  # noqa: E402
from tests.helpers import assert_close  # noqa: E402
from tests.test_hf_accelerate import CONFIGS, IDS, hf_model  # noqa: E402


def _caches(model, ids):
    """Two independent caches after reading ids: transformers' cache object, deep-copied."""
    import copy

    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache_params", None)
    return cache, copy.deepcopy(cache)


def _layer_states(cache, i):
    found = decode._cache_tensors(type("M", (), {"layer_idx": i})(), cache)
    assert found is not None, "the cache holds a previous state after a prefill"
    return found


@pytest.mark.parametrize("model_type,kwargs", CONFIGS, ids=IDS)
def test_mixer_decode_equals_transformers_step(model_type, kwargs, monkeypatch):
    """Three decode steps of every mixer: the same output and the same conv / recurrent state as
    transformers' forward of the same step on a copy of the cache."""
    monkeypatch.setattr(decode, "_kernel_device", lambda t: True)
    model = hf_model(model_type, kwargs, seed=3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, kwargs["vocab_size"], (2, 7), generator=g)
    theirs, ours = _caches(model, ids)
    mixers = [b.mixer for b in model.backbone.layers]
    with torch.no_grad():
        for step in range(3):
            for i, m in enumerate(mixers):
                h = torch.randn(2, 1, kwargs["hidden_size"], generator=g)
                want = m(h, theirs)  # the cache comes second in 5.17 (cache_params) and 5.24 (cache)
                found = decode.decode_states(m, h, (ours,), {})
                assert found is not None, "a decode step on a prefilled cache is taken by our kernels"
                got = decode.mixer_decode(m, h, *found[:2])
                decode.count_token(found[3], i)  # as accelerate's mixer forward does after the step
                assert_close(got, want, 1e-4, 1e-5, f"output, layer {i}, step {step}")
                for a, b, what in zip(_layer_states(ours, i), _layer_states(theirs, i), ("conv", "ssm")):
                    assert_close(a, b, 1e-4, 1e-5, f"{what} state, layer {i}, step {step}")
    if hasattr(theirs, "increase_count"):  # 5.25 counts each decoded token (5.24 cannot say how many)
        assert int(ours.get_seq_length()) == int(theirs.get_seq_length())


def test_not_a_decode_step_is_left_to_transformers(monkeypatch):
    monkeypatch.setattr(decode, "_kernel_device", lambda t: True)
    model_type, kwargs = CONFIGS[0]
    model = hf_model(model_type, kwargs, seed=3)
    m = model.backbone.layers[0].mixer
    ids = torch.randint(0, kwargs["vocab_size"], (1, 5), generator=torch.Generator().manual_seed(2))
    cache, _ = _caches(model, ids)
    h1 = torch.randn(1, 1, kwargs["hidden_size"])
    with torch.no_grad():
        prefill = torch.randn(1, 4, kwargs["hidden_size"])
        assert decode.decode_states(m, prefill, (cache,), {}) is None  # a prefill: transformers' forward
        assert decode.decode_states(m, h1, (None,), {}) is None  # no cache
        assert decode.decode_states(m, h1, (cache,), {}) is not None
    assert decode.decode_states(m, h1, (cache,), {}) is None  # gradients on: training's business
    monkeypatch.setattr(decode, "_kernel_device", lambda t: t.device.type == "cuda")
    with torch.no_grad():
        assert decode.decode_states(m, h1, (cache,), {}) is None  # the CPU: transformers' forward


@pytest.mark.cuda
@pytest.mark.parametrize("model_type,kwargs", CONFIGS, ids=IDS)
def test_accelerated_generate_decodes_on_our_kernels_cuda(model_type, kwargs, monkeypatch):
    """Greedy generate on the GPU, accelerated vs transformers' path: the same tokens and logits,
    and every decode step of every mixer through mixer_decode."""
    calls = {"n": 0}
    real = decode.mixer_decode

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(decode, "mixer_decode", counting)
    ref = hf_model(model_type, kwargs, seed=7).cuda()
    acc = fh.accelerate(hf_model(model_type, kwargs, seed=7).cuda())
    prompt = torch.randint(0, kwargs["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(4)).cuda()
    out = [m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, min_new_tokens=12,
                      do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
           for m in (ref, acc)]
    assert out[0].sequences.tolist() == out[1].sequences.tolist()
    for want, got in zip(out[0].logits, out[1].logits):
        assert_close(got, want, 1e-3, 1e-3, "logits")
    assert calls["n"] >= 11 * kwargs["num_hidden_layers"]
