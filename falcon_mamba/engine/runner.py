"""The runner: executes the engine's work on the model. All the torch of the engine is here.

- Decode: one step of the pool's decoding rows through decode/graphs.py (a CUDA-graph replay on a
  GPU: the fused step, then the sampler writes each row's next token where the next step reads it).
  Nothing is read back here.
- Prefill: the prompt chunks of one engine step, batched: chunks that start a prompt from nothing
  are left-padded to the batch's length with a document reset at their first token (the reset
  drops whatever the padding put into the state and the conv window, so each row's final state and
  last logits are those of its prompt alone), chunks that continue from a state (a prompt's later
  chunks, a prefix-cache hit, a caller's state) batch with chunks of exactly their length. Few,
  wide launches instead of one per prompt. A chunk of one row at a fixed shape (a prompt of up to
  ``prefill_chunk`` tokens from nothing, a long prompt's middle chunks), and a batch of fresh
  prompts up to 64 rows, are CUDA-graph replays instead (engine/prefill_graphs.py: the eager
  launches cost more host time than their GPU work).
- Sampling of a prompt's first token: the same sampler, on the rows the prompt's sequences join.
- Readback: the step's tokens, log-probabilities and statuses are copied to pinned host memory
  behind the step, with an event; the engine reads them while the GPU already runs the next step.

Legend: B rows, L chunk length, V vocab, T top-logprobs count.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from falcon_mamba.decode.graphs import DecodeGraphs
from falcon_mamba.decode.modes import DecodeOptions
from falcon_mamba.engine.prefill_graphs import PrefillGraphs
from falcon_mamba.engine.state_pool import StatePool
from falcon_mamba.state import State

# A batch of prompt chunks may hold at most this many padding tokens per real token (left padding of
# fresh prompts up to the longest chunk of the batch); past that the chunk starts another batch.
PAD_RATIO = 0.25
PAD_SLACK = 32  # ...plus this many padding tokens, so short prompts always batch together
# A batch of at most this many chunks that prefill graphs read is replayed chunk by chunk: eight
# batch-1 replays of the 7B are ~30 ms of GPU work, less than one eager forward's host time.
GRAPH_ROWS = 8


@dataclass
class Sampled:
    """One generated token of one sequence, with its log-probability information if asked."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first


@dataclass
class PrefillWork:
    """One prompt chunk to read: ids, the pool row holding the state it continues (None: from
    nothing), and whether it ends the prompt (else its state goes back into ``row``)."""

    ids: list[int]
    row: int | None  # parked row of the request
    continues: bool  # the chunk starts from the state in `row` (else from a zero state)
    is_last: bool
    tag: object = None  # the caller's handle (the engine's chunk)


# a prompt chunk that ended its prompt: (its work, last logits (V,), final state (1 row))
Done = tuple[PrefillWork, torch.Tensor, State]


@dataclass
class Pending:
    """The host copies of one step's results, valid once ``wait()`` returns. keys[i]: the sequence
    key of row i at the time of the step."""

    keys: list
    tokens: torch.Tensor
    logprob: torch.Tensor
    status: torch.Tensor
    top_values: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    event: torch.cuda.Event | None = None
    extra: dict = field(default_factory=dict)

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class Runner:
    def __init__(self, model, pool: StatePool, options: DecodeOptions | None = None,
                 prefill_chunk: int = 576, prefill_budget: int | None = None):
        self.model = model
        self.pool = pool
        self.device = model.device
        self.graphs = DecodeGraphs(model, pool, options)
        # batched prompt graphs up to twice a step's prompt tokens: room for the padding to buckets
        self.prefill_graphs = PrefillGraphs(model, prefill_chunk, self.graphs.use_graphs,
                                            2 * (prefill_budget or 4 * prefill_chunk))
        self._step_logits: list[torch.Tensor] = []  # raw logits of this step's rows, in row order

    # ---- decode --------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, rows: int) -> None:
        """One step for the pool's decoding rows [0, rows)."""
        logits = self.graphs.step(rows)
        self._step_logits = [logits[:rows]]

    # ---- prefill -------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, works: Seq[PrefillWork]) -> list[Done]:
        """Read these chunks (batched). Chunks that do not end their prompt have their state written
        back into their row; for those that do: (work, logits (V,) fp32, their state (1 row, a view
        of this batch's output: copy it before the next prefill))."""
        done: list[Done] = []
        for group in _batches(works):
            done.extend(self._prefill_batch(group))
        return done

    @torch.inference_mode()
    def warm_prefill(self) -> None:
        """Run one of each kind of eager prefill batch on scratch rows (fresh prompts alone and
        padded with document resets, chunks that continue a state alone and gathered), so that
        Triton compiles those kernel variants now rather than during the first requests (measured
        on the H200: a first batch of 16 prompts waited 2.2 s for its compiles; a first burst of 64
        prompts 2.5 s when the warm-up's small batches went through the prefill graphs instead).
        Eagerly on purpose: the graphs are captured by PrefillGraphs.capture_all. The rows'
        contents are left as they were."""
        V = self.model.config.vocab_size
        top = self.pool.num_rows - 1
        saved = self.pool.gather([top, top - 1])
        ids = [(i * 7919) % V for i in range(48)]
        # Triton specialises integer arguments on == 1 and on divisibility by 16: batches of 1, 3
        # and 16 rows crossed with lengths of 17 and 32 (rows x length: 17, 32, 51, 96, 272, 512)
        for B in (1, 3, 16):
            for L in (17, 32):
                fresh = [PrefillWork(ids[:L], None, False, True) for _ in range(B)]
                padded = [PrefillWork(ids[:L - (i % 2) * (i % 5 + 1)], None, False, True) for i in range(B)]
                rows = [top - (i % 2) for i in range(B)]  # continuing rows may repeat: scratch
                continuing = [PrefillWork(ids[:L], r, True, i % 2 == 0) for i, r in enumerate(rows)]
                for works in (fresh, padded, continuing):
                    self._prefill_eager(works)
        self.pool.write_rows(top - 1, State(saved.config, saved.conv[:, 1:], saved.ssm[:, 1:]))
        self.pool.write_rows(top, State(saved.config, saved.conv[:, :1], saved.ssm[:, :1]))

    def warm_sampler(self) -> None:
        """Draw first tokens once per sampler variant on scratch tensors (the pool is untouched):
        launch configurations for up to / more than one row per SM, with and without the seen
        table of repetition penalties, at an odd row offset (as a step's joining rows start)."""
        from falcon_mamba.ops.sample import SamplerRows, sample_rows
        from falcon_mamba.ops.triton_sample import default_config

        V, dev = self.model.config.vocab_size, self.device
        sizes = {}
        for B in (1, 3, 16, 64, 256, 512):  # one per launch configuration
            sizes.setdefault(default_config(B, dev), B)
        for B in sizes.values():
            for seen in (None, V):
                rows = SamplerRows.empty(B + 1, dev, seen).rows(1, B)
                rows.temperature.fill_(0.7)
                logits = torch.randn(B, V, device=dev)
                out = [torch.empty(B + 1, dtype=dt, device=dev)[1:]
                       for dt in (torch.long, torch.float32, torch.int32)]
                sample_rows(logits, rows, *out)

    def _prefill_batch(self, group: list[PrefillWork]) -> list[Done]:
        """One batch of _batches: several fresh prompts by batched graph replays; else up to
        GRAPH_ROWS chunks that graphs read are replayed one by one
        (a 7B batch-1 replay is ~4 ms of GPU work, an eager forward of any batch 50-80 ms of host
        launches: H200, results/h200-profile-prefill-*.json); the rest in one eager forward."""
        done, eager = [], list(group)
        graphs = self.prefill_graphs
        if len(group) > 1 and not any(w.continues for w in group):
            return self._prefill_fresh_batches(group)
        if len(group) <= GRAPH_ROWS and all(graphs.fits(len(w.ids), w.continues) for w in group):
            eager = []
            for w in group:
                start = self._initial_states([w.row]) if w.continues else None
                res = graphs.run(w.ids, start)
                if res is None:  # no graph could be captured: eagerly, with the others left
                    eager.append(w)
                elif w.is_last:
                    done.append((w, *res))
                else:
                    self.pool.write_rows(w.row, res[1])
        if eager:
            done.extend(self._prefill_eager(eager))
        return done

    def _prefill_fresh_batches(self, group: list[PrefillWork]) -> list[Done]:
        """Fresh prompts of one batch, longest first, in the graph replays prefill_graphs.plan_parts
        picks (batches of at most ROW_BUCKETS[-1] rows, and single rows where a padded batch would
        cost more; results/h200-serve-2449ead.json: an eager batch of 12 short prompts took
        107-172 ms of host launches), eagerly where no graph fits or none could be had."""
        graphs, done, eager = self.prefill_graphs, [], []
        order = sorted(group, key=lambda w: -len(w.ids))
        sizes = graphs.plan([len(w.ids) for w in order])
        if sizes is None:
            return self._prefill_eager(order)
        at = 0
        for k in sizes:
            part, at = order[at:at + k], at + k
            if k == 1:
                one = graphs.run(part[0].ids, None)
                res = [one] if one is not None else None
            else:
                res = graphs.run_batch([w.ids for w in part])
            if res is None:
                eager.extend(part)
                continue
            for w, (logits_V, st) in zip(part, res):
                if w.is_last:
                    done.append((w, logits_V, st))
                else:
                    self.pool.write_rows(w.row, st)
        if eager:
            done.extend(self._prefill_eager(eager))
        return done

    def _prefill_eager(self, group: list[PrefillWork]) -> list[Done]:
        L = max(len(w.ids) for w in group)
        ids = torch.zeros(len(group), L, dtype=torch.long)
        reset = torch.zeros(len(group), L, dtype=torch.bool)
        padded = False
        for b, w in enumerate(group):
            ids[b, L - len(w.ids):] = torch.as_tensor(w.ids, dtype=torch.long)
            if len(w.ids) < L:
                assert not w.continues, "a chunk that continues a state is never padded"
                reset[b, L - len(w.ids)] = True
                padded = True
        state = None
        if any(w.continues for w in group):
            rows = [w.row if w.continues else None for w in group]
            state = self._initial_states(rows)
        dev = self.device
        pin = dev.type == "cuda"
        ids = ids.pin_memory().to(dev, non_blocking=True) if pin else ids
        reset_BL = None
        if padded:
            reset_BL = reset.pin_memory().to(dev, non_blocking=True) if pin else reset
        logits_B1V, out = self.model(ids, state=state, last_only=True, reset_BL=reset_BL)
        done = []
        for b, w in enumerate(group):
            st = State(self.model.config, out.conv[:, b:b + 1], out.ssm[:, b:b + 1])
            if w.is_last:
                done.append((w, logits_B1V[b, -1], st))
            else:
                self.pool.write_rows(w.row, st)
        return done

    def _initial_states(self, rows: list[int | None]) -> State:
        """The start state of each batch row: the pool row's, or zeros (None). One row that
        continues: a view of its pool row (the forward only reads it). No host synchronisation:
        the row indices go to the device through pinned memory."""
        pool = self.pool
        if len(rows) == 1:
            r = rows[0]
            return State(self.model.config, pool.state.conv[:, r:r + 1], pool.state.ssm[:, r:r + 1])
        st = State.zeros(self.model.config, len(rows), self.model.dtype, self.device)
        have = [(b, r) for b, r in enumerate(rows) if r is not None]
        idx_b = _to_device([b for b, _ in have], self.device)
        idx_r = _to_device([r for _, r in have], self.device)
        st.conv.index_copy_(1, idx_b, pool.state.conv.index_select(1, idx_r))
        st.ssm.index_copy_(1, idx_b, pool.state.ssm.index_select(1, idx_r).to(st.ssm.dtype))
        return st

    # ---- a prompt's first token ----------------------------------------------------------------
    @torch.inference_mode()
    def sample_joined(self, first: int, logits_JV: torch.Tensor) -> None:
        """Draw the first token of the sequences that joined at rows first..first+J-1 (their
        sampling rows are set) from their prompts' last logits."""
        from falcon_mamba.ops.sample import sample_rows

        J = logits_JV.shape[0]
        p = self.pool
        sl = slice(first, first + J)
        sample_rows(logits_JV, p.sampler_rows(first, J), p.tokens[sl], p.logprob[sl], p.status[sl])
        self._step_logits.append(logits_JV)

    # ---- reading results back ------------------------------------------------------------------
    @torch.inference_mode()
    def readback(self, keys: list, top_logprobs: int = 0) -> Pending:
        """Copy the results of rows [0, len(keys)) (this step's decode rows, then the rows that
        joined) to the host behind the step; top_logprobs > 0 also takes the T most likely tokens
        of each row's raw distribution."""
        n = len(keys)
        p = self.pool
        cuda = self.device.type == "cuda"

        def host(t: torch.Tensor) -> torch.Tensor:
            if not cuda:
                return t.clone()
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            out.copy_(t, non_blocking=True)
            return out

        pend = Pending(list(keys), host(p.tokens[:n]), host(p.logprob[:n]), host(p.status[:n]))
        if top_logprobs > 0 and self._step_logits:
            logits = torch.cat(self._step_logits) if len(self._step_logits) > 1 else self._step_logits[0]
            logp = logits.float().log_softmax(-1)
            v, i = logp.topk(min(top_logprobs, logp.shape[-1]), -1)
            pend.top_values, pend.top_ids = host(v), host(i)
        self._step_logits = []
        if cuda:
            pend.event = torch.cuda.Event()
            pend.event.record()
        return pend


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 indices on the device without waiting for the queued GPU work (pinned, async)."""
    t = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _batches(works: Seq[PrefillWork]) -> list[list[PrefillWork]]:
    """Group chunks into batches: longest first; a chunk joins the first batch it fits (a chunk
    that continues a state only where it is as long as the batch, a fresh one where its padding
    keeps the batch's padding within PAD_RATIO of its real tokens + PAD_SLACK)."""
    groups: list[list[PrefillWork]] = []
    for w in sorted(works, key=lambda w: -len(w.ids)):
        for g in groups:
            L = len(g[0].ids)
            if w.continues and len(w.ids) != L:
                continue
            real = sum(len(x.ids) for x in g) + len(w.ids)
            if L * (len(g) + 1) - real <= PAD_RATIO * real + PAD_SLACK:
                g.append(w)
                break
        else:
            groups.append([w])
    return groups
