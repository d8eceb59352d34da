"""Generation: prefill (parallel | chunked), decode (one step per token), generate().

    text  = generate(model, tok, "prompt", max_new_tokens=64, temperature=0.0)   # new text only
    texts = generate(model, tok, ["a", "longer prompt"], max_new_tokens=64)     # list[str]
    for piece in generate(model, tok, "prompt", stream=True): ...               # text pieces
    res   = generate(model, tok, "prompt", details=True)   # GenerationResult: ids, logprobs, state

The recurrent state replaces a KV cache: prefill folds the prompt into a fixed-size State, chunked
prefill does it C tokens at a time (memory depends on C, not on the prompt length), and each decode
step updates the State in place (constant time and memory per token).

generate() runs the serving engine (engine/engine.py) in the caller's thread, so the CLI, chat,
the Python API and the HTTP server decode through one path: a batch of prompts is read in batched
launches and decoded together through the CUDA-graph step with the sampler on the GPU; row i
samples with seed + i from its own counter-based random stream, so its output is the output of
running it alone with seed + i.

Legend: B batch, L length, V vocab.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from falcon_mamba.decode.modes import DecodeOptions
from falcon_mamba.errors import UserError
from falcon_mamba.sampling import SamplingParams, random_seed
from falcon_mamba.state import State
from falcon_mamba.tokens import check_token_ids, encode_prompt, stop_token_ids  # noqa: F401 (re-exported)

DEFAULT_CHUNK_SIZE = 2048  # "auto" prefill reads prompts longer than this in chunks of this size
PREFILL_MODES = ("auto", "parallel", "chunked")


# ---- prefill and decode ----------------------------------------------------------------------
@torch.no_grad()
def prefill(model, ids: Sequence[int] | torch.Tensor, state: State | None = None, *,
            mode: str = "auto", chunk_size: int | None = None,
            progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, State]:
    """Fold a prompt into the state. ids: (B, L) int64 or one row as a list -> (logits (B, V) fp32
    of the last position, the state after the prompt). ``state`` is read, never modified.

    mode "parallel" runs the whole prompt through the scan at once; "chunked" runs chunk_size tokens
    at a time, carrying the state, so peak memory depends on chunk_size and not on L; "auto" is
    parallel up to chunk_size tokens and chunked above. progress(n) is called with the number of
    tokens read after each chunk.
    """
    if mode not in PREFILL_MODES:
        raise UserError(f"prefill mode {mode!r} is unknown; use one of {', '.join(PREFILL_MODES)}")
    chunk = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise UserError(f"chunk size must be a positive integer, got {chunk_size!r}")
    ids_BL = torch.as_tensor(ids, dtype=torch.long, device=model.device)
    if ids_BL.dim() == 1:
        ids_BL = ids_BL[None]
    check_token_ids(ids_BL, model.config.vocab_size)
    L = ids_BL.shape[1]
    if mode == "parallel" or (mode == "auto" and L <= chunk):
        chunk = L
    logits = None
    for start in range(0, L, chunk):
        logits, state = model(ids_BL[:, start:start + chunk], state=state, last_only=True)
        if progress is not None:
            progress(min(chunk, L - start))
    return logits[:, -1], state


@torch.no_grad()
def decode_step(model, tokens_B: torch.Tensor, state: State) -> torch.Tensor:
    """One token per row: tokens (B,) -> next-token logits (B, V) fp32; ``state`` is updated in
    place (model.step, eager: the building block for a caller's own loop; generate() and the
    server decode through the engine's graphed step with the sampler inside)."""
    return model.step(tokens_B, state)


# ---- generate(): the serving engine, run in the caller's thread -------------------------------------
@dataclass
class GenerationResult:
    """One row's output. ``text`` excludes the prompt, stop tokens and stop strings.

    token_ids: every generated id, a final stop token included. finish_reason: "stop" (a stop
    token or string), "length" (max_new_tokens), "interrupted" (the caller stopped early) or
    "error" (the model gave no finite logit; ``error`` says so). state: the state after the prompt
    and all of token_ids, ready to continue from; prompt_state: the state after the prompt alone.
    """

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    seed: int | None = None
    state: State | None = None
    prompt_state: State | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    error: str | None = None


_engines: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (Engine, DecodeOptions)


def engine_for(model, tokenizer, rows: int, options: DecodeOptions | None = None):
    """The model's generation engine (kept while the model lives, so its decode graphs and tuned
    choices are reused), with at least ``rows`` state slots; a new one where more rows or other
    decode options are asked for."""
    from falcon_mamba.engine.engine import Engine, EngineConfig
    from falcon_mamba.engine.state_pool import bucket

    options = options or DecodeOptions()
    have = _engines.get(model)
    if have is not None and have.config.num_slots >= rows and have.config.decode == options:
        return have
    slots = max(bucket(rows), have.config.num_slots if have is not None else 1)
    _engines.pop(model, None)  # the old engine's pool and graphs go before the new ones are made
    have = None
    eng = Engine(model, tokenizer, EngineConfig(num_slots=slots, max_waiting=1 << 30, max_context=1 << 62,
                                                prefill_chunk=DEFAULT_CHUNK_SIZE, decode=options))
    _engines[model] = eng
    return eng


class _Collector:
    """The deltas of one request, gathered into a GenerationResult (and queued for streaming)."""

    def __init__(self, prompt_len: int, seed: int, logprobs: bool):
        self.result = GenerationResult(prompt_tokens=prompt_len, seed=seed, logprobs=[] if logprobs else None)
        self.pieces: list[str] = []
        self.req = None

    def __call__(self, deltas) -> None:
        r = self.result
        for d in deltas:
            r.token_ids.extend(d.token_ids)
            if r.logprobs is not None:
                r.logprobs.extend(x.logprob for x in d.logprobs)
            if d.text:
                r.text += d.text
                self.pieces.append(d.text)
            if d.finish_reason is not None:
                r.finish_reason = {"cancelled": "interrupted"}.get(d.finish_reason, d.finish_reason)
                r.error = d.error

    def finish(self) -> None:
        req, r = self.req, self.result
        s = req.seqs[0]
        r.state = s.extra.get("state")
        r.prompt_state = req.extra.get("prompt_state")
        if r.finish_reason is None:
            r.finish_reason = "interrupted"
        t_pre = req.extra.get("t_prefilled", req.arrival)
        r.prefill_seconds = t_pre - req.arrival
        r.decode_seconds = max(0.0, s.extra.get("t_last", t_pre) - t_pre)


class TextStream:
    """Iterator of the text pieces of one prompt; ``result`` (a GenerationResult, with the state
    after the text) is complete once the iteration ends. ``close()`` stops early (finish_reason
    "interrupted"); so does a KeyboardInterrupt during the iteration (re-raised)."""

    def __init__(self, engine, collector: _Collector):
        self._engine = engine
        self._c = collector
        self._closed = False

    def __iter__(self) -> Iterator[str]:
        eng, c = self._engine, self._c
        try:
            while True:
                while c.pieces:
                    yield c.pieces.pop(0)
                if c.req.finished or not eng.busy:
                    break
                _run_steps(eng, 1)
            _run_steps(eng, None)
            while c.pieces:
                yield c.pieces.pop(0)
        finally:
            self._end()

    def _end(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._c.req.finished:
            self._engine.cancel(self._c.req)
        try:
            if not getattr(self._engine, "broken", False):
                _run_steps(self._engine, None)
        finally:
            self._c.finish()

    def close(self) -> None:
        self._end()

    @property
    def result(self) -> GenerationResult:
        return self._c.result


def _run_steps(engine, n: int | None) -> None:
    """n engine steps (None: until idle). An exception that escapes a step (a KeyboardInterrupt)
    leaves the engine's bookkeeping mid-step: the engine is dropped, the next call builds one."""
    try:
        with torch.inference_mode():
            if n is None:
                while engine.busy:
                    engine.run_step()
            else:
                for _ in range(n):
                    if engine.busy:
                        engine.run_step()
    except BaseException:
        engine.broken = True
        for m, e in list(_engines.items()):
            if e is engine:
                _engines.pop(m, None)
        raise


def _start_states(state: State | None, n: int) -> list[State | None]:
    if state is None:
        return [None] * n
    if state.batch_size == n:
        return [state.select([i]) if n > 1 else state for i in range(n)]
    if state.batch_size == 1:
        return [state] * n  # one context forked into n continuations (a prompt never modifies it)
    raise UserError(f"the state holds {state.batch_size} rows but there are {n} prompts; "
                    "pass a state of 1 row or one row per prompt")


def generate(model, tokenizer, prompt: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]], *,
             params: SamplingParams | None = None, state: State | None = None, stream: bool = False,
             details: bool = False, prefill: str = "auto", chunk_size: int | None = None,
             progress: Callable[[int], None] | None = None, decode: DecodeOptions | None = None,
             **sampling):
    """Generate a continuation of one prompt or a batch of prompts.

    prompt: a string, a list of strings, a list of token ids or a list of such lists.
    Sampling options as keywords (max_new_tokens, temperature, top_k, top_p, min_p,
    repetition_penalty, seed, stop, stop_token_ids, ignore_eos, logprobs) or ``params``.
    state: continue from a saved State (1 row, shared by all prompts, or one row per prompt).
    prefill / chunk_size: "auto" | "parallel" | "chunked", see ``prefill()``.
    decode: DecodeOptions (batch-1 projection mode, PDL, CUDA graphs, tuning cache).
    Returns the new text (str, or list[str] for a batch); with ``details`` a GenerationResult (or a
    list) carrying token ids, logprobs, finish reasons, timings and the state after the text;
    with ``stream`` a TextStream of text pieces (one prompt only).

    Generation runs on the serving engine (engine/engine.py) in this thread: the prompts are read
    in batched launches, decoded together through the CUDA-graph step with the sampler on the GPU,
    and row i samples with seed + i from its own counter-based random stream, so its output is the
    output of running it alone with seed + i.
    """
    if params is None:
        params = SamplingParams(**sampling)
    elif sampling:
        raise UserError(f"pass sampling options either in params or as keywords, not both "
                        f"({', '.join(sampling)})")
    single = isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and len(prompt) > 0
                                         and all(isinstance(i, int) for i in prompt))
    if isinstance(prompt, torch.Tensor):
        single = prompt.dim() == 1
        prompt = prompt.tolist()
    prompts = [prompt] if single else list(prompt)
    if not prompts:
        raise UserError("empty prompt list: give at least one prompt")
    if stream and len(prompts) != 1:
        raise UserError("stream=True takes one prompt; call generate once per prompt to stream several")
    if prefill not in PREFILL_MODES:
        raise UserError(f"prefill mode {prefill!r} is unknown; use one of {', '.join(PREFILL_MODES)}")
    chunk = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise UserError(f"chunk size must be a positive integer, got {chunk_size!r}")
    V = model.config.vocab_size
    rows_ids = [encode_prompt(tokenizer, p, V) for p in prompts]
    starts = _start_states(state, len(rows_ids))
    seed = params.seed if params.seed is not None else random_seed()
    engine = engine_for(model, tokenizer, len(rows_ids), decode)
    want_state = details or stream or params.max_new_tokens == 0
    collectors = []
    for i, (ids, st) in enumerate(zip(rows_ids, starts)):
        c = _Collector(len(ids), seed + i, params.logprobs)
        row_chunk = len(ids) if prefill == "parallel" else chunk
        c.req = engine.submit(ids, dataclasses.replace(params, seed=seed + i), sink=c, state=st,
                              want_state=want_state, chunk=row_chunk, progress=progress, tokenizer=tokenizer)
        collectors.append(c)
    if stream:
        return TextStream(engine, collectors[0])
    try:
        _run_steps(engine, None)
    finally:
        for c in collectors:
            if not c.req.finished:
                engine.cancel(c.req)
        if engine.busy and not getattr(engine, "broken", False):
            _run_steps(engine, None)
    results = []
    for c in collectors:
        c.finish()
        results.append(c.result)
    if details:
        return results[0] if single else results
    texts = [r.text for r in results]
    return texts[0] if single else texts



def peak_memory(device: torch.device | str) -> tuple[int, str]:
    """(bytes, what was measured): peak CUDA allocation on a GPU, the process's peak resident set
    size on the CPU (Linux VmHWM)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "peak CUDA memory allocated"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "peak resident memory (RSS) of the process"
    except OSError:
        pass
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024, "peak resident memory (RSS) of the process"
