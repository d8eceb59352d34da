"""The engine: runs scheduler steps on the model and hands each sequence's new text to its sink.
The server runs it on a background thread; ``generate()`` runs the same steps in the caller's
thread (``run_until``), so both decode through one path.

    engine = Engine(model, tokenizer, EngineConfig(num_slots=64))
    engine.start()
    req = engine.submit(prompt_ids, SamplingParams(...), n=1, sink=callback)   # QueueFull -> 429
    ...callback(list[Delta]) is called from the engine thread as tokens arrive...
    engine.cancel(req); engine.shutdown(grace_s=10)

One step (see scheduler.py): release finished slots (their final states go to the prefix cache),
admit waiting requests (restoring a cached prefix or a caller's state), launch one decode step for
every decoding sequence (a CUDA-graph replay that also samples: decode/graphs.py), read the step's
prompt chunks in a few batched launches and sample the first token of each prompt that is done,
queue the copy of the step's tokens to the host, and only then wait for the *previous* step's
tokens and detokenize, check stop rules and emit them. So the host work of step k overlaps the GPU
work of step k+1; the price is that a sequence that ended at step k has run one more step, whose
token is dropped (its state then has read every token it returned, which is what the prefix cache
and a returned state want).

A row whose sampling fails (no finite logit) ends alone with finish_reason "error"; a step that
raises fails the requests of that step's work (prefill failures only the prompts being read).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

import torch

from falcon_mamba.decode.modes import DecodeOptions
from falcon_mamba.engine import metrics as M
from falcon_mamba.engine.compile_watch import watch_late_compiles
from falcon_mamba.engine.prefix_cache import PrefixCache
from falcon_mamba.engine.request import Request, Sequence
from falcon_mamba.engine.runner import Pending, PrefillWork, Runner, Sampled
from falcon_mamba.engine.scheduler import QueueFull, Scheduler, StepPlan
from falcon_mamba.engine.state_pool import StatePool
from falcon_mamba.errors import UserError
from falcon_mamba.sampling import SamplingParams, random_seed
from falcon_mamba.state import State
from falcon_mamba.streaming import StopMatcher, make_detokenizer
from falcon_mamba.tokens import check_token_ids, stop_token_ids

log = logging.getLogger("falcon_mamba.engine")

__all__ = ["Delta", "Engine", "EngineConfig", "QueueFull", "ShuttingDown"]


def _phase(phases: dict, name: str, since: float) -> float:
    """Record the host ms since `since` under name (added to what it holds); returns now."""
    now = time.perf_counter()
    phases[name] = round(phases.get(name, 0.0) + (now - since) * 1e3, 3)
    return now


class ShuttingDown(Exception):
    """The engine no longer accepts requests."""


@dataclass
class EngineConfig:
    num_slots: int = 16  # sequences held at once (state slots)
    max_waiting: int = 64  # requests that may wait for a slot before new ones get QueueFull
    prefill_chunk: int = 576  # prompt tokens per chunk (serve's default, measured with serve's
    # --long-prompt-interval 2: see cli/serve.py)
    prefill_budget: int | None = None  # prompt tokens per step (default: 4 chunks)
    long_prompt_interval: int = 1  # while streams decode, a prompt's later chunks every N-th step
    max_context: int = 1 << 20  # prompt + max_new_tokens limit
    cache_bytes: int = 0  # prefix cache budget (0: off)
    cache_dir: str | None = None  # spill evicted cache entries here
    cache_disk_bytes: int = 0
    cache_device: str | None = None  # where cached states live (default: the model's device, so that
    # keeping and restoring one is a device copy, not a synchronising copy to the host)
    # a prompt's end state goes into the cache from this many tokens (a shorter prompt is read again
    # by one graph replay, while keeping its state costs a state-sized copy and evicts another
    # entry: a wave of 75 short prompts pushed out 27 conversations' states); answers' end states
    # are always kept
    cache_min_prompt: int = 64
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    # the state pool's SSM states: fp32, or bf16 (half the bytes a decode step moves per row; serve
    # --state-dtype; results/INDEX.md has both measured)
    state_dtype: torch.dtype = torch.float32
    step_log: IO[str] | None = None  # one JSON line per computing step (opened by the caller)


@dataclass(slots=True)
class Delta:
    """What one sequence produced since its last delta."""

    index: int  # the choice index
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Sampled] = field(default_factory=list)  # one per token, when asked
    finish_reason: str | None = None
    error: str | None = None  # why, when finish_reason is "error"


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = cfg = config or EngineConfig()
        self.pool = StatePool(model.config, cfg.num_slots, model.dtype, model.device, cfg.state_dtype)
        self.cache = PrefixCache(cfg.cache_bytes, cfg.cache_dir, cfg.cache_disk_bytes,
                                 device=cfg.cache_device or model.device)
        budget = cfg.prefill_budget if cfg.prefill_budget is not None else 4 * cfg.prefill_chunk
        self.scheduler = Scheduler(cfg.num_slots, cfg.max_waiting, cfg.prefill_chunk, budget,
                                   on_admit=self._on_admit, long_prompt_interval=cfg.long_prompt_interval)
        self.runner = Runner(model, self.pool, cfg.decode, cfg.prefill_chunk, budget)
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._closing = False
        self._pending: Pending | None = None
        self._warm = False
        self._ready = False
        self.warm_up_seconds: dict[str, float] = {}  # what each part of warm_up() took
        self._step_records: deque = deque()  # --step-log lines waiting for their GPU time
        self._answer_puts: list = []  # (token ids, sequence key) of answers ended in this _process
        self._phases: dict[str, float] = {}  # host ms of the current step's parts (--step-log)
        self._live: dict = {}  # sequence key -> Sequence, while it holds a row
        self._recent_durations: deque[float] = deque(maxlen=32)
        self._init_metrics()
        getattr(tokenizer, "byte_table", None)  # the detokenizer's table: built now, not in a request

    # ---- public API (any thread) -----------------------------------------------------------
    def start(self, warm_up: bool = False) -> None:
        """Run steps on a background thread; warm_up: first capture the decode graphs (``ready``
        turns True after; requests submitted meanwhile wait in the queue)."""
        self._warm = warm_up
        self._thread = threading.Thread(target=self._loop, name="falcon-mamba-engine", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        """The engine thread runs and its decode graphs are captured."""
        return self._ready and self.is_alive

    def warm_up(self) -> None:
        """Compile the variants of the prefill kernels and the first-token sampler, capture the
        prompt graphs and the decode graphs of every batch bucket up to the slot count (and time
        the batch-1 modes, or read their choice from the tuning cache) before serving, so that no
        request pays for them."""
        from falcon_mamba.engine.state_pool import bucket

        graphs = self.runner.graphs
        if not graphs.use_graphs:
            return
        took = self.warm_up_seconds = {}
        t = time.perf_counter()

        def phase(name):
            nonlocal t
            now = time.perf_counter()
            took[name] = round(now - t, 2)
            t = now

        with torch.inference_mode():
            self.runner.warm_prefill()
            phase("prefill kernels")
            self.runner.warm_sampler()
            phase("sampler")
            self.runner.prefill_graphs.capture_all()
            phase("prompt graphs")
            n = 1
            while True:
                graphs.prepare(n)
                if bucket(n) >= self.config.num_slots:
                    break
                n = bucket(n) + 1
            phase("decode graphs")

    def submit(self, prompt_ids: list[int], params: SamplingParams, *, n: int = 1,
               top_logprobs: int = 0, sink=None, request_id: str = "", state: State | None = None,
               want_state: bool = False, chunk: int | None = None, progress=None,
               tokenizer=None) -> Request:
        """Queue a request. sink(list[Delta]) is called from the engine's thread. state: a batch-1
        State the prompt continues from (a caller's context). want_state: each sequence's final
        state (having read the prompt and every returned token) is kept in seq.extra["state"] and
        the state after the prompt in request.extra["prompt_state"]; it also allows
        max_new_tokens = 0 (read the prompt only). chunk: prompt tokens per prefill chunk (default
        the engine's); progress(n): called with the prompt tokens read by each chunk. tokenizer:
        the detokenizer's (default the engine's). Raises UserError (bad request), QueueFull (try
        later) or ShuttingDown."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if params.max_new_tokens < (0 if want_state else 1):
            raise UserError("max_tokens must be at least 1")
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.config.max_context:
            raise UserError(f"prompt ({len(prompt_ids)} tokens) plus max_tokens "
                            f"({params.max_new_tokens}) is {total}, over this server's limit of "
                            f"{self.config.max_context} tokens; shorten the prompt or lower max_tokens")
        check_token_ids(prompt_ids, self.model.config.vocab_size)
        if n > self.config.num_slots:
            raise UserError(f"n={n} is more than this server's {self.config.num_slots} state slots")
        if state is not None and (state.batch_size != 1 or state.config != self.model.config):
            raise UserError("a request's start state must be one row of this model's state")
        req = Request(list(prompt_ids), params, n=n, request_id=request_id, chunk=chunk)
        seed = params.seed if params.seed is not None else random_seed()
        tok = tokenizer if tokenizer is not None else self.tokenizer
        stop_ids = stop_token_ids(tok, self.model, params)
        for s in req.seqs:
            s.extra.update(params=params, top_logprobs=top_logprobs, stop_ids=stop_ids, seed=seed + s.index,
                           detok=make_detokenizer(tok, prompt_ids),
                           stopper=StopMatcher(params.stop), fed=0)
        req.extra.update(sink=sink, want_state=want_state, seed=seed, progress=progress,
                         tokens_before=0 if state is None else state.tokens_seen)
        if state is not None:
            req.extra["start_state"] = state
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
            while self.busy and time.monotonic() < deadline:
                self._cv.wait(0.05)
            self.scheduler.cancel_all()
            self._cv.notify()
            while self.busy and self._thread is not None and self._thread.is_alive():
                self._cv.wait(0.05)
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._flush_step_log(wait=True)
        self.cache.close()

    @property
    def closing(self) -> bool:
        """True once shutdown has begun (new requests are refused)."""
        return self._closing

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def busy(self) -> bool:
        return self.scheduler.has_work or self._pending is not None

    # ---- running steps ---------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        if self._warm:
            t0 = time.perf_counter()
            try:
                self.warm_up()
            except Exception:  # serving still works: graphs are then captured on first use
                log.exception("decode warm-up failed")
            g = self.runner.graphs
            above = "".join(f"; {name} at {','.join(map(str, bs))}" for name, bs in g.batched_modes().items())
            log.info("decoder ready in %.1f s (graphs for %d batch sizes%s%s; %s)", time.perf_counter() - t0,
                     len(g.buckets), f"; batch 1: {g.batch1_choice()[0].name}" if g.use_graphs else "", above,
                     ", ".join(f"{k} {v} s" for k, v in self.warm_up_seconds.items()))
            if g.use_graphs:
                watch_late_compiles()
        self._ready = True
        while True:
            with self._cv:
                while not self._stop and not self.busy:
                    self._cv.wait()
                if self._stop:
                    return
            self.run_step()

    def run_until(self, done: Callable[[], bool]) -> None:
        """Run steps in this thread until done() (then until nothing is left in flight): the
        synchronous driver of generate()."""
        with torch.inference_mode():
            while self.busy and not done():
                self.run_step()
            while self.busy:
                self.run_step()

    def run_step(self) -> None:
        with self._cv:
            plan = self.scheduler.schedule()
        t0 = time.perf_counter()
        events = None
        if self.config.step_log is not None and plan.has_compute and self.model.device.type == "cuda":
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        try:
            self._execute(plan)
        except Exception as e:  # a failed step fails its requests, not the server
            log.exception("engine step failed")
            self._fail(plan, f"{type(e).__name__}: {e}")
        if events is not None:
            events[1].record()
        with self._cv:
            self.scheduler.complete(plan)
            self._cv.notify_all()  # shutdown() waits on this condition
        if plan.has_compute:
            took = time.perf_counter() - t0
            self.m_steps.observe(took)
            if self.config.step_log is not None:
                self._log_step(plan, t0, took, events)

    def _log_step(self, plan: StepPlan, t0: float, took: float, events=None) -> None:
        """One line of --step-log: when the step began (perf_counter s), its host time (which waits
        for the previous step's GPU work at readback), its GPU time (between events recorded
        around its launches: written once the GPU has passed them, a step or two later), its
        decode rows and its prompt chunks (fresh / continuing, tokens, the longest), and host_ms:
        the host time of its parts (release, admit, decode: launching the decode step, prompts:
        reading the prompt chunks and joining the finished ones, of which prefill: the chunks'
        forwards and graph replays, readback, wait: for the previous step's GPU work, process:
        handing its tokens to their sequences)."""
        lengths = [len(c) for c in plan.prefill]
        fresh = sum(1 for c in plan.prefill if c.start == 0)
        rec = {"t": round(t0, 6), "ms": round(took * 1e3, 3), "decode": len(plan.decode),
               "admitted": len(plan.admitted), "prefill": len(lengths), "fresh": fresh,
               "prefill_tokens": sum(lengths), "longest": max(lengths, default=0),
               "host_ms": dict(self._phases)}
        self._step_records.append((rec, events))
        self._flush_step_log(wait=False)

    def _flush_step_log(self, wait: bool) -> None:
        """Write the step records whose GPU time is known (all of them with wait)."""
        out = self.config.step_log
        pending = self._step_records
        while pending and out is not None:
            rec, events = pending[0]
            if events is not None:
                if not wait and not events[1].query():
                    return
                events[1].synchronize()
                rec["gpu_ms"] = round(events[0].elapsed_time(events[1]), 3)
            pending.popleft()
            try:
                out.write(json.dumps(rec) + "\n")
            except (OSError, ValueError):  # a full disk or a closed file ends the log, not the server
                log.warning("--step-log: cannot write any more; step logging stops")
                self.config.step_log = out = None

    def _on_admit(self, req: Request) -> None:
        if "start_state" in req.extra:
            return  # a caller's context: the prompt is read on top of it, never from the cache
        hit = self.cache.lookup(req.prompt_ids)
        if hit is not None:
            req.num_computed = req.num_cached = hit[0]
            req.extra["start_state"] = hit[1]
            self.m_cached_tokens.inc(hit[0])

    def _execute(self, plan: StepPlan) -> None:
        now = time.monotonic()
        pool = self.pool
        phases = self._phases = {}  # host ms of the step's parts, for --step-log
        t = time.perf_counter()
        for req in plan.dropped:
            self._emit(req, [Delta(s.index, finish_reason=s.finish_reason) for s in req.seqs])
            self._request_done(req, now)
        # the released rows in one go (a wave of answers ending together moves their rows' tables
        # in one gather and scatter each, not a copy per row and table)
        pool.free_many([s.key for s in plan.released if s.key in pool])
        for s in plan.released:
            self._release(s, now)
        t = _phase(phases, "release", t)
        for req in plan.admitted:
            self.m_queue_time.observe(now - req.arrival)
            head = req.seqs[0].key
            pool.park(head)
            start = req.extra.get("start_state")
            if start is not None:
                pool.write(head, start.to(pool.device) if start.device != pool.device else start)
        # 1. the decode step of every decoding sequence (before the prompts: it scribbles on the
        #    scratch rows that joining sequences take below)
        n = pool.num_decoding
        assert n == len(plan.decode), (n, len(plan.decode))
        t = _phase(phases, "admit", t)
        if n:
            self.runner.decode(n)
            self.m_batch.observe(n)
            for key in pool.decode_keys():
                self._live[key].extra["fed"] += 1
        t = _phase(phases, "decode", t)
        # 2. this step's prompt chunks, batched; prompts that are done join the decode rows
        if plan.prefill:
            self._prefill(plan)
            t = _phase(phases, "prompts", t)  # of which "prefill" (_prefill): the chunks' forwards
        # 3. the step's results go to the host behind it; 4. the previous step's are handled now
        keys = pool.decode_keys()
        top = max((self._live[k].extra["top_logprobs"] for k in keys), default=0)
        pending = self.runner.readback(keys, top) if keys else None
        t = _phase(phases, "readback", t)
        prev, self._pending = self._pending, pending
        if prev is not None:
            prev.wait()  # the previous step's GPU work
            t = _phase(phases, "wait", t)
            self._process(prev)
            _phase(phases, "process", t)

    def _prefill(self, plan: StepPlan) -> None:
        pool = self.pool
        works = []
        for chunk in plan.prefill:
            req = chunk.request
            row = pool.row(req.seqs[0].key)
            continues = chunk.start > 0 or "start_state" in req.extra
            works.append(PrefillWork(req.prompt_ids[chunk.start:chunk.end], row, continues, chunk.is_last,
                                     tag=chunk))
        t0 = time.perf_counter()
        try:
            done = self.runner.prefill(works)
        except Exception as e:  # noqa: BLE001 - the prompts fail, the decoding streams go on
            log.exception("prefill failed")
            for w in works:
                self._fail_request(w.tag.request, f"{type(e).__name__}: {e}")
            return
        self._phases["prefill"] = round((time.perf_counter() - t0) * 1e3, 3)
        for w in works:
            cb = w.tag.request.extra.get("progress")
            if cb is not None:
                cb(len(w.ids))
        first = pool.num_decoding
        logits, params, seeds, seen = [], [], [], []
        t = time.monotonic()
        # a wave of prompts puts only the states the cache keeps (75 prompts, 27 entries kept)
        cached = [i for i, (w, _, _) in enumerate(done)
                  if self.cache.enabled and len(w.tag.request.prompt_ids) >= self.config.cache_min_prompt]
        cached = set(self.cache.kept_of(cached, done[0][2].nbytes)) if cached else set()
        writes: list[tuple[int, State]] = []  # (row, state): written together below
        for i, (w, logits_V, state) in enumerate(done):
            req = w.tag.request
            if req.cancelled:
                continue
            if req.extra.get("want_state"):
                req.extra["prompt_state"] = self._with_seen(
                    State(state.config, state.conv.clone(), state.ssm.clone()), req, 0)
            if i in cached:
                dev = self.cache.device
                self.cache.put(req.prompt_ids, state.to(dev) if state.device != dev
                               else State(state.config, state.conv.clone(), state.ssm.clone()))
            p: SamplingParams = req.params
            if p.max_new_tokens == 0:  # read the prompt only
                deltas = []
                for s in req.seqs:
                    s.extra["state"] = req.extra["prompt_state"]
                    s.finish("length")
                    deltas.append(Delta(s.index, finish_reason="length"))
                self._emit(req, deltas)
                continue
            row0 = pool.join([s.key for s in req.seqs])
            for j, s in enumerate(req.seqs):
                self._live[s.key] = s
                writes.append((row0 + j, state))
                logits.append(logits_V)
                params.append(p)
                seeds.append(s.extra["seed"])
                seen.append(req.prompt_ids)
            req.extra["t_prefilled"] = t
            assert row0 == first + len(params) - req.n
        # the joined rows' states: a batch's prompts in few copies, not two per prompt (every torch
        # call lets the event loop take the interpreter lock: cli/serve.py's switch interval)
        pool.write_many(writes)
        if logits:
            pool.set_sampling(first, params, seeds, seen)
            self.runner.sample_joined(first, torch.stack(logits))

    def _with_seen(self, state: State, req: Request, generated: int) -> State:
        state.tokens_seen = req.extra["tokens_before"] + req.prompt_len + generated
        return state

    def _process(self, pend: Pending) -> None:
        """Hand the tokens of a finished step to their sequences. Runs for every row of every
        step on the engine thread (which shares the interpreter lock with the server's event
        loop): the metrics are recorded once per step, not per token."""
        pend.wait()
        self._answer_puts = []  # this step's ends only (a step that raised left none behind)
        toks, lps, status = pend.tokens.tolist(), pend.logprob.tolist(), pend.status.tolist()
        tops = None
        if pend.top_values is not None:
            tops = (pend.top_values.tolist(), pend.top_ids.tolist())
        t = time.monotonic()
        live = self._live
        by_req: dict[int, tuple[Request, list[Delta]]] = {}
        gaps: dict[float, int] = {}  # time since a sequence's last token -> sequences (a step's
        # rows mostly share their previous step, so a few values cover them all)
        tokens = 0
        for i, key in enumerate(pend.keys):
            s = live.get(key)
            if s is None or s.finish_reason is not None or s.request.cancelled:
                continue  # ended at an earlier step: this step's token is the one extra
            req = s.request
            if status[i] != 0:
                s.finish("error")
                d = Delta(s.index, finish_reason="error",
                          error="the model produced no finite logit for this sequence")
            else:
                ex = s.extra
                last_t = ex.get("t_last")
                if last_t is None:
                    if "t_first" not in req.extra:
                        req.extra["t_first"] = t
                        self.m_ttft.observe(t - req.arrival)
                else:
                    gap = t - last_t
                    gaps[gap] = gaps.get(gap, 0) + 1
                ex["t_last"] = t
                x = None
                if ex["params"].logprobs:
                    x = Sampled(toks[i], lps[i])
                    k = ex["top_logprobs"]
                    if k and tops is not None:
                        x.top = list(zip(tops[1][i][:k], tops[0][i][:k]))
                d = self._advance(s, toks[i], x)
                tokens += 1
            entry = by_req.get(req.uid)
            if entry is None:
                by_req[req.uid] = (req, [d])
            else:
                entry[1].append(d)
        if tokens:
            self.m_gen_tokens.inc(tokens)
        for gap, count in gaps.items():
            self.m_tpot.observe(gap, count)
        self._put_answers()  # before the clients hear of the ends: a next turn finds the state
        for req, deltas in by_req.values():
            self._emit(req, deltas)

    def _advance(self, s: Sequence, token: int, x: Sampled | None) -> Delta:
        """Append one sampled token to a sequence and decide whether it ends it. x: the token
        with its logprobs, when the request asks for them."""
        s.output_ids.append(token)
        ex = s.extra
        detok, stopper = ex["detok"], ex["stopper"]  # streaming.make_detokenizer, StopMatcher
        if token in ex["stop_ids"]:
            # A stop token ends the text and is not part of it.
            text, matched = stopper.push(detok.flush())
            if not matched:
                text += stopper.flush()
            s.finish("stop")
        else:
            text, matched = stopper.push(detok.push(token))
            if matched:
                s.finish("stop")
            elif len(s.output_ids) >= ex["params"].max_new_tokens:
                more, matched = stopper.push(detok.flush())
                text += more + ("" if matched else stopper.flush())
                s.finish("stop" if matched else "length")
        d = Delta(s.index, text, [token], [x] if x is not None else [], s.finish_reason)
        if s.finish_reason is not None:
            self._keep_final_state(s)
        return d

    def _keep_final_state(self, s: Sequence) -> None:
        """Keep a finished answer's state (for the caller, and in the prefix cache before the client
        hears of the end, so that a next turn sent at once already finds it). The step launched
        before this one fed the sequence's last token: the row has read the prompt and
        output_ids[:fed] (every returned token)."""
        if s.finish_reason not in ("stop", "length"):
            return
        fed = min(s.extra["fed"], len(s.output_ids))
        req = s.request
        if req.extra.get("want_state"):  # a caller's state keeps State's fp32 SSM (its files need it)
            st = self.pool.read(s.key)
            s.extra["state"] = self._with_seen(State(st.config, st.conv, st.ssm.float()), req, fed)
        if self.cache.enabled and fed > 0:  # put at the end of _process (_put_answers)
            self._answer_puts.append((req.prompt_ids + s.output_ids[:fed], s.key))

    def _put_answers(self) -> None:
        """The answers that ended at this step into the prefix cache: only the last ones the
        cache keeps (a wave of answers ending together would evict each other's at once)."""
        puts, self._answer_puts = self._answer_puts, []
        if not puts:
            return
        for ids, key in self.cache.kept_of(puts, self.pool.state.nbytes // self.pool.num_rows):
            if key in self.pool:  # (a failed step may have freed it)
                self.cache.put(ids, self.pool.read(key, self.cache.device))

    def _release(self, s: Sequence, now: float) -> None:
        """A sequence ended (its row already freed by _execute)."""
        self._live.pop(s.key, None)
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

    def _fail_request(self, req: Request, why: str) -> None:
        deltas = []
        for s in req.seqs:
            if not s.finished:
                s.finish("error")
                deltas.append(Delta(s.index, finish_reason="error", error=why))
        req.cancel()  # so the scheduler gives the slots back
        self._emit(req, deltas)

    def _fail(self, plan: StepPlan, why: str) -> None:
        reqs = {c.request.uid: c.request for c in plan.prefill}
        reqs.update({s.request.uid: s.request for s in plan.decode})
        reqs.update({r.uid: r for r in plan.admitted})
        for req in reqs.values():
            self._fail_request(req, why)
        self._pending = None  # that step's results cannot be trusted

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
