"""The skinny decode matmul (ops/triton_skinny.py) against torch: tile edges, split-K, dtypes.

Without a GPU the kernel runs in Triton's interpreter on small shapes; the cuda test covers the 7B
projections at the benchmarked launch shapes (benchmarks/bench_skinny.py).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
pytest.importorskip("triton")

from falcon_mamba.ops.triton_skinny import SkinnyConfig, skinny_linear  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("M,K,N,cfg", [
    (1, 64, 16, SkinnyConfig(16, 32, 1)),
    (3, 96, 40, SkinnyConfig(16, 32, 1)),  # N and K not multiples of the blocks
    (17, 200, 33, SkinnyConfig(32, 64, 3)),  # split-K: at most 3 slices of whole BK: 2 (128 + 72)
    (64, 128, 64, SkinnyConfig(64, 32, 2)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch(M, K, N, cfg, dtype, rng):
    x = torch.randn(M, K, generator=rng).to(DEV, dtype)
    w = torch.randn(N, K, generator=rng).to(DEV, dtype)
    y = skinny_linear(x, w, cfg)
    ref = x.double() @ w.double().T
    assert y.shape == (M, N) and y.dtype == dtype
    tol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 5e-2)
    assert_close(y.double() / ref.abs().max(), ref / ref.abs().max(), *tol, f"{dtype} {cfg.name}")


def test_out_buffer_is_used_and_checked(rng):
    x = torch.randn(5, 300, generator=rng).to(DEV)
    w = torch.randn(24, 300, generator=rng).to(DEV)
    out = torch.empty(5, 24, device=DEV)
    a = skinny_linear(x, w, SkinnyConfig(16, 64, 4), out=out)
    assert a.data_ptr() == out.data_ptr()
    assert_close(a, x @ w.T, 1e-5, 1e-4, "split-K into out")
    with pytest.raises(AssertionError, match="contiguous"):
        skinny_linear(x, w, SkinnyConfig(16, 64, 4), out=torch.empty(24, 5, device=DEV).T)


@pytest.mark.cuda
def test_split_k_is_deterministic_cuda(rng):
    """The slices are summed in order by a second kernel: repeated calls give the same bits."""
    x = torch.randn(64, 8192, generator=rng).to(DEV, torch.bfloat16)
    w = torch.randn(288, 8192, generator=rng).to(DEV, torch.bfloat16)
    first = skinny_linear(x, w, SkinnyConfig(32, 128, 4))
    assert all(torch.equal(first, skinny_linear(x, w, SkinnyConfig(32, 128, 4))) for _ in range(5))


def test_refuses_more_than_64_rows():
    with pytest.raises(AssertionError, match="64 rows"):
        skinny_linear(torch.zeros(65, 8, device=DEV), torch.zeros(4, 8, device=DEV))


@pytest.mark.cuda
@pytest.mark.parametrize("K,N,cfg", [
    (8192, 4096, SkinnyConfig(32, 256, 1)),  # out_proj
    (8192, 288, SkinnyConfig(32, 128, 4)),  # x_proj
    (4096, 65024, SkinnyConfig(128, 128, 1)),  # lm_head
])
@pytest.mark.parametrize("M", [16, 64])
def test_7b_projections_cuda(K, N, cfg, M, rng):
    x = torch.randn(M, K, generator=rng).to(DEV, torch.bfloat16)
    w = (torch.randn(N, K, generator=rng) * 0.02).to(DEV, torch.bfloat16)
    y = skinny_linear(x, w, cfg)
    ref = torch.nn.functional.linear(x.float(), w.float())
    assert_close(y.float(), ref, 1e-2, 2e-2 * ref.abs().max().item(), cfg.name)


# ---- in the decode step (fast_step's skinny option, DecodeOptions.batched_proj) -----------------

def _tiny_model(dtype=torch.float32):
    import dataclasses

    from falcon_mamba.config import get_preset
    from falcon_mamba.model import FalconMamba

    with torch.device(DEV):
        model = FalconMamba(dataclasses.replace(get_preset("tiny-odd"), num_hidden_layers=2)).eval()
    return model.to_dtype(dtype) if dtype != torch.float32 else model


@pytest.mark.parametrize("B", [3, 17])
def test_fast_step_skinny_matches_model_step(B, rng, monkeypatch):
    """fast_step with the skinny projections against model.step over two steps, and the skinny
    kernel is what ran out_proj, x_proj (each layer) and lm_head."""
    from falcon_mamba.decode import step as step_mod
    from falcon_mamba.ops import triton_skinny

    model = _tiny_model()
    calls = []
    real = triton_skinny.skinny_linear

    def spy(x, w, cfg, out=None):
        calls.append(tuple(w.shape))
        return real(x, w, cfg, out)

    monkeypatch.setattr(triton_skinny, "skinny_linear", spy)
    ids = torch.randint(0, model.config.vocab_size, (B, 4), generator=rng).to(DEV)
    with torch.no_grad():
        _, state = model(ids)
    twin = state.clone()
    tok = torch.randint(0, model.config.vocab_size, (B,), generator=rng).to(DEV)
    c = model.config
    for _ in range(2):
        logits = step_mod.fast_step(model, tok, state.conv, state.ssm, skinny=True)
        ref = model.step(tok, twin)
        assert_close(logits, ref, 1e-4, 1e-4, "step logits")
        tok = ref.argmax(-1)
    assert_close(state.ssm, twin.ssm, 1e-5, 1e-5, "ssm state")
    per_step = [(c.hidden_size, c.intermediate_size),
                (c.time_step_rank + 2 * c.state_size, c.intermediate_size)]
    assert set(calls) == {*per_step, (c.vocab_size, c.hidden_size)}
    assert len(calls) == 2 * (2 * c.num_hidden_layers + 1)


def test_batched_proj_option():
    from falcon_mamba.decode.modes import MODES, DecodeOptions
    from falcon_mamba.errors import UserError

    opt = DecodeOptions(batched_proj="skinny")
    assert opt.step_kwargs(MODES["triton_cx"], 1)["skinny"] is False  # batch 1: the GEMV modes
    assert opt.step_kwargs(MODES["cublas"], 16) == {"gemv": False, "conv_fold": False, "xproj_merge": False,
                                                    "skinny": True}
    assert DecodeOptions().step_kwargs(MODES["cublas"], 16)["skinny"] is False
    with pytest.raises(UserError, match="cublas, skinny"):
        DecodeOptions(batched_proj="cutlass")


@pytest.mark.cuda
@pytest.mark.parametrize("B", [16, 64])
def test_fast_step_skinny_7b_width_cuda(B, rng):
    """Two layers at the 7B width in bf16: the skinny step's logits and states against cuBLAS's."""
    import dataclasses

    from falcon_mamba.config import get_preset
    from falcon_mamba.decode.step import fast_step
    from falcon_mamba.model import FalconMamba

    with torch.device(DEV):
        model = FalconMamba(dataclasses.replace(get_preset("falcon-mamba-7b"), num_hidden_layers=2))
    model = model.to_dtype(torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (B, 8), generator=rng).to(DEV)
    with torch.no_grad():
        _, state = model(ids)
    twin = state.clone()
    tok = torch.randint(0, model.config.vocab_size, (B,), generator=rng).to(DEV)
    got = fast_step(model, tok, state.conv, state.ssm, skinny=True)
    ref = fast_step(model, tok, twin.conv, twin.ssm)
    assert_close(got, ref, 2e-2, 2e-2 * ref.abs().max().item(), "logits")
    assert_close(state.ssm, twin.ssm, 2e-2, 2e-2, "ssm state")
