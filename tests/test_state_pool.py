"""The pool of state slots: sizing, row bookkeeping, and decode on a contiguous view."""

import random

import pytest
import torch

from falcon_mamba.config import PRESETS
from falcon_mamba.engine.state_pool import StatePool, slot_bytes, slots_for_budget
from falcon_mamba.errors import UserError
from falcon_mamba.model import FalconMamba
from falcon_mamba.state import State
from tests.helpers import assert_close

CFG = PRESETS["tiny-odd"]


def _fill_random(state: State, rng: torch.Generator) -> None:
    state.conv.copy_(torch.randn(state.conv.shape, generator=rng))
    state.ssm.copy_(torch.randn(state.ssm.shape, generator=rng))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_bytes_is_one_rows_state(dtype):
    assert slot_bytes(CFG, dtype) == State.zeros(CFG, 1, dtype).nbytes
    assert StatePool(CFG, 3, dtype).nbytes == 3 * slot_bytes(CFG, dtype)


def test_slots_for_budget():
    per = slot_bytes(CFG, torch.float32)
    assert slots_for_budget(CFG, torch.float32, 10 * per + per - 1, 64) == 10
    assert slots_for_budget(CFG, torch.float32, 1000 * per, 64) == 64
    with pytest.raises(UserError, match="state-memory"):
        slots_for_budget(CFG, torch.float32, per - 1, 64)
    # The 7B: ~37 MiB a sequence (bf16 conv state, fp32 SSM state).
    assert slot_bytes(PRESETS["falcon-mamba-7b"], torch.bfloat16) == 64 * 3 * 8192 * 2 + 64 * 8192 * 16 * 4


def test_keys_keep_their_contents_through_batch_views(rng):
    pool = StatePool(CFG, 6)
    keys = ["a", "b", "c", "d", "e"]
    for k in keys:
        pool.alloc(k)
    _fill_random(pool.state, rng)
    expect = {k: pool.read(k) for k in keys}
    order = random.Random(0)
    for _ in range(20):
        chosen = order.sample(keys, order.randint(1, len(keys)))
        view, row_keys = pool.batch_view(chosen)
        assert sorted(row_keys) == sorted(chosen) and view.batch_size == len(chosen)
        for i, k in enumerate(row_keys):
            assert pool.row(k) == i
        for k in keys:
            got = pool.read(k)
            assert torch.equal(got.conv, expect[k].conv) and torch.equal(got.ssm, expect[k].ssm), k
    # The view shares the pool's memory: writing through it writes the slots.
    view, row_keys = pool.batch_view(["c", "a"])
    view.ssm.add_(1.0)
    assert torch.equal(pool.read("c").ssm, expect["c"].ssm + 1)
    assert torch.equal(pool.read("b").ssm, expect["b"].ssm)


def test_alloc_free_write_copy(rng):
    pool = StatePool(CFG, 3)
    for k in "xyz":
        pool.alloc(k)
    with pytest.raises(RuntimeError):
        pool.alloc("w")
    src = State.zeros(CFG, 1)
    _fill_random(src, rng)
    pool.write("y", src)
    assert torch.equal(pool.read("y").conv, src.conv)
    pool.copy("y", ["x", "z"])
    for k in "xz":
        assert torch.equal(pool.read(k).ssm, src.ssm)
    pool.free("x")
    assert "x" not in pool and pool.num_used == 2
    assert pool.alloc("w") == 0


def test_decode_on_the_pool_view_equals_each_sequence_alone(rng):
    torch.manual_seed(0)
    model = FalconMamba(CFG).eval()
    pool = StatePool(CFG, 5)
    alone = {}
    for k in "abcd":  # a random state per sequence, as if each had read a different prompt
        pool.alloc(k)
        st = State.zeros(CFG, 1)
        _fill_random(st, rng)
        st.ssm.mul_(0.1)
        pool.write(k, st)
        alone[k] = st
    tokens = {k: int(torch.randint(0, CFG.vocab_size, (1,), generator=rng)) for k in alone}
    for step_keys in (["c", "a", "d"], ["b", "d"], ["a", "b", "c", "d"]):
        view, row_keys = pool.batch_view(step_keys)
        logits = model.step(torch.tensor([tokens[k] for k in row_keys]), view)
        for i, k in enumerate(row_keys):
            ref = model.step(torch.tensor([tokens[k]]), alone[k])
            assert_close(logits[i], ref[0], 6e-4, 2e-3, f"logits of {k}")
            assert_close(pool.read(k).ssm, alone[k].ssm, 6e-4, 2e-3, f"state of {k}")
