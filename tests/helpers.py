"""Shared test helpers."""

import torch


def assert_close(actual, expected, rtol, atol, what=""):
    """allclose with max/mean differences in the failure message."""
    actual = actual.float()
    expected = expected.float()
    diff = (actual - expected).abs()
    ok = torch.allclose(actual, expected, rtol=rtol, atol=atol)
    assert ok, (f"{what} mismatch: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}, "
                f"max |expected| {expected.abs().max().item():.3e}")


def tiny_falcon_lm(seed: int = 0, vocab_size: int = 65024, hidden_size: int = 32,
                   num_hidden_layers: int = 2, intermediate_size: int = 64):
    """A tiny random FalconMamba in eval mode; the default vocab is the real Falcon tokenizer's.
    Embeddings and lm_head are drawn wider than the usual init so that the next-token distribution
    is peaked and depends on the context (with std 0.02 it is nearly uniform, and sampled tokens
    would depend on the seed only)."""
    from falcon_mamba.config import ModelConfig
    from falcon_mamba.model import FalconMamba

    cfg = ModelConfig(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                      intermediate_size=intermediate_size, vocab_size=vocab_size)
    model = FalconMamba(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    model.init_weights(g)
    with torch.no_grad():
        model.backbone.embeddings.weight.normal_(0, 1.0, generator=g)
        model.lm_head.weight.normal_(0, 0.5, generator=g)
    return model
