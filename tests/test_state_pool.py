"""The pool of state slots: sizing, row bookkeeping, and decode on a contiguous view."""

import random

import pytest
import torch

from falcon_mamba.config import PRESETS
from falcon_mamba.engine.state_pool import PAD_ROWS, StatePool, bucket, slot_bytes, slots_for_budget
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
    assert StatePool(CFG, 3, dtype).nbytes == (3 + PAD_ROWS) * slot_bytes(CFG, dtype)


def test_slots_for_budget():
    per = slot_bytes(CFG, torch.float32)
    assert slots_for_budget(CFG, torch.float32, (10 + PAD_ROWS) * per + per - 1, 64) == 10
    assert slots_for_budget(CFG, torch.float32, 1000 * per, 64) == 64
    with pytest.raises(UserError, match="state-memory"):
        slots_for_budget(CFG, torch.float32, PAD_ROWS * per, 64)
    assert slot_bytes(PRESETS["falcon-mamba-7b"], torch.bfloat16) == 64 * 3 * 8192 * 2 + 64 * 8192 * 16 * 4


def test_buckets_cover_every_batch_within_the_padding():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 63, 64, 65, 256)] == \
        [1, 2, 4, 4, 8, 8, 16, 16, 24, 64, 64, 72, 256]
    assert max(bucket(n) - n for n in range(1, 2000)) == PAD_ROWS


def test_rows_keep_their_contents_through_joins_leaves_and_parking(rng):
    """Decoding rows stay packed at the front and parked rows at the top, whatever the order of
    joins, parks and frees; every key's state (and its per-row tables) moves with it."""
    pool = StatePool(CFG, 6)
    order = random.Random(0)
    expect: dict = {}
    for step in range(60):
        live = list(expect)
        action = order.random()
        if live and action < 0.35:
            k = order.choice(live)
            pool.free(k)
            del expect[k]
        elif len(live) < pool.num_slots:
            k = f"k{step}"
            st = State.zeros(CFG, 1)
            _fill_random(st, rng)
            if action < 0.7:
                row = pool.park(k)
                assert row >= pool.num_rows - len(pool._top)
            else:
                row = pool.join([k])
                assert row == pool.num_decoding - 1
            pool.write(k, st)
            pool.tokens[pool.row(k)] = step
            expect[k] = (st, step)
        elif live:  # a parked key joins the decode rows
            parked = [k for k in live if k in pool._top]
            if parked:
                k = parked[0]
                st, tok = expect[k]
                row = pool.join([k])
                pool.write(k, st)
                pool.tokens[row] = tok
        # the invariants: decoding rows [0, n), parked rows packed at the top, outside bucket(n)
        n, m = pool.num_decoding, len(pool._top)
        assert sorted(pool.row(k) for k in pool.decode_keys()) == list(range(n))
        assert sorted(pool.row(k) for k in pool._top) == list(range(pool.num_rows - m, pool.num_rows))
        assert bucket(n) <= pool.num_rows - m if n else True
        for k, (st, tok) in expect.items():
            got = pool.read(k)
            assert torch.equal(got.conv, st.conv) and torch.equal(got.ssm, st.ssm), (step, k)
            assert int(pool.tokens[pool.row(k)]) == tok, (step, k)


def test_the_pool_refuses_more_than_its_slots():
    pool = StatePool(CFG, 3)
    pool.join(["a", "b"])
    pool.park("c")
    with pytest.raises(RuntimeError):
        pool.park("d")
    with pytest.raises(RuntimeError):
        pool.join(["d"])
    with pytest.raises(KeyError):
        pool.join(["a"])
    pool.free("b")
    assert pool.join(["c"]) == 1 and pool.num_used == 2


def test_sampling_rows_are_set_per_row():
    from falcon_mamba.sampling import SamplingParams

    pool = StatePool(CFG, 4)
    pool.join(["a", "b", "c"])
    params = [SamplingParams(temperature=0.5, top_k=10**9, top_p=0.9, min_p=0.1, repetition_penalty=1.2),
              SamplingParams(temperature=0.0)]
    pool.set_sampling(1, params, [7, 8], [[3, 5, 3], [4]])
    t = pool.sampling
    assert t.temperature[1:3].tolist() == [0.5, 0.0] and t.top_k[1:3].tolist() == [0, 0]
    assert t.penalty[1:3].tolist() == pytest.approx([1.2, 1.0]) and t.seed[1:3].tolist() == [7, 8]
    assert t.pos[1:3].tolist() == [0, 0]
    assert t.seen[1].nonzero()[:, 0].tolist() == [3, 5] and not t.seen[2].any()
    rows = pool.sampler_rows(1, 2)
    assert rows.temperature.data_ptr() == t.temperature[1:].data_ptr()


def test_decode_on_the_pool_rows_equals_each_sequence_alone(rng):
    torch.manual_seed(0)
    model = FalconMamba(CFG).eval()
    pool = StatePool(CFG, 5)
    alone = {}
    for k in "abcd":  # a random state per sequence, as if each had read a different prompt
        st = State.zeros(CFG, 1)
        _fill_random(st, rng)
        st.ssm.mul_(0.1)
        pool.join([k])
        pool.write(k, st)
        alone[k] = st
    tokens = {k: int(torch.randint(0, CFG.vocab_size, (1,), generator=rng)) for k in alone}
    for leave in ("b", "d"):
        keys = pool.decode_keys()
        n = len(keys)
        logits = model.step(torch.tensor([tokens[k] for k in keys]), pool.decode_view(n))
        for i, k in enumerate(keys):
            ref = model.step(torch.tensor([tokens[k]]), alone[k])
            assert_close(logits[i], ref[0], 6e-4, 2e-3, f"logits of {k}")
            assert_close(pool.read(k).ssm, alone[k].ssm, 6e-4, 2e-3, f"state of {k}")
        pool.free(leave)
        alone.pop(leave)
