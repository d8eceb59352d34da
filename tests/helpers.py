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


def gemv_weight(W_NK, fmt: str):
    """(ops.triton_gemv.GemvWeight, the dense fp32 weight it stands for) of W_NK in fmt: "fp32",
    "bf16", "fp16" (dense), "int8" or "int4gG" (quantized, group G)."""
    from falcon_mamba.ops.triton_gemv import GemvWeight
    from falcon_mamba.quant import formats

    if fmt in ("fp32", "bf16", "fp16"):
        w = W_NK.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[fmt])
        return GemvWeight.dense(w), w.float()
    bits, group = (8, None) if fmt == "int8" else (4, int(fmt.removeprefix("int4g")))
    t = formats.quantize_weight(W_NK, bits, group)
    deq = formats.dequantize(t["qweight"], t["scales"], t.get("zeros"), bits, group, W_NK.shape[1],
                             torch.float32)
    return GemvWeight(w=t["qweight"], bits=bits, scales=t["scales"], zeros=t.get("zeros"),
                      group=group or 0, K=W_NK.shape[1]), deq


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
