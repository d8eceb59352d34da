"""The fused decode step and the CUDA-graph decoder (decode_graph.py) against model.step.

On CPU the fused step runs in Triton's interpreter and the decoder runs without graphs (the
binding of states to static buffers is the same code); the cuda-marked tests capture real graphs.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from falcon_mamba import FalconMamba, get_preset  # noqa: E402
from falcon_mamba.decode_graph import GraphDecoder, maybe_graphed_step  # noqa: E402
from falcon_mamba.decode_step import fast_step, xproj_merge_supported  # noqa: E402
from tests.helpers import assert_close  # noqa: E402


def _model(preset, dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    with torch.device(device):
        m = FalconMamba(get_preset(preset))
    return m.to_dtype(dtype).eval()


def _prefilled(model, B, gen):
    ids = torch.randint(0, model.config.vocab_size, (B, 5), generator=gen).to(model.device)
    with torch.no_grad():
        _, state = model(ids)
    return state


@pytest.mark.parametrize("preset", ["tiny-odd", "tiny-mamba"])
def test_fast_step_matches_model_step(preset, rng):
    model = _model(preset)
    state = _prefilled(model, 3, rng)
    twin = state.clone()
    tok = torch.randint(0, model.config.vocab_size, (3,), generator=rng)
    logits = fast_step(model, tok, state.conv, state.ssm)
    ref = model.step(tok, twin)
    assert_close(logits, ref, 1e-4, 1e-4, "logits")
    assert_close(state.ssm, twin.ssm, 1e-5, 1e-5, "ssm state")
    assert_close(state.conv, twin.conv, 1e-6, 1e-6, "conv state")


def test_fast_step_triton_gemv_path(rng):
    model = _model("tiny")
    state = _prefilled(model, 1, rng)
    twin = state.clone()
    tok = torch.randint(0, model.config.vocab_size, (1,), generator=rng)
    logits = fast_step(model, tok, state.conv, state.ssm, gemv=True)
    assert_close(logits, model.step(tok, twin), 1e-4, 1e-4, "logits with the Triton GEMV")


def test_decoder_binding_and_greedy_without_graphs(rng):
    model = _model("tiny")
    dec = GraphDecoder(model, use_graph=False)
    a, b = _prefilled(model, 3, rng), _prefilled(model, 3, rng)
    a_ref, b_ref = a.clone(), b.clone()
    tok = torch.randint(0, model.config.vocab_size, (3,), generator=rng)
    out_a = dec.greedy(tok, a, 2)  # a is bound to the 4-row bucket
    slot = dec.slot(3)
    assert a.ssm.data_ptr() == slot.ssm.data_ptr()
    logits_b = dec.step(tok, b)  # b takes the bucket: a must get private memory back first
    assert a.ssm.data_ptr() != slot.ssm.data_ptr() and b.ssm.data_ptr() == slot.ssm.data_ptr()
    ref_tokens, t = [], tok
    for _ in range(2):
        t = model.step(t, a_ref).argmax(-1)
        ref_tokens.append(t)
    assert torch.equal(out_a, torch.stack(ref_tokens, 1))
    assert_close(a.ssm, a_ref.ssm, 1e-5, 1e-5, "a's state after losing the bucket")
    assert_close(logits_b, model.step(tok, b_ref), 1e-4, 1e-4, "b's logits")
    assert a.tokens_seen == a_ref.tokens_seen and b.tokens_seen == b_ref.tokens_seen


@pytest.mark.parametrize("choice", ["fused", "chain"])
def test_decoder_forced_mode_without_graphs(choice, rng, monkeypatch):
    """FALCON_MAMBA_GEMV=fused|chain: the batch-1 slot runs that step (two steps against model.step,
    then the SSM state); the batch-3 slot keeps the batched path."""
    monkeypatch.setenv("FALCON_MAMBA_GEMV", choice)
    model = _model("tiny-odd")
    dec = GraphDecoder(model, use_graph=False)
    state = _prefilled(model, 1, rng)
    twin = state.clone()
    tok = torch.randint(0, model.config.vocab_size, (1,), generator=rng)
    for _ in range(2):
        ref = model.step(tok, twin)
        assert_close(dec.step(tok, state), ref, 1e-4, 1e-4, f"{choice} decoder logits")
        tok = ref.argmax(-1)
    assert_close(state.ssm, twin.ssm, 1e-5, 1e-5, "ssm state")
    assert dec.slot(1).mode == choice and not dec.slot(1).gemv and dec.slot(3).mode == "cublas"


def test_decoder_conv_folded_mode_without_graphs(rng, monkeypatch):
    """FALCON_MAMBA_GEMV=triton_cx: the batch-1 slot runs the conv-folded GEMV step (dense or int8
    dt_proj); a model whose dt_proj cannot be fused (a bias inside its forward) is refused (UserError)."""
    from falcon_mamba.errors import UserError
    from falcon_mamba.quant import quantize_model

    monkeypatch.setenv("FALCON_MAMBA_GEMV", "triton_cx")
    model = _model("tiny-odd")
    dec = GraphDecoder(model, use_graph=False)
    state = _prefilled(model, 1, rng)
    twin = state.clone()
    tok = torch.randint(0, model.config.vocab_size, (1,), generator=rng)
    assert_close(dec.step(tok, state), model.step(tok, twin), 1e-4, 1e-4, "conv-folded decoder logits")
    assert_close(state.conv, twin.conv, 1e-6, 1e-6, "conv state")
    assert dec.slot(1).mode == "triton_gemv_cx"
    quantize_model(model, bits=8, group_size=None,  # a quantized dt_proj: the SSM kernel dequantizes it
                   modules=[f"backbone.layers.{i}.mixer.dt_proj"
                            for i in range(model.config.num_hidden_layers)])
    dec, twin = GraphDecoder(model, use_graph=False), state.clone()
    assert_close(dec.step(tok, state), model.step(tok, twin), 1e-4, 1e-4, "conv-folded, int8 dt_proj")
    assert dec.slot(1).mode == "triton_gemv_cx"
    for blk in model.backbone.layers:  # a bias added inside dt_proj's forward cannot be fused
        blk.mixer.dt_proj.bias_in_forward = True
    with pytest.raises(UserError, match="triton_cx"):
        GraphDecoder(model, use_graph=False).slot(1)


def test_decoder_refuses_xproj_merge_where_it_cannot_run(rng, monkeypatch):
    """FALCON_MAMBA_GEMV=triton_xp needs int4 in_proj/x_proj on the packed int4 kernel (a CUDA GPU):
    elsewhere a UserError that names the choice, not a traceback."""
    from falcon_mamba.errors import UserError
    from falcon_mamba.quant import quantize_model

    monkeypatch.setenv("FALCON_MAMBA_GEMV", "triton_xp")
    model = quantize_model(_model("tiny"), bits=4, group_size=32)
    assert not xproj_merge_supported(model)
    with pytest.raises(UserError, match="triton_xp"):
        GraphDecoder(model, use_graph=False).slot(1)


def test_decoder_rejects_token_ids_outside_the_vocab(rng):
    """The step gathers embedding rows itself: an id outside [0, vocab) is a ValueError that says so."""
    model = _model("tiny")
    dec = GraphDecoder(model, use_graph=False)
    state = _prefilled(model, 1, rng)
    for bad in (model.config.vocab_size, -1):
        with pytest.raises(ValueError, match="token ids must be in"):
            dec.step(torch.tensor([bad]), state)
        with pytest.raises(ValueError, match="token ids must be in"):
            dec.greedy(torch.tensor([bad]), state, 2)


def test_hook_declines_on_cpu(rng):
    model = _model("tiny")
    state = _prefilled(model, 1, rng)
    assert maybe_graphed_step(model, torch.tensor([1]), state) is None


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
def test_graph_decoder_matches_model_step_cuda(dtype, B, rng):
    model = _model("tiny", dtype, "cuda")
    dec = GraphDecoder(model)
    assert dec.use_graph
    state = _prefilled(model, B, rng)
    twin = state.clone()
    tok = torch.randint(0, model.config.vocab_size, (B,), generator=rng).cuda()
    tol = (1e-4, 1e-4) if dtype == torch.float32 else (3e-2, 5e-2)
    for _ in range(3):  # replays after the capture
        logits = dec.step(tok, state)
        ref = model.step(tok, twin)
        assert_close(logits, ref, *tol, "logits")
        tok = ref.argmax(-1)
    assert_close(state.ssm, twin.ssm, *tol, "ssm state")
    if dtype == torch.float32:
        s2, t2 = _prefilled(model, B, rng), tok
        s2_ref = s2.clone()
        out = dec.greedy(t2, s2, 8)
        ref_tokens = []
        for _ in range(8):
            t2 = model.step(t2, s2_ref).argmax(-1)
            ref_tokens.append(t2)
        assert torch.equal(out, torch.stack(ref_tokens, 1))
        assert state.ssm.data_ptr() != s2.ssm.data_ptr()  # the first state was given its memory back


@pytest.mark.cuda
def test_greedy_records_tokens_in_the_graph_cuda(rng, monkeypatch):
    """On CUDA the graph records each replay's greedy token in a ring of HISTORY steps that greedy()
    copies out between chunks: with a ring of 3, 8 steps (chunks 3 + 3 + 2) equal model.step's."""
    from falcon_mamba import decode_graph

    monkeypatch.setattr(decode_graph, "HISTORY", 3)
    model = _model("tiny", torch.float32, "cuda")
    dec = GraphDecoder(model)
    state = _prefilled(model, 2, rng)
    twin = state.clone()
    tok = torch.randint(0, model.config.vocab_size, (2,), generator=rng).cuda()
    out = dec.greedy(tok, state, 8)
    ref = []
    for _ in range(8):
        tok = model.step(tok, twin).argmax(-1)
        ref.append(tok)
    assert dec.slot(2).hist.shape[1] == 3
    assert torch.equal(out, torch.stack(ref, 1))


@pytest.mark.cuda
@pytest.mark.parametrize("quant", [None, (8, None), (4, 32)])
def test_autotune_times_fused_mode_cuda(quant, rng, monkeypatch):
    """Batch 1 on CUDA: the slot times cublas, triton_gemv and fused, keeps the fastest; whichever
    it keeps, graph replays match model.step (each mode is also forced once)."""
    from falcon_mamba.quant import quantize_model

    model = _model("tiny", torch.float32, "cuda")
    if quant is not None:
        quantize_model(model, bits=quant[0], group_size=quant[1])
    for choice in ("auto", "fused", "chain"):
        monkeypatch.setenv("FALCON_MAMBA_GEMV", choice)
        dec = GraphDecoder(model)
        slot = dec.slot(1)
        every = {"cublas", "triton_gemv", "triton_gemv_cx", "fused", "chain"}
        if xproj_merge_supported(model):
            every.add("triton_gemv_xp")
        modes = every if choice == "auto" else {choice}
        from falcon_mamba.ops import pdl

        with_pdl = {m + "+pdl" for m in modes} if pdl.supported(model.device) else set()
        assert set(slot.timings) | set(slot.errors) == modes | with_pdl
        assert not slot.errors, slot.errors
        best = min(slot.timings, key=slot.timings.get)
        assert slot.mode + ("+pdl" if slot.pdl else "") == best
        state = _prefilled(model, 1, rng)
        twin = state.clone()
        tok = torch.randint(0, model.config.vocab_size, (1,), generator=rng).cuda()
        for _ in range(3):
            logits = dec.step(tok, state)
            ref = model.step(tok, twin)
            assert_close(logits, ref, 1e-4, 1e-4, f"logits ({choice} -> {slot.mode})")
            tok = ref.argmax(-1)


@pytest.mark.cuda
def test_generate_decode_step_uses_graphs_cuda(rng):
    from falcon_mamba.generate import decode_step  # the module: the package's `generate` is the function

    model = _model("tiny", torch.float32, "cuda")
    state = _prefilled(model, 2, rng)
    twin = state.clone()
    tok = torch.tensor([3, 4], device="cuda")
    logits = decode_step(model, tok, state)
    from falcon_mamba.decode_graph import decoder_for

    assert state.ssm.data_ptr() == decoder_for(model).slot(2).ssm.data_ptr()
    assert_close(logits, model.step(tok, twin), 1e-4, 1e-4, "logits via generate.decode_step")


@pytest.mark.cuda
@pytest.mark.parametrize("gemv", ["cublas", "triton", "triton_cx", "fused", "chain"])
@pytest.mark.parametrize("B", [1, 3])
def test_pdl_graphs_match_model_step_cuda(gemv, B, rng, monkeypatch):
    """Programmatic dependent launch forced on (FALCON_MAMBA_PDL=1): every kernel waits for the
    previous grid before reading, so replays equal model.step (bf16, 7B-like widths so that the
    grids are many waves and a missing wait would race)."""
    from falcon_mamba.config import ModelConfig
    from falcon_mamba.model import FalconMamba
    from falcon_mamba.ops import pdl

    if gemv in ("fused", "triton_cx", "chain") and B > 1:
        pytest.skip("the fused, conv-folded and chain GEMV modes are batch 1 only")
    if not pdl.supported("cuda"):
        pytest.skip("programmatic dependent launch needs a Hopper or later GPU")
    monkeypatch.setenv("FALCON_MAMBA_PDL", "1")
    monkeypatch.setenv("FALCON_MAMBA_GEMV", gemv)
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=3, vocab_size=4096)
    with torch.device("cuda"):
        model = FalconMamba(cfg).to_dtype(torch.bfloat16).eval()
    dec = GraphDecoder(model)
    state = _prefilled(model, B, rng)
    twin = state.clone()
    tok = torch.randint(0, cfg.vocab_size, (B,), generator=rng).cuda()
    for _ in range(4):
        logits = dec.step(tok, state)
        ref = model.step(tok, twin)
        assert_close(logits, ref, 3e-2, 5e-2, f"logits with PDL ({gemv}, B={B})")
        tok = ref.argmax(-1)
    assert dec.slot(B).pdl
    assert_close(state.ssm, twin.ssm, 3e-2, 5e-2, "ssm state with PDL")


def test_pdl_switch_is_scoped_and_off_where_unsupported():
    """ops/pdl.py: the switch is per context and restored; the interpreter (and the CPU) never get
    the PDL launch option (the inline PTX cannot run there)."""
    from falcon_mamba.ops import pdl

    assert pdl.launch_kwargs("cpu") == {"PDL": False}
    with pdl.enabled(True):
        assert pdl._state.on is True
        assert not pdl.active("cpu") and pdl.launch_kwargs("cpu") == {"PDL": False}
        with pdl.enabled(False):
            assert pdl._state.on is False
        assert pdl._state.on is True
    assert pdl._state.on is False


@pytest.mark.cuda
def test_autotune_rejects_a_candidate_with_wrong_logits_cuda(rng, monkeypatch):
    """Speed alone never picks a mode: a fused step that returns wrong logits (here negated) is
    recorded in slot.errors and never chosen, however fast it is."""
    import falcon_mamba.decode_step as ds

    real = ds._fused_step
    monkeypatch.setattr(ds, "_fused_step", lambda *a, **k: -real(*a, **k))
    model = _model("tiny", torch.float32, "cuda")
    slot = GraphDecoder(model).slot(1)
    assert {"fused", "fused+pdl"} & set(slot.errors) and not {"fused", "fused+pdl"} & set(slot.timings)
    assert slot.mode != "fused"
    assert "cublas" in slot.timings and "triton_gemv" in slot.timings


@pytest.mark.parametrize("name,value", [("FALCON_MAMBA_GEMV", "cuBLAS"), ("FALCON_MAMBA_PDL", "yes")])
def test_unknown_env_choice_is_a_user_error(name, value, monkeypatch, rng):
    from falcon_mamba.errors import UserError

    monkeypatch.setenv(name, value)
    model = _model("tiny")
    with pytest.raises(UserError, match=name):
        GraphDecoder(model, use_graph=False).slot(1)
