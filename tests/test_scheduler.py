"""The scheduler's policy, driven by a fake step function (no model, no torch)."""

import random
import sys

import pytest

from falcon_mamba.engine.request import Request, Status
from falcon_mamba.engine.scheduler import QueueFull, Scheduler


class FakeEngine:
    """Runs plans the way the engine does, with a made-up token per step; a sequence ends after
    max_tokens tokens. Records what each step contained."""

    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.steps = []
        self.held = 0  # slots held by sequences, counted independently of the scheduler

    def step(self):
        plan = self.sched.schedule()
        self.held -= len(plan.released)
        self.held += sum(r.n for r in plan.admitted)
        assert self.held <= self.sched.num_slots
        for c in plan.prefill:
            assert c.start == c.request.num_computed, "chunks are read in order, none skipped"
            if c.is_last:
                for s in c.request.seqs:
                    self._token(s)
        for s in plan.decode:
            assert len(s.output_ids) >= 1, "decoding starts after the first token"
            self._token(s)
        self.sched.complete(plan)
        self.steps.append(plan)
        return plan

    def _token(self, s):
        s.output_ids.append(len(s.output_ids))
        if len(s.output_ids) >= s.request.params["max_tokens"]:
            s.finish("length")

    def run(self, limit=10_000):
        while self.sched.has_work:
            self.step()
            assert len(self.steps) < limit
        return self.steps


def req(prompt_len, max_tokens=3, n=1):
    return Request(list(range(prompt_len)), params={"max_tokens": max_tokens}, n=n)


def test_all_requests_finish_and_slots_are_returned():
    rng = random.Random(0)
    s = Scheduler(num_slots=5, max_waiting=100, prefill_chunk=7)
    eng = FakeEngine(s)
    reqs = [req(rng.randint(1, 40), rng.randint(1, 6), n=rng.randint(1, 3)) for _ in range(30)]
    for r in reqs:
        s.add(r)
    eng.run()
    for r in reqs:
        assert r.status is Status.FINISHED
        assert [len(q.output_ids) for q in r.seqs] == [r.params["max_tokens"]] * r.n
    assert s.free_slots == 5 and eng.held == 0
    assert max(len(p.decode) for p in eng.steps) == 5, "the slots were used in parallel"


def test_continuous_batching_joins_at_step_boundary():
    s = Scheduler(num_slots=4, prefill_chunk=100)
    eng = FakeEngine(s)
    a = req(5, max_tokens=20)
    s.add(a)
    eng.step()  # a prefilled, first token
    eng.step()
    eng.step()
    b = req(5, max_tokens=3)
    s.add(b)
    p = eng.step()
    assert p.admitted == [b] and [c.request for c in p.prefill] == [b]
    assert [q.request for q in p.decode] == [a], "a keeps decoding in the step that admits b"
    p = eng.step()
    assert {q.request.uid for q in p.decode} == {a.uid, b.uid}, "b joined the running batch"
    eng.run()
    assert len(a.seqs[0].output_ids) == 20 and len(b.seqs[0].output_ids) == 3


def test_long_prompt_is_chunked_and_never_stalls_decoding():
    s = Scheduler(num_slots=4, prefill_chunk=512, prefill_budget=512)
    eng = FakeEngine(s)
    short = req(4, max_tokens=400)
    s.add(short)
    eng.step()
    long = req(100_000, max_tokens=2)
    s.add(long)
    steps_before = len(eng.steps)
    while long.status is not Status.DECODE:
        p = eng.step()
        assert [q.request for q in p.decode] == [short], "the running stream decodes every step"
        assert p.prefill_tokens <= 512
        assert all(c.end - c.start <= 512 for c in p.prefill)
    steps = len(eng.steps) - steps_before
    assert steps == -(-100_000 // 512)
    assert len(short.seqs[0].output_ids) == 1 + steps, "one token per step while the prompt was read"


@pytest.mark.parametrize("interval", [2, 3])
def test_long_prompt_interval_spaces_its_chunks_while_streams_decode(interval):
    """With streams decoding, a long prompt's later chunks come every `interval`-th step (its first
    chunk at once, a short prompt's whenever it arrives); alone, every step; same boundaries."""
    s = Scheduler(num_slots=4, prefill_chunk=512, prefill_budget=2048, long_prompt_interval=interval)
    eng = FakeEngine(s)
    stream = req(4, max_tokens=10_000)
    s.add(stream)
    eng.step()
    long = req(5_000, max_tokens=2)
    s.add(long)
    seen = []
    while long.status is not Status.DECODE:
        if len(eng.steps) == 4:
            s.add(req(7, max_tokens=2))  # a short prompt arriving meanwhile is not held
        p = eng.step()
        seen.append([(c.request is long, c.start, c.end) for c in p.prefill])
    reads = [i for i, chunks in enumerate(seen) if any(is_long for is_long, _, _ in chunks)]
    assert all(b - a == interval for a, b in zip(reads, reads[1:]))
    assert [c[1:] for chunks in seen for c in chunks if c[0]] == [(i, min(i + 512, 5_000))
                                                                  for i in range(0, 5_000, 512)]
    short_read = [i for i, chunks in enumerate(seen) if any(not is_long for is_long, _, _ in chunks)]
    assert short_read == [3], "the short prompt is read in the step it arrived"
    # nobody decoding: every step
    s2 = Scheduler(num_slots=4, prefill_chunk=512, prefill_budget=2048, long_prompt_interval=interval)
    eng2 = FakeEngine(s2)
    s2.add(req(5_000, max_tokens=1))
    assert [bool(p.prefill) for p in eng2.run()] == [True] * -(-5_000 // 512) + [False]  # + the reaping


def test_chunk_boundaries_do_not_depend_on_other_requests():
    def boundaries(crowd):
        s = Scheduler(num_slots=8, prefill_chunk=16, prefill_budget=20)
        eng = FakeEngine(s)
        for r in crowd:
            s.add(r)
        target = req(100, max_tokens=2)
        s.add(target)
        eng.run()
        return [(c.start, c.end) for p in eng.steps for c in p.prefill if c.request is target]

    alone = boundaries([])
    crowded = boundaries([req(37), req(3), req(60, n=2), req(15)])
    assert alone == crowded == [(i, min(i + 16, 100)) for i in range(0, 100, 16)]


def test_prefill_budget_limits_tokens_per_step_but_always_progresses():
    s = Scheduler(num_slots=8, prefill_chunk=10, prefill_budget=25)
    eng = FakeEngine(s)
    for r in [req(30), req(30), req(30), req(4)]:
        s.add(r)
    p = eng.step()
    assert [len(c) for c in p.prefill] == [10, 10], "a third 10-token chunk would pass 25"
    s2 = Scheduler(num_slots=2, prefill_chunk=50, prefill_budget=8)
    s2.add(req(50))
    assert [len(c) for c in FakeEngine(s2).step().prefill] == [50], "one chunk even over budget"


def test_full_pool_queue_then_queue_full():
    s = Scheduler(num_slots=2, max_waiting=3, prefill_chunk=100)
    running = [req(3, 50), req(3, 50)]
    for r in running:
        s.add(r)
    eng = FakeEngine(s)
    eng.step()
    waiting = [req(3, 2) for _ in range(3)]
    for r in waiting:
        s.add(r)
    with pytest.raises(QueueFull):
        s.add(req(3))
    assert s.queued_beyond_slots() == 3
    for _ in range(5):
        eng.step()
    assert all(r.status is Status.WAITING for r in waiting), "nobody is admitted while full"
    running[0].cancel()
    eng.step()
    assert waiting[0].status is not Status.WAITING and waiting[1].status is Status.WAITING
    s.add(req(3))  # there is room in the queue again
    eng.run()
    assert s.free_slots == 2


def test_requests_are_admitted_first_come_first_served():
    s = Scheduler(num_slots=3, max_waiting=10, prefill_chunk=100)
    eng = FakeEngine(s)
    blocker = req(2, 5)
    s.add(blocker)
    eng.step()
    big, small = req(2, 2, n=3), req(2, 2, n=1)
    s.add(big)
    s.add(small)
    eng.step()
    assert small.status is Status.WAITING, "the small request does not overtake the big one"
    eng.run()
    admitted = [r.uid for p in eng.steps for r in p.admitted]
    assert admitted.index(big.uid) < admitted.index(small.uid)


@pytest.mark.parametrize("where", ["waiting", "prefill", "decode"])
def test_cancel_frees_slots_in_every_state(where):
    s = Scheduler(num_slots=2, max_waiting=5, prefill_chunk=4)
    eng = FakeEngine(s)
    other = req(2, 100)
    s.add(other)
    r = req(40, 100, n=1) if where != "waiting" else req(4, 100)
    if where == "waiting":
        s.add(req(2, 100))  # takes the second slot, so r waits
        eng.step()
    s.add(r)
    eng.step()
    if where == "decode":
        while r.status is not Status.DECODE:
            eng.step()
    assert r.status is Status[where.upper() if where != "waiting" else "WAITING"]
    r.cancel()
    p = eng.step()
    assert r.status is Status.FINISHED and r.seqs[0].finish_reason == "cancelled"
    if where == "waiting":
        assert p.dropped == [r] and not p.released
    else:
        assert r.seqs[0] in p.released
        assert r.uid not in {q.request.uid for q in p.decode}
        assert all(c.request is not r for c in p.prefill)
    assert s.free_slots == s.num_slots - (2 if where == "waiting" else 1)


def test_n_takes_n_slots_and_too_many_is_refused():
    s = Scheduler(num_slots=4, prefill_chunk=8)
    with pytest.raises(ValueError):
        s.add(req(3, n=5))
    r = req(3, 2, n=3)
    s.add(r)
    eng = FakeEngine(s)
    p = eng.step()
    assert s.free_slots == 1 and len(p.prefill) == 1, "the prompt is read once for all 3"
    p = eng.step()
    assert len(p.decode) == 3
    eng.run()
    assert s.free_slots == 4


def test_admission_hook_sets_a_cached_prefix():
    def hook(r):
        r.num_computed = r.num_cached = 30  # as a prefix-cache hit would

    s = Scheduler(num_slots=1, prefill_chunk=16, on_admit=hook)
    r = req(40)
    s.add(r)
    p = FakeEngine(s).step()
    assert [(c.start, c.end) for c in p.prefill] == [(30, 40)]


def test_scheduler_module_does_not_import_torch():
    """The scheduler and requests import without torch (the package __init__ does import it, so
    it is replaced by an empty package here)."""
    import os
    import subprocess

    pkg = os.path.join(os.path.dirname(__file__), "..", "falcon_mamba")
    code = (
        "import sys, types\n"
        f"for name, path in (('falcon_mamba', {pkg!r}), ('falcon_mamba.engine', {pkg!r} + '/engine')):\n"
        "    m = types.ModuleType(name); m.__path__ = [path]; sys.modules[name] = m\n"
        "import falcon_mamba.engine.scheduler\n"
        "assert 'falcon_mamba.engine.request' in sys.modules\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
