"""The fused training mixer (ops/mixer_autograd.py) against autograd through the op-by-op mixer:
gradients vs the reference ops in float64 and vs the unfused Triton path, the scan backward's y
output, the bytes autograd keeps, a short training run, and the LoRA fall back. Interpreter on CPU
(small shapes, CHK 8 so that L = 37 spans several saved states and length chunks)."""

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
pytest.importorskip("triton")

from falcon_mamba import ops  # noqa: E402
from falcon_mamba.config import ModelConfig  # noqa: E402
from falcon_mamba.model import FalconMamba, MambaMixer  # noqa: E402
from falcon_mamba.ops import mixer_autograd, triton_scan, triton_scan_bwd  # noqa: E402
from tests.helpers import assert_close  # noqa: E402
from tests.test_triton_scan import scan_inputs  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (6e-4, 2e-3), torch.bfloat16: (3e-2, 5e-2)}
B, L, H, R, K = 2, 37, 16, 4, 4
NAMES = ["out", "conv_state", "ssm_state", "u"]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(triton_scan, "CHK", 8)
    monkeypatch.setattr(triton_scan, "FWD_MIN_CHUNK", 4)  # the forward in chunks of 8 as well
    prev = ops._override
    ops.set_backend("triton")
    yield
    ops.set_backend(prev)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the mixer forwards that went through the fused Function."""
    calls = []
    real = mixer_autograd.mixer_forward
    monkeypatch.setattr(mixer_autograd, "mixer_forward", lambda *a: calls.append(1) or real(*a))
    return calls


def unfused(monkeypatch):
    monkeypatch.setattr(MambaMixer, "_fused_training", lambda *a: False)


def make_mixer(D, N, gen, use_bias=False, bcdt_rms=True, conv_bias=True) -> MambaMixer:
    cfg = ModelConfig(hidden_size=H, num_hidden_layers=1, intermediate_size=D, state_size=N,
                      time_step_rank=R, conv_kernel=K, vocab_size=64, use_bias=use_bias,
                      use_conv_bias=conv_bias, bcdt_rms=bcdt_rms)
    m = FalconMamba(cfg).backbone.layers[0].mixer
    with torch.no_grad():  # random everywhere (zero biases would hide a missing gradient)
        for name, p in m.named_parameters():
            if name.endswith("bias") and name != "dt_proj.bias":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return m.to(DEV)


def resets(gen):
    rst = torch.rand(B, L, generator=gen) < 0.1
    rst[0, 0] = True  # drops nothing but must not break the start
    rst[1, 16] = True  # a saved-state (CHK) and backward length-chunk start
    rst[1, 5] = True
    return rst.to(DEV)


def run(mixer, u, rst, gen_seed, autocast=False):
    """Forward + backward of a loss on all three outputs -> [out, states, grads of u and params]."""
    for p in mixer.parameters():
        p.grad = None
    u = u.detach().clone().requires_grad_()
    with torch.autocast(u.device.type, dtype=torch.bfloat16, enabled=autocast):
        out, cs, ss = mixer(u, None, None, rst)
    g = torch.Generator().manual_seed(gen_seed)
    loss = sum((t.double() * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device)).sum()
               for t in (out, cs, ss))
    loss.backward()
    return ([out.detach(), cs.detach(), ss.detach(), u.grad]
            + [p.grad for p in mixer.parameters()]), NAMES + [n for n, _ in mixer.named_parameters()]


def compare(got, want, names, rtol, atol, what):
    for name, a, b in zip(names, got, want, strict=True):
        assert a is not None, f"no gradient for {name}"
        a, b = a.detach().cpu().double(), b.detach().cpu().double()
        scale = b.abs().max().clamp(min=1.0)  # weight gradients are sums over tokens
        assert_close(a / scale, b / scale, rtol, atol, f"{what}: {name}")


CASES = [  # (dtype, resets, D, N, use_bias, bcdt_rms, conv bias, backward length chunk)
    (torch.float32, False, 24, 5, False, True, True, None),
    (torch.float32, True, 20, 8, True, True, True, 16),
    (torch.bfloat16, True, 32, 5, True, False, True, 16),
    (torch.bfloat16, False, 24, 16, False, True, False, None),
]


@pytest.mark.parametrize("dtype,with_resets,D,N,use_bias,bcdt,conv_bias,bwd_chunk", CASES)
def test_gradients_match_the_float64_reference(rng, monkeypatch, fused_calls, dtype, with_resets, D, N,
                                               use_bias, bcdt, conv_bias, bwd_chunk):
    if bwd_chunk:
        monkeypatch.setattr(triton_scan_bwd, "backward_chunk", lambda *a: bwd_chunk)
    m = make_mixer(D, N, rng, use_bias, bcdt, conv_bias)
    u = torch.randn(B, L, H, generator=rng).to(DEV)
    rst = resets(rng) if with_resets else None
    got, names = run(m, u, rst, 7, autocast=dtype == torch.bfloat16)
    assert fused_calls == [1]
    assert got[0].dtype == dtype
    ref = copy.deepcopy(m).double()
    ops.set_backend("reference")
    want, _ = run(ref, u.double(), rst, 7)
    compare(got, want, names, *TOL[dtype], f"{dtype} resets={with_resets}")


@pytest.mark.parametrize("dtype", [torch.float32])
def test_same_as_the_op_by_op_triton_path(rng, monkeypatch, fused_calls, dtype):
    """Same kernels, same casts: equal to rounding (bit for bit on the CPU). In fp32: bf16 autocast
    against the op-by-op path is test_training_losses_equal_the_op_by_op_path's."""
    monkeypatch.setattr(triton_scan_bwd, "backward_chunk", lambda *a: 16)
    m = make_mixer(24, 5, rng, use_bias=True)
    u = torch.randn(B, L, H, generator=rng).to(DEV)
    rst = resets(rng)
    got, names = run(m, u, rst, 3, autocast=dtype == torch.bfloat16)
    unfused(monkeypatch)
    want, _ = run(m, u, rst, 3, autocast=dtype == torch.bfloat16)
    assert fused_calls == [1]
    compare(got, want, names, 1e-5, 1e-5 if dtype == torch.float32 else 1e-2, f"{dtype}")


@pytest.mark.parametrize("z,chunk,dtype", [(True, None, torch.float32), (False, 16, torch.float32),
                                           (True, 16, torch.bfloat16)])
def test_scan_backward_y_is_the_forward_y(rng, z, chunk, dtype):
    """y_out equals the forward's y; dz_out (a strided half, as the fused mixer passes) gets dz."""
    x, dt, A, Bm, Cm, Dv, zz, dtb, _, _ = scan_inputs(B, L, 20, 5, dtype, DEV, rng)
    zz = zz if z else None
    rst = resets(rng)
    y, _, chk = triton_scan.scan_fwd(x, dt, A, Bm, Cm, Dv, zz, dtb, None, rst, save_chk=True)
    dy = torch.randn(y.shape, generator=rng).to(DEV, dtype)
    y2 = torch.full_like(y, float("nan"))
    dz_out = torch.full((B, L, 40), float("nan"), dtype=dtype, device=DEV)[..., 20:]  # row stride 40
    got = triton_scan_bwd.scan_bwd(x, dt, A, Bm, Cm, Dv, zz, dtb, rst, chk, dy, None, triton_scan.CHK,
                                   chunk=chunk, y_out=y2, dz_out=dz_out if z else None)
    assert not z or got[6] is dz_out
    plain = triton_scan_bwd.scan_bwd(x, dt, A, Bm, Cm, Dv, zz, dtb, rst, chk, dy, None, triton_scan.CHK,
                                     chunk=chunk)
    assert_close(y2, y, 1e-6 if dtype == torch.float32 else 1e-2, 1e-6, "y from the backward")
    for a, b in zip(got, plain):  # the extra outputs change no gradient
        assert (a is None and b is None) or torch.equal(a, b)


# ---- the bytes autograd keeps ----------------------------------------------------------------

def saved_storages(fn, exclude=()):
    """{storage pointer: bytes} of every tensor autograd saves while fn() runs, less `exclude`'s."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return seen


@pytest.mark.parametrize("bcdt", [True, False])
def test_saved_bytes_of_one_mixer(rng, monkeypatch, bcdt):
    D, N = 24, 5
    m = make_mixer(D, N, rng, use_bias=True, bcdt_rms=bcdt)
    u = torch.randn(B, L, H, generator=rng).to(DEV).requires_grad_()
    rst = resets(rng)
    params = list(m.parameters())
    expect = {k: mixer_autograd.saved_bytes(B, L, H, D, N, R, bcdt, k) for k in (4, 2)}
    fwd = lambda ac: _autocast(lambda: m(u, None, None, rst), ac)
    fused_fp32 = saved_storages(lambda: fwd(False), params + [rst])
    fused_bf16 = saved_storages(lambda: fwd(True), params + [rst])
    # u is saved as it is in fp32 (the input itself), as a bf16 copy under autocast
    assert sum(fused_fp32.values()) == expect[4]["fused"]
    assert sum(fused_bf16.values()) == expect[2]["fused"]
    unfused(monkeypatch)
    unf = saved_storages(lambda: fwd(False), params + [rst])
    # ... and the op-by-op path two (D, N) fp32 copies of A besides (exp's output, the scan's A)
    assert sum(unf.values()) == expect[4]["unfused"] + 2 * D * N * 4


def _autocast(fn, enabled=True):
    with torch.autocast(DEV, dtype=torch.bfloat16, enabled=enabled):
        return fn()


@pytest.mark.parametrize("autocast", [False, True])
def test_saved_bytes_of_a_model(rng, monkeypatch, autocast):
    D, N = 24, 5
    cfg = ModelConfig(hidden_size=H, num_hidden_layers=2, intermediate_size=D, state_size=N,
                      time_step_rank=R, vocab_size=64)
    model = FalconMamba(cfg).to(DEV)
    ids = torch.randint(0, 64, (B, L), generator=rng).to(DEV)
    rst = resets(rng)
    fwd = lambda: _autocast(lambda: model.hidden(ids, reset_BL=rst), autocast)
    fused = sum(saved_storages(fwd, list(model.parameters())).values())
    unfused(monkeypatch)
    before = sum(saved_storages(fwd, list(model.parameters())).values())
    per = mixer_autograd.saved_bytes(B, L, H, D, N, R, True, 2 if autocast else 4)
    # the op-by-op path also keeps two fp32 copies of A and, under autocast, bf16 copies of the
    # four projection weights
    weights = 2 * (2 * D * H + (R + 2 * N) * D + D * R + H * D) if autocast else 0
    assert before - fused == cfg.num_hidden_layers * (per["unfused"] - per["fused"] + 2 * D * N * 4 + weights)


def test_the_docstring_figures_at_the_1p5b_shape():
    per = mixer_autograd.saved_bytes(1, 128, 2048, 4096, 16, 128, True, 2, chk_every=128)
    assert (per["unfused"] // 128, per["fused"] // 128) == (47744, 22848)
    assert mixer_autograd.__doc__.count("47,744 -> 22,848") == 1


# ---- where it applies ------------------------------------------------------------------------

def test_training_losses_equal_the_op_by_op_path(tmp_path, monkeypatch, fused_calls):
    """Two optimizer steps of a tiny model (packed documents: resets) under bf16 autocast with
    activation checkpointing (the Function runs again inside the recompute); fp32 is covered by
    the gradient tests above. Small: every kernel runs in Triton's interpreter."""
    precision, ckpt = "bf16", True
    from falcon_mamba.train import apply_overrides, get_recipe, train
    from tests.test_data import make_data

    (tmp_path / "d").mkdir()
    data = make_data(tmp_path / "d", lines=60)
    cfg = apply_overrides(get_recipe("tiny"), [
        "model.hidden_size=16", "model.intermediate_size=24", "model.num_hidden_layers=1",
        "model.state_size=4", "seq_len=16", "global_batch=2", "micro_batch=2", "steps=2",
        "warmup_steps=1", "lr=3e-3", "eval_tokens=16", f"precision={precision}",
        f"activation_checkpointing={str(ckpt).lower()}"])
    quiet = {"progress": False, "export": False, "log": lambda *a: None}
    a = train(cfg, data, tmp_path / "a", **quiet)
    assert fused_calls  # the run went through the fused Function
    n = len(fused_calls)
    unfused(monkeypatch)
    b = train(cfg, data, tmp_path / "b", **quiet)
    assert len(fused_calls) == n
    assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
    assert a.val_loss == pytest.approx(b.val_loss, rel=1e-5)


def test_inference_and_other_backends_keep_the_op_by_op_path(rng, fused_calls):
    m = make_mixer(24, 5, rng)
    u = torch.randn(B, 5, H, generator=rng).to(DEV)
    with torch.no_grad():
        m(u)
    for p in m.parameters():
        p.requires_grad_(False)
    m(u)  # nothing requires a gradient
    assert fused_calls == []
    for p in m.parameters():
        p.requires_grad_(True)
    state = (torch.zeros(B, K - 1, 24, device=DEV), torch.zeros(B, 24, 5, device=DEV))
    m(u, *state)  # a carried state (chunked prefill under autograd)
    ops.set_backend("torch")
    m(u)
    assert fused_calls == []


def test_lora_wrapped_projections_fall_back_with_correct_gradients(rng, fused_calls):
    from falcon_mamba.lora import apply_lora

    cfg = ModelConfig(hidden_size=H, num_hidden_layers=2, intermediate_size=24, state_size=5,
                      time_step_rank=R, vocab_size=64)
    model = FalconMamba(cfg).to(DEV)
    apply_lora(model, rank=2, alpha=4, targets="in_proj,x_proj")
    with torch.no_grad():  # B = 0 at the start would give A no gradient
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.copy_(torch.randn(p.shape, generator=rng) * 0.1)
    ids = torch.randint(0, 64, (B, L), generator=rng).to(DEV)

    def grads(mdl):
        mdl.zero_grad()
        mdl(ids[:, :-1])[0].logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in mdl.named_parameters() if p.requires_grad}

    got = grads(model)
    assert fused_calls == []
    ops.set_backend("reference")
    want = grads(model)
    assert got.keys() == want.keys() and len(got) == 8
    compare(list(got.values()), list(want.values()), list(got), *TOL[torch.float32], "lora")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,with_resets,D,N,use_bias,bcdt,conv_bias,bwd_chunk", CASES)
def test_gradients_match_the_float64_reference_cuda(rng, monkeypatch, fused_calls, dtype, with_resets, D,
                                                    N, use_bias, bcdt, conv_bias, bwd_chunk):
    """The CPU test above on the GPU (the cuda suite runs marked tests only): the compiled kernels,
    the Triton norm backward into x_proj's gradient slices, cuBLAS's addmm."""
    test_gradients_match_the_float64_reference(rng, monkeypatch, fused_calls, dtype, with_resets, D, N,
                                               use_bias, bcdt, conv_bias, bwd_chunk)
