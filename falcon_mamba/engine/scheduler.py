"""The scheduler: which requests hold state slots, and what the next engine step computes.

Plain Python (no torch), so its policy is tested with a fake step function. One engine step is:

    plan = scheduler.schedule()     # release finished slots, admit waiting requests, pick work
    ...the runner executes plan.released, plan.admitted, plan.prefill, plan.decode...
    scheduler.complete(plan)        # record prefill progress; finished prompts join the decode batch

Policy:
- Continuous batching: every sequence that is decoding takes part in every step, and requests
  admitted at a step boundary join the decode batch as soon as their prompt is read.
- Chunked prefill: a prompt is read in chunks of at most ``prefill_chunk`` tokens, and a step reads
  at most ``prefill_budget`` prompt tokens (at least one chunk, so prefill always progresses). A
  100k-token prompt thus costs the other streams one chunk of latency per token, not a stall.
  While sequences decode, a prompt's later chunks (those that continue it) are read at most every
  ``long_prompt_interval``-th step: with 2, the streams' steps alternate between one with a chunk
  and one without (H200, 32 streams beside a 100k prompt: a step with a 512-token chunk takes 26 ms,
  one without 6 ms, and a token that misses a step waits for two: inter-token p99 52 ms with every
  step carrying a chunk, predicted 32 ms alternating; the prompt reads at 512 tokens per 32 ms).
  Chunk boundaries depend only on the request itself (its prompt and its prefix-cache hit), never
  on what else is running, so a request computes the same numbers alone or in a crowd.
- Slots: a request takes ``n`` slots at admission (one per continuation) and gives each back when
  that continuation ends. Admission is first come, first served.
- A bounded queue: when the slots are taken, requests wait; past ``max_waiting`` waiting requests,
  ``add`` raises QueueFull (the server answers 429).
- Cancellation is a flag on the request (safe to set from any thread); the next ``schedule``
  releases its slots.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from falcon_mamba.engine.request import Request, Sequence, Status


class QueueFull(Exception):
    """Every slot is taken and the waiting queue is at its limit."""


@dataclass
class PrefillChunk:
    request: Request
    start: int
    end: int

    @property
    def is_last(self) -> bool:
        return self.end == self.request.prompt_len

    def __len__(self) -> int:
        return self.end - self.start


@dataclass
class StepPlan:
    released: list[Sequence] = field(default_factory=list)  # their slots are free from this step on
    dropped: list[Request] = field(default_factory=list)  # cancelled while still waiting (no slot)
    admitted: list[Request] = field(default_factory=list)  # took their slots this step
    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)  # one token each

    @property
    def has_compute(self) -> bool:
        return bool(self.prefill or self.decode)

    @property
    def prefill_tokens(self) -> int:
        return sum(len(c) for c in self.prefill)


class Scheduler:
    def __init__(self, num_slots: int, max_waiting: int = 64, prefill_chunk: int = 576,
                 prefill_budget: int | None = None,
                 on_admit: Callable[[Request], None] | None = None, long_prompt_interval: int = 1):
        """on_admit(request) runs when a request gets its slots, before its first chunk is
        planned: the engine restores a prefix-cache hit there (setting request.num_computed)."""
        if long_prompt_interval < 1:
            raise ValueError(f"long_prompt_interval must be >= 1, got {long_prompt_interval}")
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.num_slots = num_slots
        self.max_waiting = max_waiting
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget or prefill_chunk
        self.on_admit = on_admit
        self.long_prompt_interval = long_prompt_interval
        self._since_continuing = long_prompt_interval  # steps since one read a long prompt's chunk
        self.free_slots = num_slots
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.decoding: list[Sequence] = []

    # ---- intake ------------------------------------------------------------------------------
    def queued_beyond_slots(self, extra: Request | None = None) -> int:
        """How many waiting requests (plus ``extra``) would not fit in the free slots, FIFO."""
        free = self.free_slots
        beyond = 0
        for r in [*self.waiting, *([extra] if extra is not None else [])]:
            if r.cancelled:
                continue
            if beyond == 0 and r.n <= free:
                free -= r.n
            else:
                beyond += 1
        return beyond

    def add(self, request: Request) -> None:
        if request.n > self.num_slots:
            raise ValueError(f"n={request.n} needs more state slots than the server has "
                             f"({self.num_slots})")
        if self.queued_beyond_slots(request) > self.max_waiting:
            raise QueueFull(f"all {self.num_slots} state slots are busy and {self.max_waiting} "
                            "requests are already waiting")
        request.status = Status.WAITING
        self.waiting.append(request)

    # ---- one step ----------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        self._reap(plan)
        while self.waiting:
            req = self.waiting[0]
            if req.cancelled:
                self.waiting.popleft()
                for s in req.seqs:
                    s.finish("cancelled")
                req.status = Status.FINISHED
                plan.dropped.append(req)
                continue
            if req.n > self.free_slots:
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.free_slots -= req.n
            req.status = Status.PREFILL
            if self.on_admit is not None:
                self.on_admit(req)
            assert 0 <= req.num_computed < req.prompt_len, "at least one prompt token is read"
            self.prefilling.append(req)
            plan.admitted.append(req)
        plan.decode = list(self.decoding)
        budget = self.prefill_budget
        hold = bool(self.decoding) and self._since_continuing < self.long_prompt_interval - 1
        for req in self.prefilling:
            start = req.num_computed
            if start > 0 and hold:
                continue  # a long prompt's next chunk waits a step: the streams' step stays short
            end = min(start + (req.chunk or self.prefill_chunk), req.prompt_len)
            if plan.prefill and end - start > budget:
                break
            plan.prefill.append(PrefillChunk(req, start, end))
            budget -= end - start
            if budget <= 0:
                break
        if any(c.start > 0 or not c.is_last for c in plan.prefill):  # a chunk of a long prompt
            self._since_continuing = 0
        elif plan.has_compute:
            self._since_continuing += 1
        return plan

    def complete(self, plan: StepPlan) -> None:
        """Record what the step did: prompts advance; fully read prompts start decoding (their
        first token was sampled from the last chunk's logits)."""
        for chunk in plan.prefill:
            req = chunk.request
            req.num_computed = chunk.end
            if chunk.is_last:
                self.prefilling.remove(req)
                req.status = Status.DECODE
                self.decoding.extend(req.seqs)

    def _reap(self, plan: StepPlan) -> None:
        """Give back the slots of finished or cancelled sequences."""
        for req in list(self.prefilling):
            if req.cancelled:
                self.prefilling.remove(req)
                for s in req.seqs:
                    s.finish("cancelled")
                    plan.released.append(s)
                self.free_slots += req.n
                req.status = Status.FINISHED
        keep = []
        for s in self.decoding:
            if s.request.cancelled:
                s.finish("cancelled")
            if s.finished:
                plan.released.append(s)
                self.free_slots += 1
                if s.request.finished:
                    s.request.status = Status.FINISHED
            else:
                keep.append(s)
        self.decoding = keep
        assert 0 <= self.free_slots <= self.num_slots

    # ---- state -------------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    @property
    def used_slots(self) -> int:
        return self.num_slots - self.free_slots

    def cancel_all(self) -> None:
        for r in [*self.waiting, *self.prefilling, *{s.request for s in self.decoding}]:
            r.cancel()
