"""The serving engine: a background thread that runs scheduler steps on the model and hands each
sequence's new text to the request's sink.

    engine = Engine(model, tokenizer, EngineConfig(num_slots=64))
    engine.start()
    req = engine.submit(prompt_ids, SamplingParams(...), n=1, sink=callback)   # QueueFull -> 429
    ...callback(list[Delta]) is called from the engine thread as tokens arrive...
    engine.cancel(req); engine.shutdown(grace_s=10)

One step (see scheduler.py): release finished slots (their final states go to the prefix cache),
admit waiting requests into free slots (restoring a cached prefix), read prompt chunks, decode one
token for every running sequence, sample, detokenize, check stop rules, emit.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from falcon_mamba.engine import metrics as M
from falcon_mamba.engine.prefix_cache import PrefixCache
from falcon_mamba.engine.request import Request, Sequence
from falcon_mamba.engine.runner import Runner, Sampled
from falcon_mamba.engine.scheduler import QueueFull, Scheduler, StepPlan
from falcon_mamba.engine.state_pool import StatePool
from falcon_mamba.errors import UserError
from falcon_mamba.generate import check_token_ids, stop_token_ids
from falcon_mamba.sampling import SamplingParams, make_generators, random_seed
from falcon_mamba.streaming import IncrementalDetokenizer, StopMatcher

log = logging.getLogger("falcon_mamba.engine")

__all__ = ["Delta", "Engine", "EngineConfig", "QueueFull", "ShuttingDown"]


class ShuttingDown(Exception):
    """The engine no longer accepts requests."""


@dataclass
class EngineConfig:
    num_slots: int = 16  # sequences held at once (state slots)
    max_waiting: int = 64  # requests that may wait for a slot before new ones get QueueFull
    prefill_chunk: int = 512  # prompt tokens per chunk
    prefill_budget: int | None = None  # prompt tokens per step (default: one chunk)
    max_context: int = 1 << 20  # prompt + max_new_tokens limit
    cache_bytes: int = 0  # prefix cache budget (0: off)
    cache_dir: str | None = None  # spill evicted cache entries here
    cache_disk_bytes: int = 0


@dataclass
class Delta:
    """What one sequence produced since its last delta."""

    index: int  # the choice index
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Sampled] = field(default_factory=list)  # one per token, when asked
    finish_reason: str | None = None


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = cfg = config or EngineConfig()
        self.pool = StatePool(model.config, cfg.num_slots, model.dtype, model.device)
        self.cache = PrefixCache(cfg.cache_bytes, cfg.cache_dir, cfg.cache_disk_bytes)
        self.scheduler = Scheduler(cfg.num_slots, cfg.max_waiting, cfg.prefill_chunk,
                                   cfg.prefill_budget, on_admit=self._on_admit)
        self.runner = Runner(model, self.pool)
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._closing = False
        self._recent_durations: deque[float] = deque(maxlen=32)
        self._init_metrics()

    # ---- public API (any thread) -----------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="falcon-mamba-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams, *, n: int = 1,
               top_logprobs: int = 0, sink=None, request_id: str = "") -> Request:
        """Queue a request. sink(list[Delta]) is called from the engine thread. Raises UserError
        (bad request), QueueFull (try later) or ShuttingDown."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if params.max_new_tokens < 1:
            raise UserError("max_tokens must be at least 1")
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.config.max_context:
            raise UserError(f"prompt ({len(prompt_ids)} tokens) plus max_tokens "
                            f"({params.max_new_tokens}) is {total}, over this server's limit of "
                            f"{self.config.max_context} tokens; shorten the prompt or lower max_tokens")
        check_token_ids(prompt_ids, self.model.config.vocab_size)
        if n > self.config.num_slots:
            raise UserError(f"n={n} is more than this server's {self.config.num_slots} state slots")
        req = Request(list(prompt_ids), params, n=n, request_id=request_id)
        seed = params.seed if params.seed is not None else random_seed()
        gens = None if params.greedy else make_generators(seed, n, self.model.device)
        stop_ids = stop_token_ids(self.tokenizer, self.model, params)
        for s in req.seqs:
            s.extra.update(params=params, top_logprobs=top_logprobs, stop_ids=stop_ids,
                           generator=gens[s.index] if gens else None,
                           detok=IncrementalDetokenizer(self.tokenizer, prompt_ids),
                           stopper=StopMatcher(params.stop))
        req.extra["sink"] = sink
        with self._cv:
            self.scheduler.add(req)  # QueueFull propagates
            self._cv.notify()
        self.m_prompt_tokens.inc(len(prompt_ids))
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (a client went away): its slots are freed at the next step."""
        if not req.finished:
            req.cancel()
            with self._cv:
                self._cv.notify()

    def retry_after(self) -> int:
        """Seconds a rejected client should wait: recent request time x queue length / slots."""
        avg = sum(self._recent_durations) / len(self._recent_durations) if self._recent_durations else 1.0
        waiting = len(self.scheduler.waiting) + 1
        return int(min(60, max(1, math.ceil(avg * waiting / self.config.num_slots))))

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Refuse new requests, let running ones finish for up to grace_s, cancel the rest (their
        sinks get finish_reason 'cancelled'), then stop the thread."""
        self._closing = True
        deadline = time.monotonic() + grace_s
        with self._cv:
            while self.scheduler.has_work and time.monotonic() < deadline:
                self._cv.wait(0.05)
            self.scheduler.cancel_all()
            self._cv.notify()
            while self.scheduler.has_work and self._thread is not None and self._thread.is_alive():
                self._cv.wait(0.05)
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.cache.close()

    @property
    def closing(self) -> bool:
        """True once shutdown has begun (new requests are refused)."""
        return self._closing

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the loop (engine thread) ----------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._stop and not self.scheduler.has_work:
                    self._cv.wait()
                if self._stop:
                    return
                plan = self.scheduler.schedule()
            t0 = time.perf_counter()
            try:
                self._execute(plan)
            except Exception:  # a failed step fails its requests, not the server
                log.exception("engine step failed")
                self._fail(plan)
            with self._cv:
                self.scheduler.complete(plan)
                self._cv.notify_all()  # shutdown() waits on this condition
            if plan.has_compute:
                self.m_steps.observe(time.perf_counter() - t0)

    def _on_admit(self, req: Request) -> None:
        hit = self.cache.lookup(req.prompt_ids)
        if hit is not None:
            req.num_computed = req.num_cached = hit[0]
            req.extra["restore"] = hit[1]
            self.m_cached_tokens.inc(hit[0])

    def _execute(self, plan: StepPlan) -> None:
        now = time.monotonic()
        for req in plan.dropped:
            self._emit(req, [Delta(s.index, finish_reason=s.finish_reason) for s in req.seqs])
            self._request_done(req, now)
        for s in plan.released:
            self._release(s, now)
        for req in plan.admitted:
            self.m_queue_time.observe(now - req.arrival)
            for s in req.seqs:
                self.pool.alloc(s.key)
            restore = req.extra.pop("restore", None)
            if restore is not None:
                self.pool.write(req.seqs[0].key, restore)
        for chunk in plan.prefill:
            logits_1V = self.runner.prefill(chunk)
            if logits_1V is None:
                continue
            req = chunk.request
            head = req.seqs[0].key
            self.pool.copy(head, [s.key for s in req.seqs[1:]])
            if self.cache.enabled:
                self.cache.put(req.prompt_ids, self.pool.read(head, self.cache.device))
            sampled = self.runner.sample(logits_1V.expand(req.n, -1), req.seqs)
            t = time.monotonic()
            self.m_ttft.observe(t - req.arrival)
            req.extra["t_first"] = t
            deltas = [self._advance(s, x, t) for s, x in zip(req.seqs, sampled)]
            self._emit(req, deltas)
        if plan.decode:
            logits_BV, rows = self.runner.decode(plan.decode)
            self.m_batch.observe(len(rows))
            sampled = self.runner.sample(logits_BV, rows)
            t = time.monotonic()
            by_req: dict[int, tuple[Request, list[Delta]]] = {}
            for s, x in zip(rows, sampled):
                if s.request.cancelled:
                    continue
                by_req.setdefault(s.request.uid, (s.request, []))[1].append(self._advance(s, x, t))
            for req, deltas in by_req.values():
                self._emit(req, deltas)

    def _advance(self, s: Sequence, x: Sampled, t: float) -> Delta:
        """Append one sampled token to a sequence and decide whether it ends it."""
        last_t = s.extra.get("t_last")
        if last_t is not None:
            self.m_tpot.observe(t - last_t)
        s.extra["t_last"] = t
        s.output_ids.append(x.token)
        self.m_gen_tokens.inc()
        params: SamplingParams = s.extra["params"]
        detok: IncrementalDetokenizer = s.extra["detok"]
        stopper: StopMatcher = s.extra["stopper"]
        d = Delta(s.index, token_ids=[x.token], logprobs=[x] if params.logprobs else [])
        if x.token in s.extra["stop_ids"]:
            # A stop token ends the text and is not part of it.
            text, matched = stopper.push(detok.flush())
            d.text = text + ("" if matched else stopper.flush())
            s.finish("stop")
        else:
            text, matched = stopper.push(detok.push(x.token))
            if matched:
                d.text = text
                s.finish("stop")
            elif len(s.output_ids) >= params.max_new_tokens:
                more, matched = stopper.push(detok.flush())
                d.text = text + more + ("" if matched else stopper.flush())
                s.finish("stop" if matched else "length")
            else:
                d.text = text
        d.finish_reason = s.finish_reason
        if s.finished:
            self._keep_final_state(s)
        return d

    def _keep_final_state(self, s: Sequence) -> None:
        """Cache a finished answer's state before the client hears of the end, so that a next
        turn sent at once already finds it. The state has read the prompt and every generated
        token but the last (which was sampled, not fed)."""
        if self.cache.enabled and s.finish_reason in ("stop", "length") and len(s.output_ids) > 1:
            self.cache.put(s.request.prompt_ids + s.output_ids[:-1],
                           self.pool.read(s.key, self.cache.device))

    def _release(self, s: Sequence, now: float) -> None:
        """A sequence ended: free its slot."""
        if s.key in self.pool:  # not when the step that admitted it failed
            self.pool.free(s.key)
        self.m_finished.inc(reason=s.finish_reason)
        req = s.request
        req.extra["released"] = req.extra.get("released", 0) + 1
        if s.finish_reason == "cancelled" and not req.extra.get("cancel_sent"):
            req.extra["cancel_sent"] = True
            self._emit(req, [Delta(q.index, finish_reason="cancelled") for q in req.seqs
                             if q.finish_reason == "cancelled"])
        if req.extra["released"] == req.n:
            self._request_done(req, now)

    def _request_done(self, req: Request, now: float) -> None:
        dur = now - req.arrival
        self.m_latency.observe(dur)
        self._recent_durations.append(dur)

    def _emit(self, req: Request, deltas: list[Delta]) -> None:
        sink = req.extra.get("sink")
        if sink is None or not deltas:
            return
        try:
            sink(deltas)
        except Exception:  # a broken consumer must not stop the engine
            log.exception("request sink failed")
            req.cancel()

    def _fail(self, plan: StepPlan) -> None:
        reqs = {c.request.uid: c.request for c in plan.prefill}
        reqs.update({s.request.uid: s.request for s in plan.decode})
        reqs.update({r.uid: r for r in plan.admitted})
        for req in reqs.values():
            deltas = []
            for s in req.seqs:
                if not s.finished:
                    s.finish("error")
                    deltas.append(Delta(s.index, finish_reason="error"))
            req.cancel()  # so the scheduler gives the slots back
            self._emit(req, deltas)

    # ---- metrics ---------------------------------------------------------------------------
    def _init_metrics(self) -> None:
        r = self.metrics = M.Registry()
        sch, pool, cache = self.scheduler, self.pool, self.cache
        self.m_prompt_tokens = r.counter("prompt_tokens_total", "Prompt tokens received.")
        self.m_cached_tokens = r.counter("prompt_tokens_cached_total",
                                         "Prompt tokens restored from the prefix cache instead of read.")
        self.m_gen_tokens = r.counter("generation_tokens_total", "Tokens generated.")
        self.m_finished = r.counter("sequences_finished_total", "Finished sequences by finish reason.")
        r.gauge("queue_depth", "Requests waiting for a state slot.", lambda: len(sch.waiting))
        r.gauge("requests_prefilling", "Requests reading their prompt.", lambda: len(sch.prefilling))
        r.gauge("sequences_decoding", "Sequences in the decode batch.", lambda: len(sch.decoding))
        r.gauge("state_pool_slots", "State slots in the pool.", lambda: pool.num_slots)
        r.gauge("state_pool_slots_used", "State slots held by requests.", lambda: sch.used_slots)
        r.gauge("state_pool_bytes", "Bytes of the state pool.", lambda: pool.nbytes)
        r.gauge("prefix_cache_bytes", "Bytes of states held in memory by the prefix cache.",
                lambda: cache.mem_bytes)
        r.gauge("prefix_cache_disk_bytes", "Bytes of prefix-cache states spilled to disk.",
                lambda: cache.disk_bytes)
        r.gauge("prefix_cache_entries", "Entries in the prefix cache.", lambda: len(cache))
        r.counter_fn("prefix_cache_hits_total", "Prefix cache lookups that found a prefix.",
                     lambda: cache.hits)
        r.counter_fn("prefix_cache_misses_total", "Prefix cache lookups that found nothing.",
                     lambda: cache.misses)
        self.m_batch = r.histogram("decode_batch_size", "Sequences per decode step.", M.BATCH_BUCKETS)
        self.m_steps = r.histogram("step_duration_seconds", "Engine step time.", M.TOKEN_LATENCY_BUCKETS)
        self.m_queue_time = r.histogram("queue_time_seconds", "Arrival to admission.", M.LATENCY_BUCKETS)
        self.m_ttft = r.histogram("time_to_first_token_seconds", "Arrival to first token.",
                                  M.LATENCY_BUCKETS)
        self.m_tpot = r.histogram("time_per_output_token_seconds", "Time between a sequence's tokens.",
                                  M.TOKEN_LATENCY_BUCKETS)
        self.m_latency = r.histogram("request_latency_seconds", "Arrival to last token.", M.LATENCY_BUCKETS)
