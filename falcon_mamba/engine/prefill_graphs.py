"""Prompt chunks of one row replayed as CUDA graphs: the launches of a chunk's eager forward cost
more host time than its GPU work.

Measured on the H200 (results/h200-profile-prefill-9786fe1.json, 7B, batch 1): the eager forward
of a 512-token chunk issues ~770 launches and returns to the host after 47-83 ms, while its GPU
work is ~32 ms; up to ~1,000 tokens a chunk is launch-bound. The engine thread waits for those
launches, and every decoding stream with it (a 100k-token prompt beside 32 streams: inter-token
p99 83 ms vs 12 ms alone), and a lone short prompt's first token waits ~50 ms.

So a chunk of one row of at most ``chunk`` tokens is read by graph replays:
- continuing (read on top of a state: a long prompt's later chunks, a prefix-cache hit's rest):
  graphs of ``chunk`` tokens and of every power of two below it; a chunk of another length (a
  long prompt's last one) is read as a few of those in sequence (160 = 128 + 32), each piece's
  final state the next one's start. (Measured beside 32 streams, the eager last chunk of a 100k
  prompt was one of the two slow steps behind the inter-token p99.);
- fresh: a prompt (or a long prompt's first chunk) of at most ``chunk`` tokens from nothing,
  left-padded to the next length bucket with a document reset at its first real token (the reset
  drops what the padding put into the state and the conv window: the runner's batched prefill
  pads the same way).
And several fresh prompts of one step (a burst of clients) are read by one replay of a graph of B
rows x L tokens, B and L the buckets at or above the batch's rows and longest prompt (B x L at
most ``max_tokens``): the eager forward of 12 prompts of 27 tokens took 107-172 ms of host time on
the H200 beside 64 streams (results/h200-serve-2449ead.json, its step log), its GPU work ~10 ms.
Its padding rows read nothing but a reset; their outputs are ignored.
Each graph reads its ids (and reset flags, or start state) from static buffers. The one-row graphs
write the last logits and the final state to static outputs of their own (one row each); the
batched graphs all write into one shared sink of ``ROW_BUCKETS[-1]`` rows (a B-row final state is
B x 37 MB for the 7B: per-graph outputs would hold gigabytes). The runner copies the outputs out
at once, because all prefill graphs share one memory pool and the sink (they never run at the
same time). Other chunks (several continuing rows, other lengths, the CPU) run eagerly. Capture
happens at warm-up (Engine.warm_up) or at first use; a capture that fails turns the graphs (or the
batched ones) off for this engine (eager prefill still works).

Legend: nL layers, L a bucket's length, K conv taps, D inner width, N state size, V vocab.
"""

from __future__ import annotations

import functools
import logging

import torch

from falcon_mamba.cuda_graph import capture as _capture
from falcon_mamba.state import State

log = logging.getLogger("falcon_mamba.engine")

MIN_BUCKET = 16  # the shortest fresh bucket: prompts this short differ little in cost
# Rows of the batched fresh graphs: a batch of k prompts replays the smallest bucket >= k (its
# padding rows cost GPU time: steps of 1.5x below 16 rows keep that under a third).
ROW_BUCKETS = (2, 4, 8, 12, 16, 24, 32, 48, 64)
# The fixed cost of one more replay in prompt tokens: the batched fresh graphs of 4 to 64 rows x 32
# tokens replayed in 9.3 to 63.5 ms of GPU on the H200 (7B; profile_prefill.py --batches,
# results/h200-prefill-batches-be6f849.txt): 28.2 us a token plus 5.7 ms a replay (its weight
# reads, 14.5 GB, and the launches' tails), ~200 tokens. Both scale with the parameter count, so
# the ratio holds for any model size on that GPU. plan_parts weighs padding rows against it: 49
# prompts of 27 tokens are a 48-row and a 1-row replay (1,968 token-equivalents), not one of 64
# rows (2,248).
REPLAY_TOKENS = 200


def fresh_buckets(chunk: int) -> list[int]:
    """Fresh-prompt lengths with a graph: powers of two from MIN_BUCKET up to chunk, and chunk."""
    out, L = [], MIN_BUCKET
    while L < chunk:
        out.append(L)
        L *= 2
    return out + [chunk]


@functools.lru_cache(maxsize=4096)
def plan_parts(lengths: tuple[int, ...], buckets: tuple[int, ...],
               batch_shapes: tuple[tuple[int, int], ...], replay_tokens: int = REPLAY_TOKENS
               ) -> tuple[int, ...] | None:
    """How to read fresh prompts of these lengths (longest first) in replays: the sizes of
    consecutive parts (each one row, replayed by its length's one-row graph, or a batch, replayed by
    the first (B, L) of batch_shapes with B >= its rows and L >= its longest), minimising the padded
    tokens plus replay_tokens per replay. None when some prompt fits no graph. O(len x
    ROW_BUCKETS); the runner calls it with bucketed lengths, so plans repeat and are cached."""
    n = len(lengths)
    INF = float("inf")

    seen: dict[tuple[int, int], float] = {}  # (rows, longest) -> cost: lengths repeat

    def cost(i: int, k: int) -> float:
        key = (k, lengths[i])
        if key not in seen:
            if k == 1:
                L = next((b for b in buckets if b >= lengths[i]), None)
                seen[key] = INF if L is None else replay_tokens + L
            else:
                shape = next(((B, L) for B, L in batch_shapes if B >= k and L >= lengths[i]), None)
                seen[key] = INF if shape is None else replay_tokens + shape[0] * shape[1]
        return seen[key]

    best, take = [0.0] * (n + 1), [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        best[i] = INF
        for k in {1, n - i, *(b for b in ROW_BUCKETS if b < n - i)}:
            c = cost(i, k) + best[i + k]
            if c < best[i]:
                best[i], take[i] = c, k
    if best[0] == INF:
        return None
    out, i = [], 0
    while i < n:
        out.append(take[i])
        i += take[i]
    return tuple(out)


def continuing_pieces(n: int, chunk: int) -> list[int]:
    """A continuing chunk of n <= chunk tokens as graph lengths read in sequence: chunk itself, or
    the powers of two of n's binary form, longest first (at most log2(chunk) + 1 pieces)."""
    if n == chunk:
        return [chunk]
    return [1 << b for b in range(n.bit_length() - 1, -1, -1) if n >> b & 1]


class _Graph:
    """One captured forward: static ids (1, L) int64, and reset (1, L) bool (fresh) or the start
    state (nL, 1, ...) that every continuing graph shares (they never run at once)."""

    def __init__(self, model, L: int, state_in: State | None, pool):
        dev = model.device
        self.L = L
        self.ids = torch.zeros(1, L, dtype=torch.long, device=dev)
        self.reset = None if state_in is not None else torch.zeros(1, L, dtype=torch.bool, device=dev)
        self.state = state_in
        self.graph, (self.logits_V, self.out) = _capture(lambda: self._body(model), pool)

    def _body(self, model):
        logits_B1V, out = model(self.ids, state=self.state, last_only=True, reset_BL=self.reset)
        return logits_B1V[0, -1], out


class _Sink:
    """The batched graphs' shared outputs: last logits (R, V) and final state (nL, R, ...) of R =
    ROW_BUCKETS[-1] rows, shaped and typed after the first forward's outputs."""

    def __init__(self, rows: int, logits_BV: torch.Tensor, out: State):
        self.logits = logits_BV.new_empty(rows, logits_BV.shape[-1])
        self.conv = out.conv.new_empty(out.conv.shape[0], rows, *out.conv.shape[2:])
        self.ssm = out.ssm.new_empty(out.ssm.shape[0], rows, *out.ssm.shape[2:])


class _BatchGraph:
    """One captured forward of B fresh rows of L tokens: static ids (B, L) int64 and reset (B, L)
    bool; writes rows [0, B) of the shared sink."""

    def __init__(self, model, B: int, L: int, pool, sinks: list):
        dev = model.device
        self.B, self.L = B, L
        self.ids = torch.zeros(B, L, dtype=torch.long, device=dev)
        self.reset = torch.zeros(B, L, dtype=torch.bool, device=dev)
        self.reset[:, 0] = True  # padding rows: a reset at their start, nothing else
        self._sinks = sinks  # [] until the first forward gives the outputs' shapes; then [sink]
        # one run before the capture (the one-row graphs' two cost ~6 s of start-up over 42 shapes)
        self.graph, _ = _capture(lambda: self._body(model), pool, warm_runs=1)

    def _body(self, model):
        logits_B1V, out = model(self.ids, last_only=True, reset_BL=self.reset)
        if not self._sinks:
            self._sinks.append(_Sink(ROW_BUCKETS[-1], logits_B1V[:, -1], out))
        sink = self._sinks[0]
        sink.logits[:self.B].copy_(logits_B1V[:, -1])
        sink.conv[:, :self.B].copy_(out.conv)
        sink.ssm[:, :self.B].copy_(out.ssm)


class PrefillGraphs:
    """The prefill graphs of one runner. enabled: CUDA with graphs allowed (decode's cuda_graphs)."""

    def __init__(self, model, chunk: int, enabled: bool, max_tokens: int | None = None):
        self.model = model
        self.chunk = chunk
        self.enabled = enabled and model.device.type == "cuda" and chunk >= 1
        self.buckets = fresh_buckets(chunk) if self.enabled else []
        # (B, L) of the batched fresh graphs: B x L <= max_tokens (default 4 chunks)
        self.max_tokens = max_tokens if max_tokens is not None else 4 * chunk
        self.batch_shapes = [(B, L) for L in self.buckets for B in ROW_BUCKETS if B * L <= self.max_tokens]
        self._batch_graphs: dict[tuple[int, int], _BatchGraph] = {}
        self._sinks: list[_Sink] = []
        self.batched = self.enabled  # turned off alone when a batched capture fails
        self.continuing_lengths = (sorted({self.chunk} | {1 << b for b in range(self.chunk.bit_length())
                                                           if 1 << b < self.chunk})
                                   if self.enabled else [])
        self._graphs: dict[tuple[int, bool], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.enabled else None
        self._state_in: State | None = None  # the continuing graphs' shared start state

    def fits(self, n_ids: int, continuing: bool) -> bool:
        """A chunk of one row with n_ids tokens is read by graphs (captured or not yet)."""
        return self.enabled and 1 <= n_ids <= self.chunk

    def plan(self, lengths: list[int]) -> tuple[int, ...] | None:
        """plan_parts for fresh prompts of these lengths (longest first) over this runner's graphs;
        None when graphs are off or some prompt fits none."""
        if not self.enabled:
            return None
        shapes = tuple(self.batch_shapes) if self.batched else ()
        return plan_parts(tuple(self._bucket(n) if n <= self.chunk else n for n in lengths),
                          tuple(self.buckets), shapes)

    def fits_batch(self, rows: int, longest: int) -> bool:
        """A batch of `rows` fresh prompts, the longest of `longest` tokens, is read by one batched
        graph replay (captured or not yet)."""
        return self.batched and 2 <= rows and self._batch_shape(rows, longest) is not None

    def capture_all(self) -> None:
        """Capture every graph now (warm-up), so that no request waits for a capture."""
        for L in self.buckets:
            self._get(L, False)
        for L in self.continuing_lengths:
            self._get(L, True)
        for B, L in self.batch_shapes:
            self._get_batch(B, L)

    def _batch_shape(self, rows: int, longest: int) -> tuple[int, int] | None:
        return next(((B, L) for B, L in self.batch_shapes if B >= rows and L >= longest), None)

    def _get_batch(self, B: int, L: int) -> _BatchGraph | None:
        g = self._batch_graphs.get((B, L))
        if g is None and self.batched:
            try:
                g = self._batch_graphs[(B, L)] = _BatchGraph(self.model, B, L, self._pool, self._sinks)
            except Exception:  # noqa: BLE001 - e.g. out of memory: batches of prompts run eagerly
                log.exception("capturing the prefill graph of %d x %d tokens failed; batches of "
                              "prompts are read eagerly", B, L)
                self.batched = False
                self._batch_graphs.clear()
                self._sinks.clear()
                return None
        return g

    def run_batch(self, prompts: list[list[int]]) -> list[tuple[torch.Tensor, State]] | None:
        """Read several fresh prompts (fits_batch) in one replay. Returns, per prompt, (last logits
        (V,), final state (1 row)): views of fresh tensors; None when no graph could be had."""
        k = len(prompts)
        shape = self._batch_shape(k, max(len(p) for p in prompts))
        g = self._get_batch(*shape) if shape is not None else None
        if g is None:
            return None
        B, L = shape
        host = torch.zeros(B, L, dtype=torch.long)
        flags = torch.zeros(B, L, dtype=torch.bool)
        flags[k:, 0] = True
        for b, p in enumerate(prompts):
            host[b, L - len(p):] = torch.as_tensor(p, dtype=torch.long)
            flags[b, L - len(p)] = True
        g.ids.copy_(host.pin_memory(), non_blocking=True)
        g.reset.copy_(flags.pin_memory(), non_blocking=True)
        g.graph.replay()
        sink = self._sinks[0]
        logits, conv, ssm = sink.logits[:k].clone(), sink.conv[:, :k].clone(), sink.ssm[:, :k].clone()
        cfg = self.model.config
        return [(logits[b], State(cfg, conv[:, b:b + 1], ssm[:, b:b + 1])) for b in range(k)]

    def _bucket(self, n: int) -> int:
        return next(L for L in self.buckets if L >= n)

    def _get(self, L: int, continuing: bool) -> _Graph | None:
        key = (L, continuing)
        g = self._graphs.get(key)
        if g is None and self.enabled:
            try:
                if continuing and self._state_in is None:
                    self._state_in = State.zeros(self.model.config, 1, self.model.dtype, self.model.device)
                g = self._graphs[key] = _Graph(self.model, L, self._state_in if continuing else None,
                                               self._pool)
            except Exception:  # noqa: BLE001 - e.g. an op that cannot be captured: stay eager
                log.exception("capturing the prefill graph of %d tokens failed; prefill runs eagerly",
                              L)
                self.enabled = False
                self._graphs.clear()
                return None
        return g

    def run(self, ids: list[int], start: State | None) -> tuple[torch.Tensor, State] | None:
        """Read one chunk: ids (fits()), from the 1-row state ``start`` (continuing) or from nothing.
        Returns (last logits (V,) fp32, final state (1 row)), both fresh tensors, or None when no
        graph could be had (the caller runs the chunk eagerly)."""
        n = len(ids)
        if start is None:
            L = self._bucket(n)
            g = self._get(L, False)
            if g is None:
                return None
            host = torch.zeros(1, L, dtype=torch.long)
            host[0, L - n:] = torch.as_tensor(ids, dtype=torch.long)
            flags = torch.zeros(1, L, dtype=torch.bool)
            flags[0, L - n] = True
            g.ids.copy_(host.pin_memory(), non_blocking=True)
            g.reset.copy_(flags.pin_memory(), non_blocking=True)
            g.graph.replay()
            return g.logits_V.clone(), State(self.model.config, g.out.conv.clone(), g.out.ssm.clone())
        pieces = continuing_pieces(n, self.chunk)
        graphs = [self._get(L, True) for L in pieces]
        if any(g is None for g in graphs):
            return None
        host = torch.as_tensor(ids, dtype=torch.long).pin_memory()
        cur, at = start, 0
        for g in graphs:
            g.ids.copy_(host[at:at + g.L][None], non_blocking=True)
            at += g.L
            if cur is not g.state:
                g.state.conv.copy_(cur.conv)
                g.state.ssm.copy_(cur.ssm)
            g.graph.replay()
            cur = g.out
        return g.logits_V.clone(), State(self.model.config, cur.conv.clone(), cur.ssm.clone())
