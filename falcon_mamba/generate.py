"""Generation: prefill (parallel | chunked), decode (one step per token), generate().

    text  = generate(model, tok, "prompt", max_new_tokens=64, temperature=0.0)   # new text only
    texts = generate(model, tok, ["a", "longer prompt"], max_new_tokens=64)     # list[str]
    for piece in generate(model, tok, "prompt", stream=True): ...               # text pieces
    res   = generate(model, tok, "prompt", details=True)   # GenerationResult: ids, logprobs, state

The recurrent state replaces a KV cache: prefill folds the prompt into a fixed-size State, chunked
prefill does it C tokens at a time (memory depends on C, not on the prompt length), and each decode
step updates the State in place (constant time and memory per token).

A batch of prompts is prefilled row by row (no padding, so no padding artefacts) and decoded
together; row i samples from its own generator seeded with seed + i, so its output is the output
of running it alone with seed + i.

Legend: B batch, L length, V vocab.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from falcon_mamba.errors import UserError
from falcon_mamba.sampling import (
    SamplingParams,
    make_generators,
    random_seed,
    sample,
    token_logprobs,
)
from falcon_mamba.state import State
from falcon_mamba.streaming import IncrementalDetokenizer, StopMatcher

DEFAULT_CHUNK_SIZE = 2048  # "auto" prefill reads prompts longer than this in chunks of this size
PREFILL_MODES = ("auto", "parallel", "chunked")


# ---- prompts --------------------------------------------------------------------------------
def check_token_ids(ids: Sequence[int] | torch.Tensor, vocab_size: int) -> None:
    """UserError unless every id is in [0, vocab_size)."""
    t = torch.as_tensor(ids)
    if t.numel() == 0:
        raise UserError("empty prompt: give at least one token of text")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise UserError(f"token ids must be integers, got {t.dtype}")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise UserError(f"token id {bad} is outside the model's vocabulary [0, {vocab_size}); "
                        "use ids from the model's own tokenizer")


def encode_prompt(tokenizer, prompt: str | Sequence[int], vocab_size: int) -> list[int]:
    """A prompt as text or token ids -> validated token ids."""
    if isinstance(prompt, str):
        if not prompt:
            raise UserError("empty prompt: give at least one character of text")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, torch.Tensor):
        ids = prompt.reshape(-1).tolist()
    else:
        ids = list(prompt)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise UserError("a prompt is a string or a list of integer token ids")
    check_token_ids(ids, vocab_size)
    return ids


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


def decode_step(model, tokens_B: torch.Tensor, state: State) -> torch.Tensor:
    """One token per row: tokens (B,) -> next-token logits (B, V) fp32; ``state`` is updated in
    place. Every decode goes through here (the place for a CUDA-graph decoder)."""
    from falcon_mamba.decode_graph import maybe_graphed_step  # CUDA graphs on the triton backend

    logits = maybe_graphed_step(model, tokens_B, state)
    return logits if logits is not None else model.step(tokens_B, state)


# ---- decoding a prefilled batch -------------------------------------------------------------------
@dataclass
class GenerationResult:
    """One row's output. ``text`` excludes the prompt, stop tokens and stop strings.

    token_ids: every generated id, a final stop token included. finish_reason: "stop" (a stop
    token or string), "length" (max_new_tokens) or "interrupted". state (when asked for): the
    state after the prompt and all of token_ids, ready to continue from.
    """

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    seed: int | None = None
    state: State | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


class _Row:
    """Bookkeeping of one sequence being decoded."""

    def __init__(self, tokenizer, params: SamplingParams, prompt_ids: Sequence[int], seed: int,
                 stop_ids: set[int]):
        self.params = params
        self.stop_ids = stop_ids
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.matcher = StopMatcher(params.stop)
        self.result = GenerationResult(prompt_tokens=len(prompt_ids), seed=seed,
                                       logprobs=[] if params.logprobs else None)

    def accept(self, token: int) -> str:
        """Take a sampled token; return the text it releases and set finish_reason when done."""
        r = self.result
        r.token_ids.append(token)
        if token in self.stop_ids:
            r.finish_reason = "stop"
            return self._emit(self.detok.flush(), final=True)
        piece = self._emit(self.detok.push(token))
        if r.finish_reason is None and len(r.token_ids) >= self.params.max_new_tokens:
            r.finish_reason = "length"
            piece += self._emit(self.detok.flush(), final=True)
        return piece

    def _emit(self, text: str, final: bool = False) -> str:
        if self.result.finish_reason == "stop" and not final:
            return ""
        out, matched = self.matcher.push(text)
        if matched:
            self.result.finish_reason = "stop"
        elif final:
            out += self.matcher.flush()
        self.result.text += out
        return out


def stop_token_ids(tokenizer, model, params: SamplingParams) -> set[int]:
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            eos = model.config.eos_token_id
        if eos is not None:
            ids.add(eos)
    return ids


@torch.no_grad()
def decode(model, tokenizer, logits_BV: torch.Tensor, state: State,
           params: SamplingParams | Sequence[SamplingParams], prompt_ids: Sequence[Sequence[int]],
           seeds: Sequence[int], results: list[GenerationResult], want_state: bool = False,
           tokens_seen: Sequence[int] | None = None) -> Iterator[tuple[int, str]]:
    """Decode a prefilled batch until every row stops. Yields (row, text piece); fills ``results``
    (one per row, in order) as rows finish. ``state`` is consumed (updated in place).
    tokens_seen: per row, the tokens its state has read (default: state.tokens_seen for all)."""
    B = logits_BV.shape[0]
    rows_params = [params] * B if isinstance(params, SamplingParams) else list(params)
    rows = [_Row(tokenizer, p, ids, s, stop_token_ids(tokenizer, model, p))
            for p, ids, s in zip(rows_params, prompt_ids, seeds)]
    results[:] = [r.result for r in rows]
    gens = [make_generators(s, 1, logits_BV.device)[0] for s in seeds]
    seen_BV = None
    if any(p.repetition_penalty != 1.0 for p in rows_params):
        seen_BV = torch.zeros(B, logits_BV.shape[1], dtype=torch.bool, device=logits_BV.device)
        for b, ids in enumerate(prompt_ids):
            seen_BV[b, torch.as_tensor(list(ids), dtype=torch.long, device=seen_BV.device)] = True
    start = time.perf_counter()
    base_seen = list(tokens_seen) if tokens_seen is not None else [state.tokens_seen] * B
    active = []
    for b, row in enumerate(rows):
        if row.params.max_new_tokens == 0:
            row.result.finish_reason = "length"
            if want_state:
                row.result.state = _row_state(state, b, base_seen[b])
        else:
            active.append(b)
    if len(active) < B:
        state = state.select(active) if active else state
        logits_BV = logits_BV[active]
    try:
        while active:
            tokens_B = sample(logits_BV, [rows[b].params for b in active], [gens[b] for b in active],
                              None if seen_BV is None else seen_BV[active])
            lps = token_logprobs(logits_BV, tokens_B).tolist() if any(
                rows[b].params.logprobs for b in active) else None
            done = []
            for j, (b, tok) in enumerate(zip(active, tokens_B.tolist())):
                row = rows[b]
                if seen_BV is not None:
                    seen_BV[b, tok] = True
                if lps is not None and row.result.logprobs is not None:
                    row.result.logprobs.append(lps[j])
                piece = row.accept(tok)
                if piece:
                    yield b, piece
                if row.result.finish_reason is not None:
                    row.result.decode_seconds = time.perf_counter() - start
                    done.append(j)
            keep = [j for j in range(len(active)) if j not in done]
            if done and want_state:
                # Finished rows take this step too, so their saved state has read their last token.
                logits_BV = decode_step(model, tokens_B, state)
                for j in done:
                    b = active[j]
                    rows[b].result.state = _row_state(state, j, base_seen[b] + len(rows[b].result.token_ids))
                if keep:
                    state, logits_BV = state.select(keep), logits_BV[keep]
            elif keep:
                if done:
                    state, tokens_B = state.select(keep), tokens_B[keep]
                logits_BV = decode_step(model, tokens_B, state)
            active = [active[j] for j in keep]
    finally:
        for row in rows:
            if row.result.finish_reason is None:  # the consumer stopped early or an error/Ctrl-C
                row.result.finish_reason = "interrupted"
                row.result.decode_seconds = time.perf_counter() - start


def _row_state(state: State, j: int, tokens_seen: int) -> State:
    s = state.select([j]) if state.batch_size > 1 else state.clone()
    s.tokens_seen = tokens_seen
    return s


# ---- the public entry point -------------------------------------------------------------------
class TextStream:
    """Iterator of the text pieces of one prompt; ``result`` (a GenerationResult, with the state
    after the text) is complete once the iteration ends. ``close()`` stops early (finish_reason
    "interrupted")."""

    def __init__(self, events: Iterator[tuple[int, str]], results: list[GenerationResult],
                 on_end: Callable[[], None] | None = None):
        self._events = events
        self._results = results
        self._on_end = on_end

    def __iter__(self) -> Iterator[str]:
        for _, piece in self._events:
            yield piece
        if self._on_end is not None:
            self._on_end()

    def close(self) -> None:
        self._events.close()

    @property
    def result(self) -> GenerationResult:
        return self._results[0]


def _start_states(state: State | None, n: int) -> list[State | None]:
    if state is None:
        return [None] * n
    if state.batch_size == n:
        return [state.select([i]) if n > 1 else state for i in range(n)]
    if state.batch_size == 1:
        return [state] * n  # one context forked into n continuations (prefill never modifies it)
    raise UserError(f"the state holds {state.batch_size} rows but there are {n} prompts; "
                    "pass a state of 1 row or one row per prompt")


def generate(model, tokenizer, prompt: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]], *,
             params: SamplingParams | None = None, state: State | None = None, stream: bool = False,
             details: bool = False, prefill: str = "auto", chunk_size: int | None = None,
             progress: Callable[[int], None] | None = None, **sampling):
    """Generate a continuation of one prompt or a batch of prompts.

    prompt: a string, a list of strings, a list of token ids or a list of such lists.
    Sampling options as keywords (max_new_tokens, temperature, top_k, top_p, min_p,
    repetition_penalty, seed, stop, stop_token_ids, ignore_eos, logprobs) or ``params``.
    state: continue from a saved State (1 row, shared by all prompts, or one row per prompt).
    prefill / chunk_size: "auto" | "parallel" | "chunked", see ``prefill()``.
    Returns the new text (str, or list[str] for a batch); with ``details`` a GenerationResult (or a
    list) carrying token ids, logprobs, finish reasons, timings and the state after the text;
    with ``stream`` a TextStream of text pieces (one prompt only).
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
    V = model.config.vocab_size
    rows_ids = [encode_prompt(tokenizer, p, V) for p in prompts]
    seed = params.seed if params.seed is not None else random_seed()
    seeds = [seed + i for i in range(len(rows_ids))]

    t0 = time.perf_counter()
    logits, states = [], []
    for ids, st in zip(rows_ids, _start_states(state, len(rows_ids))):
        lg, st = _prefill(model, ids, st, mode=prefill, chunk_size=chunk_size, progress=progress)
        logits.append(lg)
        states.append(st)
    batch_state = State.cat(states) if len(states) > 1 else states[0]
    prefill_s = time.perf_counter() - t0
    results: list[GenerationResult] = []
    events = decode(model, tokenizer, torch.cat(logits), batch_state, params, rows_ids, seeds,
                    results, want_state=details or stream, tokens_seen=[s.tokens_seen for s in states])

    def finish():
        for r in results:
            r.prefill_seconds = prefill_s

    if stream:
        return TextStream(events, results, finish)
    for _ in events:
        pass
    finish()
    if details:
        return results[0] if single else results
    texts = [r.text for r in results]
    return texts[0] if single else texts


_prefill = prefill  # generate() has a keyword argument of the same name


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
