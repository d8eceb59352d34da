"""The fused linear cross-entropy (train/linear_ce.py) against the plain F.cross_entropy of fp32
logits: loss, grad of h and grad of W, fp32 and bf16 (autocast and bf16 weights), odd sizes,
chunks that do not divide the token count, masks (all-masked chunks, nothing trained), ignore_index,
a frozen weight; and the objective of a whole model (tied and untied) on both paths."""

import pytest
import torch
import torch.nn.functional as F

import falcon_mamba as fm
from falcon_mamba.train.linear_ce import default_chunk, linear_cross_entropy
from falcon_mamba.train.objective import LMObjective, fusable
from tests.helpers import assert_close

TOL = {"fp32": (6e-4, 2e-3), "autocast-bf16": (3e-2, 5e-2), "bf16": (3e-2, 5e-2)}


def plain(h, W, t, mask):
    nll = F.cross_entropy(F.linear(h, W).float().flatten(0, -2), t.flatten(), reduction="none")
    if mask is not None:
        nll = nll * mask.flatten().to(nll.dtype)
    return nll.sum()


def run(fn, h0, W0, t, mask, mode):
    """-> (loss, grad h, grad W) of fn computed in ``mode``, from leaf copies of h0 and W0."""
    dt = torch.bfloat16 if mode == "bf16" else torch.float32
    h = h0.detach().to(dt, copy=True).requires_grad_()  # fresh leaves: grads never accumulate across runs
    W = W0.detach().to(dt, copy=True).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast-bf16"):
        loss = fn(h, W, t, mask)
    loss.backward()
    return loss.detach(), h.grad, W.grad


def inputs(rng, B, L, H, V, masked=None):
    h = torch.randn(B, L, H, generator=rng)
    W = torch.randn(V, H, generator=rng) * 0.3
    t = torch.randint(0, V, (B, L), generator=rng)
    mask = None
    if masked == "random":
        mask = torch.rand(B, L, generator=rng) < 0.6
    elif masked == "block":  # a run of masked tokens longer than a chunk, and the first token
        mask = torch.ones(B, L, dtype=torch.bool)
        mask.view(-1)[: min(B * L, 11)] = False
    elif masked == "all":
        mask = torch.zeros(B, L, dtype=torch.bool)
    return h, W, t, mask


def check(got, want, mode, what):
    """Compare with the ENGINEERING tolerances on tensors scaled to unit max magnitude (the loss
    is a sum over tokens, the grads of W are ~1/V: absolute tolerances alone would mean nothing)."""
    rtol, atol = TOL[mode]
    scale = want.abs().max().clamp(min=1e-30)
    assert_close(got / scale, want / scale, rtol, atol, what)


@pytest.mark.parametrize("mode", ["fp32", "autocast-bf16", "bf16"])
@pytest.mark.parametrize("B,L,H,V", [(1, 1, 8, 5), (2, 37, 24, 97), (3, 50, 33, 301)])
@pytest.mark.parametrize("chunk", [0, 1, 7, 16])
@pytest.mark.parametrize("masked", [None, "random", "block"])
def test_matches_plain_cross_entropy(rng, mode, B, L, H, V, chunk, masked):
    h, W, t, mask = inputs(rng, B, L, H, V, masked)
    ref = run(plain, h, W, t, mask, mode)
    got = run(lambda *a: linear_cross_entropy(*a, chunk=chunk), h, W, t, mask, mode)
    assert got[0].dtype == torch.float32 and got[1].dtype == h.to(got[1].dtype).dtype
    for name, g, r in zip(("loss", "grad h", "grad W"), got, ref):
        check(g, r, mode, f"{mode} {name} B={B} L={L} chunk={chunk} mask={masked}")
    if mask is not None:  # dropped tokens get no gradient at all
        assert torch.all(got[1][~mask] == 0)


@pytest.mark.parametrize("mode", ["autocast-bf16", "bf16"])
def test_bf16_error_not_larger_than_the_plain_paths(rng, mode):
    """Against the exact (fp64) result, the fused bf16 path errs no more than the plain bf16 one."""
    h, W, t, mask = inputs(rng, 4, 64, 48, 512, "random")
    h64, W64 = h.double().requires_grad_(), W.double().requires_grad_()
    loss = plain(h64, W64, t, mask)
    loss.backward()
    exact = (loss.detach(), h64.grad, W64.grad)
    ref = run(plain, h, W, t, mask, mode)
    got = run(lambda *a: linear_cross_entropy(*a, chunk=40), h, W, t, mask, mode)
    for name, g, r, e in zip(("loss", "grad h", "grad W"), got, ref, exact):
        err_fused = (g.double() - e).abs().max().item()
        err_plain = (r.double() - e).abs().max().item()
        assert err_fused <= 1.5 * err_plain + 1e-6 * e.abs().max().item(), (name, err_fused, err_plain)


def test_ignore_index_and_all_masked(rng):
    h, W, t, _ = inputs(rng, 2, 20, 16, 50)
    t[0, 3:9] = -100
    ref = run(plain, h, W, t, None, "fp32")  # F.cross_entropy ignores -100 by default
    got = run(lambda *a: linear_cross_entropy(*a, chunk=5), h, W, t, None, "fp32")
    for name, g, r in zip(("loss", "grad h", "grad W"), got, ref):
        check(g, r, "fp32", f"ignore_index {name}")
    _, _, _, none = inputs(rng, 2, 20, 16, 50, "all")
    loss, gh, gw = run(lambda *a: linear_cross_entropy(*a, chunk=5), h, W, t.clamp(min=0), none, "fp32")
    assert loss.item() == 0.0 and torch.all(gh == 0) and torch.all(gw == 0)


def test_frozen_weight_and_no_grad(rng):
    h, W, t, mask = inputs(rng, 2, 9, 8, 30, "random")
    hh = h.clone().requires_grad_()
    loss = linear_cross_entropy(hh, W, t, mask, chunk=4)  # W does not require grad (a frozen head)
    loss.backward()
    hr = h.clone().requires_grad_()
    plain(hr, W, t, mask).backward()
    check(hh.grad, hr.grad, "fp32", "grad h, frozen W")
    with torch.no_grad():
        check(linear_cross_entropy(h, W, t, mask, chunk=4), plain(h, W, t, mask), "fp32", "no_grad loss")


def test_grad_scales_with_the_incoming_gradient(rng):
    h, W, t, _ = inputs(rng, 1, 12, 8, 20)
    a, b = h.clone().requires_grad_(), h.clone().requires_grad_()
    (linear_cross_entropy(a, W, t, chunk=5) * 0.37).backward()
    (plain(b, W, t, None) * 0.37).backward()
    check(a.grad, b.grad, "fp32", "scaled grad h")


def test_shape_errors(rng):
    h, W, t, _ = inputs(rng, 1, 4, 8, 10)
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(h, W[:, :5], t)
    with pytest.raises(ValueError, match="leading shape"):
        linear_cross_entropy(h, W, t[:, :3])
    for bad in (10, -1):  # outside [0, V) and not ignore_index
        with pytest.raises(ValueError, match=r"token ids in \[0, 10\)"):
            linear_cross_entropy(h, W, torch.full_like(t, bad))
    masked = torch.zeros_like(t, dtype=torch.bool)  # masked out: not trained, so not checked
    assert linear_cross_entropy(h, W, torch.full_like(t, 10), masked).item() == 0.0


def test_default_chunk():
    assert default_chunk(65024) == 2048
    assert default_chunk(256) == (1 << 27) // 256 and default_chunk(10 ** 9) == 64


# ---- the objective of a whole model ----------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_objective_fused_equals_plain(rng, tied, autocast):
    cfg = fm.ModelConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, vocab_size=203,
                         state_size=4, tie_word_embeddings=tied)
    ids = torch.randint(0, 203, (2, 19), generator=rng)
    targets = torch.randint(0, 203, (2, 19), generator=rng)
    reset = torch.zeros(2, 19, dtype=torch.bool)
    reset[1, 7] = True
    mask = torch.rand(2, 19, generator=rng) < 0.7
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = fm.FalconMamba(cfg)
        obj = LMObjective(model, fused=fused, chunk=6)
        assert obj.fused == fused
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = obj(ids, targets, reset, mask)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    mode = "autocast-bf16" if autocast else "fp32"
    check(l1, l0, mode, "objective loss")
    assert g0.keys() == g1.keys()
    for name in g0:
        check(g1[name], g0[name], mode, f"grad {name}")


def test_hidden_is_the_lm_head_input(rng):
    model = fm.FalconMamba(fm.get_preset("tiny-odd"))
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=rng)
    logits, st = model(ids)
    h, st2 = model.hidden(ids)
    assert h.shape == (2, 11, model.config.hidden_size)
    assert torch.equal(model.lm_head(h).float(), logits)
    assert torch.equal(st.ssm, st2.ssm) and st.tokens_seen == st2.tokens_seen


def test_no_vocab_sized_tensor_is_saved_for_backward(rng):
    """The fused path keeps nothing of (B*L, V) for the backward; the plain path does."""
    V = 4096  # far above every other width, so B*L*V dwarfs every activation
    cfg = fm.ModelConfig(hidden_size=16, num_hidden_layers=1, intermediate_size=32, vocab_size=V,
                         state_size=4)
    ids = torch.randint(0, V, (2, 32), generator=rng)
    reset = torch.zeros(2, 32, dtype=torch.bool)
    sizes = {}
    for fused in (False, True):
        seen: list[int] = []

        def pack(x, seen=seen):
            seen.append(x.numel())
            return x

        obj = LMObjective(fm.FalconMamba(cfg), fused=fused)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            obj(ids, ids, reset, None)
        sizes[fused] = max(seen)
    assert sizes[False] >= 2 * 32 * V
    assert sizes[True] <= V * 16  # grad of W (V, H) is the largest


def test_fusable_needs_a_dense_head():
    model = fm.FalconMamba(fm.get_preset("tiny-odd"))
    assert fusable(model)
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    assert not fusable(model) and not LMObjective(model).fused


@pytest.mark.parametrize("mode", ["fp32", "autocast-bf16", "bf16"])
@pytest.mark.parametrize("B,L,H,V,chunk", [(1, 1, 8, 5, 0), (2, 37, 24, 97, 16), (3, 50, 33, 301, 64)])
def test_the_rows_kernel_matches_the_pytorch_step(rng, mode, B, L, H, V, chunk):
    """ops/triton_ce.py (Triton's interpreter here; the GPU default) against the PyTorch ops it
    replaces: loss and both gradients, with blocks of the vocabulary smaller than a row."""
    pytest.importorskip("triton")
    import os

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from falcon_mamba.ops import triton_ce

    h, W, t, mask = inputs(rng, B, L, H, V, "random")
    want = run(lambda *a: linear_cross_entropy(*a, chunk=chunk, rows_kernel=False), h, W, t, mask, mode)
    old = triton_ce.BLOCK_V
    triton_ce.BLOCK_V = 32  # several blocks a row, the last one ragged
    try:
        got = run(lambda *a: linear_cross_entropy(*a, chunk=chunk, rows_kernel=True), h, W, t, mask, mode)
    finally:
        triton_ce.BLOCK_V = old
    for name, a, b in zip(("loss", "grad h", "grad W"), got, want):
        check(a.float(), b.float(), "fp32" if mode == "fp32" else "bf16", f"{mode} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rows_kernel_per_row(rng, dtype):
    """ce_rows_ alone: each row's loss and softmax gradient against the fp32 formula, tight."""
    pytest.importorskip("triton")
    import os

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from falcon_mamba.ops import triton_ce

    logits = (torch.randn(7, 301, generator=rng) * 4).to(dtype)
    t = torch.randint(0, 301, (7,), generator=rng)
    lf = logits.float()
    want_loss = torch.logsumexp(lf, -1) - lf.gather(1, t[:, None]).squeeze(1)
    want_g = (torch.softmax(lf, -1) - F.one_hot(t, 301).float()).to(dtype)
    old = triton_ce.BLOCK_V
    triton_ce.BLOCK_V = 64
    try:
        g = logits.clone()
        loss = triton_ce.ce_rows_(g, t, grad=True)
        kept = logits.clone()
        loss2 = triton_ce.ce_rows_(kept, t, grad=False)
    finally:
        triton_ce.BLOCK_V = old
    assert_close(loss, want_loss, 1e-5, 1e-5, "loss rows")
    assert torch.equal(loss, loss2) and torch.equal(kept, logits)  # no gradient asked: untouched
    assert_close(g.float(), want_g.float(), 1e-5 if dtype == torch.float32 else 8e-3, 1e-6, "g")


@pytest.mark.cuda
def test_the_rows_kernel_at_falcons_vocabulary(rng):
    """A 1.5B step's chunk: 2,048 bf16 rows of 65,024 logits (16 blocks a row) on the GPU."""
    from falcon_mamba.ops import triton_ce

    logits = (torch.randn(2048, 65024, generator=rng) * 3).to("cuda", torch.bfloat16)
    t = torch.randint(0, 65024, (2048,), generator=rng).cuda()
    lf = logits.float()
    want_loss = torch.logsumexp(lf, -1) - lf.gather(1, t[:, None]).squeeze(1)
    want_g = (torch.softmax(lf, -1) - F.one_hot(t, 65024).float()).bfloat16()
    g = logits.clone()
    assert_close(triton_ce.ce_rows_(g, t, grad=True), want_loss, 1e-5, 1e-4, "loss rows")
    assert_close(g.float(), want_g.float(), 8e-3, 1e-7, "g")
