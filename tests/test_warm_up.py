"""The serving engine's warm-up (Engine.warm_up): after it, requests never wait for a Triton compile.

Triton compiles a kernel variant per specialisation of its arguments (integers equal to 1 or
divisible by 16, pointers aligned to 16 bytes, the launch configuration), and a compile of the 7B's
kernels takes 1-3 s on the H200 during which every request of the step waits. The cuda test drives
the engine the way a burst of clients does (prompts of many lengths, batches of many sizes, rows
joining at odd offsets of the pool, sampled and greedy, with and without a repetition penalty) and
counts the compiles after the warm-up: none. The CPU tests check that the warm-up leaves the pool's
rows and sampling table as they were.
"""

import os

import pytest
import torch

from falcon_mamba.config import ModelConfig
from falcon_mamba.engine.engine import Engine, EngineConfig
from falcon_mamba.engine.runner import Runner
from falcon_mamba.engine.state_pool import StatePool
from falcon_mamba.model import FalconMamba
from falcon_mamba.sampling import SamplingParams
from falcon_mamba.tokenizer import load_tokenizer
from tests.conftest import FALCON_TOKENIZER

TINY = ModelConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=65024)


def _model(device):
    torch.manual_seed(0)
    with torch.device(device):
        return FalconMamba(TINY).eval()


def test_sampler_warm_up_leaves_the_pool_as_it_was():
    model = _model("cpu")
    pool = StatePool(model.config, 4, model.dtype, model.device)
    pool.tokens.random_(0, 1000)
    before = pool.tokens.clone(), pool.sampler_rows(0, 4).pos.clone()
    Runner(model, pool).warm_sampler()
    assert torch.equal(pool.tokens, before[0]) and torch.equal(pool.sampler_rows(0, 4).pos, before[1])


@pytest.mark.cuda
def test_no_triton_compile_after_the_warm_up_cuda():
    from triton import knobs

    model = _model("cuda").to_dtype(torch.bfloat16)
    tok = load_tokenizer(os.path.dirname(FALCON_TOKENIZER))
    eng = Engine(model, tok, EngineConfig(num_slots=48, max_waiting=256, prefill_chunk=64))
    eng.warm_up()
    compiled = []
    hook = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = lambda *, repr, **_: compiled.append(repr[:160])
    try:
        gen = torch.Generator().manual_seed(0)
        params = [SamplingParams(max_new_tokens=12, temperature=0.0),
                  SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=1),
                  SamplingParams(max_new_tokens=12, temperature=1.0, top_k=40, repetition_penalty=1.3,
                                 seed=2)]
        reqs, i = [], 0
        with torch.inference_mode():
            for wave in (1, 2, 3, 5, 7, 13, 21, 33):  # joining while earlier waves decode
                for _ in range(wave):
                    n = int(torch.randint(1, 150, (1,), generator=gen))
                    ids = torch.randint(11, 4000, (n,), generator=gen).tolist()
                    reqs.append(eng.submit(ids, params[i % 3]))
                    i += 1
                for _ in range(3):
                    eng.run_step()
            eng.run_until(lambda: all(r.finished for r in reqs))
    finally:
        knobs.runtime.jit_post_compile_hook = hook
    assert all(r.finished for r in reqs)
    assert compiled == [], f"{len(compiled)} Triton compiles after the warm-up, first: {compiled[:3]}"
