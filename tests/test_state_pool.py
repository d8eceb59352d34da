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
    half = slot_bytes(CFG, dtype, torch.bfloat16)  # a bf16 SSM state (serve --state-dtype)
    assert half == State.zeros(CFG, 1, dtype, ssm_dtype=torch.bfloat16).nbytes < slot_bytes(CFG, dtype)
    assert StatePool(CFG, 3, dtype, ssm_dtype=torch.bfloat16).nbytes == (3 + PAD_ROWS) * half
    with pytest.raises(ValueError, match="ssm_dtype"):
        StatePool(CFG, 3, dtype, ssm_dtype=torch.float16)


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
    joins, parks and frees (one key or several at once); every key's state moves with it, and a
    decoding key's per-row tables too (a parked row's tables are set when it joins)."""
    pool = StatePool(CFG, 9)
    order = random.Random(0)
    expect: dict = {}
    for step in range(200):
        live = list(expect)
        action = order.random()
        if live and action < 0.3:
            ks = order.sample(live, order.randint(1, min(3, len(live))))
            if len(ks) == 1 and order.random() < 0.5:
                pool.free(ks[0])
            else:
                pool.free_many(ks)
            for k in ks:
                del expect[k]
        elif len(live) < pool.num_slots and action < 0.75:
            k = f"k{step}"
            st = State.zeros(CFG, 1)
            _fill_random(st, rng)
            if action < 0.55:
                row = pool.park(k)
                assert row >= pool.num_rows - len(pool._top)
            else:
                row = pool.join([k])
                assert row == pool.num_decoding - 1
            pool.write(k, st)
            pool.tokens[pool.row(k)] = step
            expect[k] = (st, step)
        else:  # some parked keys join the decode rows at once (their prompts ended together)
            parked = [k for k in live if k in pool._top]
            if parked:
                ks = order.sample(parked, order.randint(1, len(parked)))
                first = pool.join(ks)
                for i, k in enumerate(ks):
                    assert pool.row(k) == first + i
                    pool.write(k, expect[k][0])
                    pool.tokens[first + i] = expect[k][1]
        # the invariants: decoding rows [0, n), parked rows packed at the top, outside bucket(n)
        n, m = pool.num_decoding, len(pool._top)
        assert sorted(pool.row(k) for k in pool.decode_keys()) == list(range(n))
        assert sorted(pool.row(k) for k in pool._top) == list(range(pool.num_rows - m, pool.num_rows))
        assert bucket(n) <= pool.num_rows - m if n else True
        for k, (st, tok) in expect.items():
            got = pool.read(k)
            assert torch.equal(got.conv, st.conv) and torch.equal(got.ssm, st.ssm), (step, k)
            if k in pool._dec:
                assert int(pool.tokens[pool.row(k)]) == tok, (step, k)


def test_unwritten_parked_rows_and_waves_move_few_rows(monkeypatch):
    """A wave of fresh prompts joining together moves no parked row (none holds a state yet),
    and a wave of answers ending together moves its rows in one gather per table."""
    pool = StatePool(CFG, 12)
    moves = []
    real = pool._move
    monkeypatch.setattr(pool, "_move",
                        lambda pairs, tensors: (moves.append(list(pairs)), real(pairs, tensors)))
    keys = [f"p{i}" for i in range(10)]
    for k in keys:
        pool.park(k)
    pool.write("p9", State.zeros(CFG, 1))  # the one parked row holding a state (a long prompt)
    assert pool.join(keys[:4]) == 0
    # the holes of p0..p3 are filled by p6..p9; only p9's row holds a state, so only it moves
    assert moves == [[(pool.num_rows - 1 - 9, pool.num_rows - 1 - 3)]]
    moves.clear()
    pool.join(keys[4:9])
    pool.free_many(keys[:3])
    # the join: p9 (written) packs down into the one parked row left; the frees: decoding rows
    # 6, 7, 8 fill 0, 1, 2 in one move of three rows
    assert [len(m) for m in moves] == [1, 3]
    assert pool.decode_keys() == ["p6", "p7", "p8", "p3", "p4", "p5"]


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


def test_write_many_copies_a_batchs_rows_together(rng, monkeypatch):
    """States that are consecutive rows of one batch's outputs, written to consecutive rows, go
    in one write_rows; others (a repeated state, a gap in the rows) one by one; every row ends up
    with its own state."""
    pool = StatePool(CFG, 8)
    pool.join([f"k{i}" for i in range(7)])
    batch = State.zeros(CFG, 4)
    _fill_random(batch, rng)
    other = State.zeros(CFG, 1)
    _fill_random(other, rng)
    rows = [State(CFG, batch.conv[:, b:b + 1], batch.ssm[:, b:b + 1]) for b in range(4)]
    calls = []
    real = pool.write_rows
    monkeypatch.setattr(pool, "write_rows", lambda first, st: (calls.append((first, st.batch_size)),
                                                               real(first, st)))
    pool.write_many([(0, rows[0]), (1, rows[1]), (2, rows[2]), (3, rows[2]), (4, other), (6, rows[3])])
    assert calls == [(0, 3), (3, 1), (4, 1), (6, 1)]
    for r, st in ((0, rows[0]), (1, rows[1]), (2, rows[2]), (3, rows[2]), (4, other), (6, rows[3])):
        assert torch.equal(pool.state.ssm[:, r:r + 1], st.ssm)
        assert torch.equal(pool.state.conv[:, r:r + 1], st.conv)


def test_a_wave_larger_than_the_move_scratch_keeps_every_state(rng):
    """Answers ending together in a wave of more rows than MOVE_ROWS: the rows left move in rounds
    through the pool's one scratch (allocated once, MOVE_ROWS rows: no allocation that grows with
    the wave), and every key keeps its state and its tables."""
    from falcon_mamba.engine.state_pool import MOVE_ROWS

    pool = StatePool(CFG, 40)
    keys = [f"k{i}" for i in range(36)]
    pool.join(keys)
    states = {}
    for i, k in enumerate(keys):
        st = State.zeros(CFG, 1)
        _fill_random(st, rng)
        pool.write(k, st)
        pool.tokens[i] = i
        states[k] = (st, i)
    bufs = None
    for wave in (keys[:20:2] + keys[1:9:2], keys[20:26]):  # 14 holes, then 6
        pool.free_many(wave)
        for k in wave:
            del states[k]
        if bufs is None:
            bufs = {dt: b.data_ptr() for dt, b in pool._move_buf.items()}
            assert all(b.numel() == MOVE_ROWS * pool.state.ssm[:, 0].numel()
                       for dt, b in pool._move_buf.items() if dt == pool.state.ssm.dtype)
        assert {dt: b.data_ptr() for dt, b in pool._move_buf.items()} == bufs  # the same scratch
        assert sorted(pool.row(k) for k in states) == list(range(len(states)))
        for k, (st, tok) in states.items():
            got = pool.read(k)
            assert torch.equal(got.conv, st.conv) and torch.equal(got.ssm, st.ssm), k
            assert int(pool.tokens[pool.row(k)]) == tok, k
