"""The fused decode step (decode/step.py), its modes (decode/modes.py) and the decode graphs over a
state pool's rows (decode/graphs.py) against model.step.

On CPU the fused step runs in Triton's interpreter, without graphs (the same body the graphs
capture); the cuda-marked tests capture real graphs.
"""

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from falcon_mamba import FalconMamba, get_preset  # noqa: E402
from falcon_mamba.decode.graphs import DecodeGraphs  # noqa: E402
from falcon_mamba.decode.modes import MODES, DecodeOptions  # noqa: E402
from falcon_mamba.decode.step import fast_step, xproj_merge_supported  # noqa: E402
from falcon_mamba.engine.state_pool import StatePool  # noqa: E402
from falcon_mamba.errors import UserError  # noqa: E402
from falcon_mamba.sampling import SamplingParams  # noqa: E402
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


class PoolStepper:
    """B sequences in a state pool's decode rows, stepped by DecodeGraphs with greedy sampling:
    step(tokens) -> logits (B, V), like model.step on the same state."""

    def __init__(self, model, state, options=None, fast=None, tuning_cache="", ssm_dtype=torch.float32):
        B = state.batch_size
        self.B = B
        self.pool = StatePool(model.config, B, model.dtype, model.device, ssm_dtype)
        self.pool.join(list(range(B)))
        self.pool.write_rows(0, state)
        self.pool.set_sampling(0, [SamplingParams(temperature=0.0)] * B, list(range(B)))
        opts = options or DecodeOptions()
        if opts.tuning_cache is None:
            opts = dataclasses.replace(opts, tuning_cache=tuning_cache)
        self.graphs = DecodeGraphs(model, self.pool, opts, fast=fast)

    def step(self, tokens_B):
        self.pool.tokens[:self.B].copy_(tokens_B)
        with torch.inference_mode():
            logits = self.graphs.step(self.B)
        greedy = self.pool.tokens[:self.B].clone()
        assert torch.equal(greedy, logits[:self.B].argmax(-1)), "the sampler's greedy token"
        return logits[:self.B].clone()

    def state(self):
        return self.pool.gather(range(self.B))


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


@pytest.mark.parametrize("B,mode", [(3, "auto"), (1, "triton"), (1, "triton_cx")])
def test_pool_steps_match_model_step_without_graphs(B, mode, rng):
    """The graphs' body, eager, on the pool's rows (the fused step under the interpreter): two
    steps against model.step, then the states."""
    model = _model("tiny-odd")
    state = _prefilled(model, B, rng)
    twin = state.clone()
    dec = PoolStepper(model, state, DecodeOptions(mode=mode), fast=True)
    tok = torch.randint(0, model.config.vocab_size, (B,), generator=rng)
    _steps_match(dec, model, twin, tok, 2, 1e-4, 1e-4, f"logits {mode} B={B}")
    got = dec.state()
    assert_close(got.ssm, twin.ssm, 1e-5, 1e-5, "ssm state")
    assert_close(got.conv, twin.conv, 1e-6, 1e-6, "conv state")
    want = "cublas" if mode == "auto" else mode
    assert dec.graphs.mode_for(B)[0].name == (want if B == 1 else "cublas")


def _steps_match(dec, model, twin, tok, steps: int, rtol: float, atol: float, what: str) -> None:
    """`steps` greedy steps of the pool stepper beside model.step on the twin state, the logits
    compared at each."""
    for _ in range(steps):
        ref = model.step(tok, twin)
        assert_close(dec.step(tok), ref, rtol, atol, what)
        tok = ref.argmax(-1)


def _bf16_twin(state):
    """The state as a bf16 state pool holds it: the SSM state rounded to bf16."""
    from falcon_mamba.state import State

    return State(state.config, state.conv.clone(), state.ssm.to(torch.bfloat16))


@pytest.mark.parametrize("B", [3, 6])
def test_bf16_state_pool_steps_match_model_step_on_a_bf16_state(B, rng):
    """A bf16 pool (serve --state-dtype bfloat16) under the fused step: the in-kernel dt_proj (3
    rows) and the rows kernel (6) against model.step on a bf16 SSM state (the reference op reads
    it into fp32 and rounds the new state once, as the kernels do)."""
    model = _model("tiny-odd")
    state = _prefilled(model, B, rng)
    twin = _bf16_twin(state)
    dec = PoolStepper(model, state, DecodeOptions(), fast=True, ssm_dtype=torch.bfloat16)
    tok = torch.randint(0, model.config.vocab_size, (B,), generator=rng)
    _steps_match(dec, model, twin, tok, 3, 1e-3, 1e-3, f"logits B={B}")
    got = dec.state()
    assert got.ssm.dtype == twin.ssm.dtype == torch.bfloat16
    assert_close(got.ssm.float(), twin.ssm.float(), 1e-2, 1e-3, "ssm state")


def test_cpu_steps_run_model_step(rng):
    """Where the fused kernels cannot run (the CPU, no interpreter forcing), the body is model.step."""
    model = _model("tiny")
    state = _prefilled(model, 2, rng)
    twin = state.clone()
    dec = PoolStepper(model, state)
    assert not dec.graphs.fast and not dec.graphs.use_graphs
    tok = torch.tensor([1, 2])
    assert_close(dec.step(tok), model.step(tok, twin), 1e-5, 1e-5, "logits")


def test_forced_modes_that_cannot_run_are_user_errors(rng):
    """--decode-mode triton_xp needs int4 in_proj/x_proj on the packed int4 kernel (a GPU);
    triton_cx a fusable dt_proj: elsewhere a UserError that names the mode."""
    from falcon_mamba.quant import quantize_model

    model = quantize_model(_model("tiny"), bits=4, group_size=32)
    assert not xproj_merge_supported(model)
    with pytest.raises(UserError, match="triton_xp"):
        DecodeOptions(mode="triton_xp").candidates(model)
    NL = get_preset("tiny-odd").num_hidden_layers
    m2 = quantize_model(_model("tiny-odd"), bits=8, group_size=None,
                        modules=[f"backbone.layers.{i}.mixer.dt_proj" for i in range(NL)])
    for blk in m2.backbone.layers:  # a bias added inside dt_proj's forward cannot be fused
        blk.mixer.dt_proj.bias_in_forward = True
    with pytest.raises(UserError, match="triton_cx"):
        DecodeOptions(mode="triton_cx").candidates(m2)
    assert [m.name for m in DecodeOptions().candidates(m2)] == ["cublas", "triton"]


@pytest.mark.parametrize("kw,word", [({"mode": "fused"}, "decode mode"), ({"pdl": "yes"}, "pdl")])
def test_unknown_options_are_user_errors(kw, word):
    with pytest.raises(UserError, match=word):
        DecodeOptions(**kw)


def test_the_registry_holds_only_measured_modes():
    assert list(MODES) == ["cublas", "cublas_lt", "split_x", "split_x_lt", "triton", "triton_cx",
                           "triton_xp"]
    off = {"gemv": False, "conv_fold": False, "xproj_merge": False, "lt_out_proj": False, "split_x": False}
    assert MODES["triton_cx"].step_kwargs(1) == {**off, "gemv": True, "conv_fold": True}
    assert MODES["triton_cx"].step_kwargs(4) == off
    # split_x only above the rows whose SSM kernel runs dt_proj itself (DT_PROJ_MAX_BATCH = 4)
    assert MODES["split_x_lt"].step_kwargs(4) == {**off, "lt_out_proj": True}
    assert MODES["split_x_lt"].step_kwargs(5) == {**off, "lt_out_proj": True, "split_x": True}


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


def test_tuning_cache_round_trip(tmp_path):
    from falcon_mamba.decode import tuning

    dev = torch.device("cpu")
    assert tuning.load(tmp_path, dev, "k") is None
    tuning.store(tmp_path, dev, "k", {"mode": "triton_cx", "pdl": True})
    tuning.store(tmp_path, dev, "k2", {"mode": "cublas"})
    assert tuning.load(tmp_path, dev, "k") == {"mode": "triton_cx", "pdl": True}
    (f,) = tmp_path.glob("*.json")
    f.write_text("{not json")  # a damaged file is ignored, then replaced
    assert tuning.load(tmp_path, dev, "k") is None
    tuning.store(tmp_path, dev, "k", {"mode": "triton"})
    assert tuning.load(tmp_path, dev, "k") == {"mode": "triton"}
    assert tuning.cache_dir("") is None and tuning.cache_dir(str(tmp_path)) == tmp_path


def test_out_proj_with_a_zero_bias_is_the_same_step(rng):
    """The cublas_lt mode's out_proj, F.linear with a zero bias, leaves the step as it was: the
    same logits and states bit for bit (the fused step under the interpreter, 3 rows)."""
    model = _model("tiny-odd")
    state = _prefilled(model, 3, rng)
    twin = state.clone()
    tok = torch.randint(0, model.config.vocab_size, (3,), generator=rng)
    zero = torch.zeros(model.config.hidden_size)
    plain = fast_step(model, tok, state.conv, state.ssm)
    lt = fast_step(model, tok, twin.conv, twin.ssm, out_zero_bias=zero)
    assert torch.equal(plain, lt) and torch.equal(state.ssm, twin.ssm) and torch.equal(state.conv, twin.conv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_xproj_step_matches_the_cublas_step(dtype, rng):
    """split_x (x_proj as split-K partials summed with dt_r's norm, ops/triton_xproj.py) gives the
    step of the plain one to rounding: 6 rows (above DT_PROJ_MAX_BATCH), the fused step under the
    interpreter; at 4 rows the flag changes nothing (bit for bit)."""
    model = _model("tiny-odd", dtype)
    for B in (6, 4):
        state = _prefilled(model, B, rng)
        twin = state.clone()
        tok = torch.randint(0, model.config.vocab_size, (B,), generator=rng)
        plain = fast_step(model, tok, state.conv, state.ssm)
        split = fast_step(model, tok, twin.conv, twin.ssm, split_x=True)
        if B == 4:
            assert torch.equal(plain, split) and torch.equal(state.ssm, twin.ssm)
            continue
        tol = (1e-4, 1e-4) if dtype == torch.float32 else (3e-2, 5e-2)
        assert_close(split, plain, *tol, "logits")
        assert_close(twin.ssm, state.ssm, *tol, "ssm state")
        assert torch.equal(twin.conv[0], state.conv[0])  # later layers' inputs differ by rounding
        assert_close(twin.conv, state.conv, *tol, "conv state")


def test_batched_candidates(rng):
    """Above one row the candidates are cublas and, where out_proj is a bias-free dense Linear on
    CUDA, cublas_lt; a forced batch-1 mode means cublas there, and cublas_lt is never a batch-1
    candidate of its own (at one row it is the cublas step)."""
    cpu = _model("tiny")
    assert [m.name for m in DecodeOptions().candidates(cpu, 4)] == ["cublas"]
    assert [m.name for m in DecodeOptions(mode="triton").candidates(cpu, 4)] == ["cublas"]
    for name in ("cublas_lt", "split_x", "split_x_lt"):  # CUDA only
        with pytest.raises(UserError, match=name):
            DecodeOptions(mode=name).candidates(cpu, 8)
        assert name not in [m.name for m in DecodeOptions().candidates(cpu)]
    assert "cublas_lt" not in [m.name for m in DecodeOptions().candidates(cpu)]
    lt = MODES["cublas_lt"]
    assert not lt.step_kwargs(1)["lt_out_proj"] and lt.step_kwargs(4)["lt_out_proj"]
    assert not any(MODES["cublas"].step_kwargs(r)["lt_out_proj"] for r in (1, 4))
    # the mode routes: DecodeGraphs passes the zero bias only where step_kwargs asks for it
    g = DecodeGraphs(cpu, StatePool(cpu.config, 4, cpu.dtype, cpu.device), fast=True)
    assert g._zero_bias is not None and g._zero_bias.shape == (cpu.config.hidden_size,)
    assert not g._zero_bias.any()


# ---- CUDA: real graphs -------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
def test_graphs_match_model_step_cuda(dtype, B, rng):
    model = _model("tiny", dtype, "cuda")
    state = _prefilled(model, B, rng)
    twin = state.clone()
    dec = PoolStepper(model, state)
    assert dec.graphs.use_graphs
    tok = torch.randint(0, model.config.vocab_size, (B,), generator=rng).cuda()
    tol = (1e-4, 1e-4) if dtype == torch.float32 else (3e-2, 5e-2)
    for _ in range(3):  # replays after the capture
        ref = model.step(tok, twin)
        assert_close(dec.step(tok), ref, *tol, "logits")
        tok = ref.argmax(-1)
    assert_close(dec.state().ssm, twin.ssm, *tol, "ssm state")


@pytest.mark.cuda
@pytest.mark.parametrize("B", [1, 3, 64])
def test_graphs_on_a_bf16_state_pool_match_model_step_cuda(B, rng):
    model = _model("tiny", torch.bfloat16, "cuda")
    state = _prefilled(model, B, rng)
    twin = _bf16_twin(state)
    dec = PoolStepper(model, state, ssm_dtype=torch.bfloat16)
    assert dec.graphs.use_graphs
    tok = torch.randint(0, model.config.vocab_size, (B,), generator=rng).cuda()
    _steps_match(dec, model, twin, tok, 3, 3e-2, 5e-2, "logits")
    assert_close(dec.state().ssm.float(), twin.ssm.float(), 3e-2, 5e-2, "ssm state")


@pytest.mark.cuda
@pytest.mark.parametrize("quant", [None, (8, None), (4, 32)])
def test_autotune_times_every_mode_and_keeps_the_fastest_cuda(quant, rng, tmp_path):
    """Batch 1 on CUDA: every supported mode is timed with and without PDL, the fastest kept;
    whichever it keeps, replays match model.step; a second decoder reads the choice from the
    tuning cache without timing."""
    from falcon_mamba.ops import pdl
    from falcon_mamba.quant import quantize_model

    model = _model("tiny", torch.float32, "cuda")
    if quant is not None:
        quantize_model(model, bits=quant[0], group_size=quant[1])
    state = _prefilled(model, 1, rng)
    twin = state.clone()
    dec = PoolStepper(model, state, tuning_cache=str(tmp_path))
    g = dec.graphs
    mode, use_pdl = g.batch1_choice()
    modes = {m.name for m in DecodeOptions().candidates(model)}
    every = modes | ({m + "+pdl" for m in modes} if pdl.supported(model.device) else set())
    assert set(g.timings) | set(g.errors) == every and not g.errors, g.errors
    assert mode.name + ("+pdl" if use_pdl else "") == min(g.timings, key=g.timings.get)
    assert not g.tuned_from_cache
    tok = torch.randint(0, model.config.vocab_size, (1,), generator=rng).cuda()
    for _ in range(3):
        ref = model.step(tok, twin)
        assert_close(dec.step(tok), ref, 1e-4, 1e-4, f"logits ({mode.name})")
        tok = ref.argmax(-1)
    again = PoolStepper(model, state, tuning_cache=str(tmp_path)).graphs
    assert again.batch1_choice() == (mode, use_pdl) and again.tuned_from_cache


@pytest.mark.cuda
def test_buckets_time_cublas_and_cublas_lt_and_keep_the_fastest_cuda(rng, tmp_path):
    """Above one row on CUDA: each bucket times cublas and cublas_lt (with PDL where the GPU has
    it), keeps the faster, and its replays match model.step; a second decoder reads the bucket's
    choice from the tuning cache."""
    model = _model("tiny", torch.bfloat16, "cuda")
    state = _prefilled(model, 3, rng)
    twin = state.clone()
    dec = PoolStepper(model, state, tuning_cache=str(tmp_path))
    g = dec.graphs
    mode, use_pdl = g.mode_for(3)
    times = g.bucket_timings[4]
    assert {n.split("+")[0] for n in times} == {"cublas", "cublas_lt"} and not g.bucket_errors[4]
    g.mode_for(6)  # above DT_PROJ_MAX_BATCH rows the split x_proj modes too
    assert ({n.split("+")[0] for n in g.bucket_timings[8]} == {"cublas", "cublas_lt", "split_x", "split_x_lt"}
            and not g.bucket_errors[8]), g.bucket_errors[8]
    assert mode.name + ("+pdl" if use_pdl else "") == min(times, key=times.get)
    assert not g.buckets_from_cache
    tok = torch.randint(0, model.config.vocab_size, (3,), generator=rng).cuda()
    _steps_match(dec, model, twin, tok, 3, 3e-2, 5e-2, f"logits ({mode.name})")
    again = PoolStepper(model, state, tuning_cache=str(tmp_path)).graphs
    assert again.mode_for(3) == (mode, use_pdl) and again.buckets_from_cache == {4}
    assert again.mode_for(8) == g.mode_for(8) and again.buckets_from_cache == {4, 8}


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["cublas", "cublas_lt", "split_x", "split_x_lt"])
@pytest.mark.parametrize("B", [5, 64])
def test_forced_batched_modes_match_model_step_cuda(mode, B, rng):
    model = _model("tiny", torch.bfloat16, "cuda")
    state = _prefilled(model, B, rng)
    twin = state.clone()
    dec = PoolStepper(model, state, DecodeOptions(mode=mode))
    assert dec.graphs.mode_for(B)[0].name == mode
    tok = torch.randint(0, model.config.vocab_size, (B,), generator=rng).cuda()
    _steps_match(dec, model, twin, tok, 3, 3e-2, 5e-2, f"logits ({mode})")


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["cublas", "triton", "triton_cx"])
@pytest.mark.parametrize("B", [1, 3])
def test_pdl_graphs_match_model_step_cuda(mode, B, rng):
    """Programmatic dependent launch forced on: every kernel waits for the previous grid before
    reading, so replays equal model.step (bf16, 7B-like widths so that the grids are many waves
    and a missing wait would race)."""
    from falcon_mamba.config import ModelConfig
    from falcon_mamba.ops import pdl

    if mode != "cublas" and B > 1:
        pytest.skip("the GEMV modes are batch 1 only")
    if not pdl.supported("cuda"):
        pytest.skip("programmatic dependent launch needs a Hopper or later GPU")
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=3, vocab_size=4096)
    with torch.device("cuda"):
        model = FalconMamba(cfg).to_dtype(torch.bfloat16).eval()
    state = _prefilled(model, B, rng)
    twin = state.clone()
    dec = PoolStepper(model, state, DecodeOptions(mode=mode, pdl="on"))
    tok = torch.randint(0, cfg.vocab_size, (B,), generator=rng).cuda()
    for _ in range(4):
        ref = model.step(tok, twin)
        assert_close(dec.step(tok), ref, 3e-2, 5e-2, f"logits with PDL ({mode}, B={B})")
        tok = ref.argmax(-1)
    assert dec.graphs.mode_for(B)[1]
    assert_close(dec.state().ssm, twin.ssm, 3e-2, 5e-2, "ssm state with PDL")


@pytest.mark.cuda
def test_autotune_rejects_a_candidate_with_wrong_logits_cuda(rng, monkeypatch):
    """Speed alone never picks a mode: a step that returns wrong logits (here negated in the
    conv-folded mode) is recorded in the errors and never chosen, however fast it is."""
    import falcon_mamba.decode.step as ds

    real = ds.fast_step

    def wrong(*a, **k):
        out = real(*a, **k)
        return -out if k.get("conv_fold") else out

    monkeypatch.setattr(ds, "fast_step", wrong)
    model = _model("tiny", torch.float32, "cuda")
    g = PoolStepper(model, _prefilled(model, 1, rng)).graphs
    mode, _ = g.batch1_choice()
    cx = {"triton_cx", "triton_cx+pdl"}
    assert cx & set(g.errors) and not cx & set(g.timings)
    assert mode.name != "triton_cx" and "cublas" in g.timings and "triton" in g.timings
