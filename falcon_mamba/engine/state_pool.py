"""The state pool: one State whose batch rows hold the sequences being served, plus the per-row
tables the decode step reads and writes (the next input token, the sampling parameters, the draw
counter, the seen-token mask, the sampled token's log-probability and status).

Mamba's whole per-sequence memory is one state of fixed size (conv + SSM, about 37 MB for the 7B
with a bf16 conv state), so the number of sequences a server can hold is just
``memory budget // slot_bytes``: no paging, no fragmentation, no eviction mid-answer.

Layout of the R = num_slots + PAD_ROWS rows:

    [0, n)           decoding sequences, packed (the decode graph of bucket(n) reads rows [0, bucket(n)))
    [n, R - m)       free
    [R - m, R)       parked states: requests still reading their prompt, packed at the top

The decode step for n sequences runs over rows [0, bucket(n)) (decode/graphs.py captures one graph
per bucket over these very tensors, so a step copies no state). Rows n..bucket(n)-1 are scratch: the
step writes garbage there, so they must hold nothing live. PAD_ROWS is the largest bucket(n) - n and
the scheduler holds at most num_slots sequences (decoding + parked), so bucket(n) <= R - m always:
no parked state is ever inside the decode rows. A sequence joining the decode batch takes row n (its
prompt's final state is written there directly); one leaving is replaced by the last decoding row
(one row copy: the rows stay packed). Parked rows are kept packed the same way.

Legend: nL layers, R rows, K conv width, D inner width, N state size, V vocab.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from falcon_mamba.config import ModelConfig
from falcon_mamba.errors import UserError
from falcon_mamba.state import State

PAD_ROWS = 7  # the largest bucket(n) - n of decode/graphs.py's buckets
# Rows of state a bulk move carries per gather / scatter round, through one scratch buffer the pool
# keeps (see StatePool._move_state_rows)
MOVE_ROWS = 8
SSM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # a pool's SSM state dtypes


def bucket(n: int) -> int:
    """The rows a decode step for n sequences runs over: 1, 2, 4, 8, then multiples of 8."""
    if n <= 2:
        return n
    if n <= 8:
        return 1 << (n - 1).bit_length()
    return (n + 7) // 8 * 8


def slot_bytes(config: ModelConfig, dtype: torch.dtype, ssm_dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one sequence's state: conv (nL, K-1, D) in the model dtype + SSM (nL, D, N) in
    ssm_dtype."""
    nL, K, D, N = (config.num_hidden_layers, config.conv_kernel, config.intermediate_size,
                   config.state_size)
    return (nL * (K - 1) * D * torch.finfo(dtype).bits // 8
            + nL * D * N * torch.finfo(ssm_dtype).bits // 8)


def slots_for_budget(config: ModelConfig, dtype: torch.dtype, budget_bytes: int,
                     max_slots: int, ssm_dtype: torch.dtype = torch.float32) -> int:
    """How many slots fit in budget_bytes (the pool's padding rows included), at most max_slots;
    at least one must fit."""
    per = slot_bytes(config, dtype, ssm_dtype)
    n = min(max_slots, budget_bytes // per - PAD_ROWS)
    if n < 1:
        raise UserError(f"the state memory budget ({budget_bytes:,} bytes) holds no sequence; one "
                        f"needs {per:,} bytes (plus {PAD_ROWS} rows of padding); raise --state-memory")
    return int(n)


class StatePool:
    def __init__(self, config: ModelConfig, num_slots: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", ssm_dtype: torch.dtype = torch.float32):
        """ssm_dtype: the SSM states' dtype, fp32 or bf16 (SSM_DTYPES: bf16 halves the bytes every
        decode step reads and writes per row; the step still computes in fp32 and rounds the new
        state once, as transformers' and mamba_ssm's caches in the model dtype do)."""
        if ssm_dtype not in SSM_DTYPES.values():
            raise ValueError(f"ssm_dtype must be one of {sorted(SSM_DTYPES)}, got {ssm_dtype}")
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.config = config
        self.num_slots = num_slots
        self.device = torch.device(device)
        R = self.num_rows = num_slots + PAD_ROWS
        V = config.vocab_size
        # conv (nL, R, K-1, D), ssm (nL, R, D, N)
        self.state = State.zeros(config, R, dtype, device, ssm_dtype)
        from falcon_mamba.ops.sample import SamplerRows

        dev = self.device
        self.tokens = torch.zeros(R, dtype=torch.long, device=dev)  # each row's next input token
        self.sampling = SamplerRows.empty(R, dev, V)  # each row's parameters, draw counter, seen mask
        self.logprob = torch.zeros(R, dtype=torch.float32, device=dev)
        self.status = torch.zeros(R, dtype=torch.int32, device=dev)
        self._dec: list[Hashable] = []  # row i holds _dec[i]
        self._top: list[Hashable] = []  # row R - 1 - i holds _top[i]
        self._filled: set[Hashable] = set()  # parked keys whose row holds a written state
        self._move_buf: dict[torch.dtype, torch.Tensor] = {}  # _move_state_rows' scratch, per dtype

    # ---- bookkeeping ---------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return self.state.nbytes

    @property
    def num_decoding(self) -> int:
        return len(self._dec)

    @property
    def num_used(self) -> int:
        return len(self._dec) + len(self._top)

    def decode_keys(self) -> list[Hashable]:
        """The key of each decoding row, row 0 first."""
        return list(self._dec)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._dec or key in self._top

    def row(self, key: Hashable) -> int:
        if key in self._dec:
            return self._dec.index(key)
        return self.num_rows - 1 - self._top.index(key)

    def _per_row(self) -> list[tuple[torch.Tensor, int]]:
        """Every per-row tensor with its row dimension."""
        import dataclasses

        s = self.state
        table = [getattr(self.sampling, f.name) for f in dataclasses.fields(self.sampling)]
        return [(s.conv, 1), (s.ssm, 1), (self.tokens, 0), *[(t, 0) for t in table],
                (self.logprob, 0), (self.status, 0)]

    def _move(self, pairs: list[tuple[int, int]], tensors: list[tuple[torch.Tensor, int]]) -> None:
        """Copy row src to row dst of each tensor for each (src, dst) (no dst is another pair's
        src). One pair: a copy per tensor; more: one gather and one scatter per tensor (a burst of
        75 prompts joining at once moved 75 rows one by one: ~1,100 copies, tens of ms of launches
        on the H200, results/h200-engine-waves-cab2ccc.json)."""
        if len(pairs) == 1:
            (src, dst), = pairs
            for t, dim in tensors:
                t.select(dim, dst).copy_(t.select(dim, src))
        elif pairs:
            idx = _index([a for a, _ in pairs] + [b for _, b in pairs], self.device)  # one copy
            src, dst = idx[:len(pairs)], idx[len(pairs):]
            for t, dim in tensors:
                if t is self.state.conv or t is self.state.ssm:
                    self._move_state_rows(t, src, dst)
                else:
                    t.index_copy_(dim, dst, t.index_select(dim, src))

    def _move_state_rows(self, t: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Rows src -> dst of a state tensor (nL, R, ...) through a scratch of MOVE_ROWS rows kept
        by the pool. (A gather into a fresh tensor asked the allocator for k rows of state at
        every wave of answers ending: 40 rows of the 7B are 1.5 GB, a new size each time; the H200
        server's steps that released rows took 20-75 ms of host time there,
        results/h200-serve-0caa448.json.)"""
        row = t[:, 0].numel()  # one row's elements over the layers
        buf = self._move_buf.get(t.dtype)
        if buf is None:  # sized for the larger of the state's tensors of this dtype
            most = max(x[:, 0].numel() for x in (self.state.conv, self.state.ssm) if x.dtype == t.dtype)
            buf = self._move_buf[t.dtype] = torch.empty(MOVE_ROWS * most, dtype=t.dtype, device=t.device)
        for i in range(0, src.numel(), MOVE_ROWS):
            s, d = src[i:i + MOVE_ROWS], dst[i:i + MOVE_ROWS]
            rows = buf[:s.numel() * row].view(t.shape[0], s.numel(), *t.shape[2:])
            torch.index_select(t, 1, s, out=rows)
            t.index_copy_(1, d, rows)

    def _check_room(self) -> None:
        if bucket(len(self._dec)) > self.num_rows - len(self._top):
            raise RuntimeError("state pool over capacity")  # the scheduler never admits past num_slots

    # ---- parked rows (prompts being read) ------------------------------------------------------
    def park(self, key: Hashable) -> int:
        """A row at the top for a request still reading its prompt; returns the row. The row holds
        nothing until a state is written into it (write / write_rows)."""
        if key in self:
            raise KeyError(f"{key!r} already holds a row")
        if self.num_used >= self.num_slots:
            raise RuntimeError("state pool is full")  # the scheduler never admits past the slot count
        self._top.append(key)
        self._check_room()
        return self.row(key)

    def _unpark(self, keys: set) -> None:
        """These parked keys give their rows back; the lowest parked rows move up into the holes
        (parked rows stay packed). Only the state moves, and only where a state was written: the
        other per-row tables are set when a sequence joins, and an unwritten row holds nothing."""
        R = self.num_rows
        self._top, moves = _compact(self._top, keys)
        self._filled -= keys
        pairs = [(R - 1 - a, R - 1 - b) for a, b in moves if self._top[b] in self._filled]
        self._move(pairs, [(self.state.conv, 1), (self.state.ssm, 1)])

    # ---- decoding rows -------------------------------------------------------------------------
    def join(self, keys: Sequence[Hashable]) -> int:
        """Give each key the next decoding row (contiguous, in order); returns the first row. A key
        that was parked gives its parked row back (the caller writes the joined rows' state)."""
        first = len(self._dec)
        if len(set(keys)) != len(keys):
            raise KeyError(f"a key joins twice: {list(keys)!r}")
        parked, decoding = set(self._top), set(self._dec)
        if any(k in decoding for k in keys):
            raise KeyError(f"{next(k for k in keys if k in decoding)!r} is already decoding")
        leaving = parked.intersection(keys)
        if self.num_used + len(keys) - len(leaving) > self.num_slots:
            raise RuntimeError("state pool is full")  # the scheduler never admits past num_slots
        if leaving:
            self._unpark(leaving)
        self._dec.extend(keys)
        self._check_room()
        return first

    def free(self, key: Hashable) -> None:
        """The key's sequence ended: its row is free (a decoding row is refilled by the last one)."""
        self.free_many([key])

    def free_many(self, keys: Sequence[Hashable]) -> None:
        """These sequences ended: their rows are free. Decoding rows stay packed: the last rows
        move into the holes (every per-row table, in one gather and scatter for several rows)."""
        ks = set(keys)
        if len(ks) != len(keys) or any(k not in self for k in ks):
            raise KeyError(f"free_many: unknown or repeated keys {keys!r}")
        parked = ks.intersection(self._top)
        if parked:
            self._unpark(parked)
        dec = ks - parked
        if dec:
            self._dec, moves = _compact(self._dec, dec)
            self._move(moves, self._per_row())

    # ---- moving states in and out --------------------------------------------------------------
    def read(self, key: Hashable, device: torch.device | str | None = None) -> State:
        """A copy of one row's state as a batch-1 State (on ``device``, default the pool's)."""
        r = self.row(key)
        st = self.state
        conv, ssm = st.conv[:, r:r + 1], st.ssm[:, r:r + 1]
        if device is None or torch.device(device) == st.device:
            conv, ssm = conv.clone(), ssm.clone()
        else:
            conv, ssm = conv.to(device), ssm.to(device)
        return State(self.config, conv, ssm)

    def write(self, key: Hashable, state: State) -> None:
        """Copy a batch-1 state into the key's row."""
        assert state.batch_size == 1, state.batch_size
        self.write_rows(self.row(key), state)

    def write_rows(self, first: int, state: State) -> None:
        """Copy a state's B rows into rows first..first+B-1."""
        B = state.batch_size
        R, m = self.num_rows, len(self._top)
        for r in range(max(first, R - m), first + B):  # parked rows: they hold a state from now
            self._filled.add(self._top[R - 1 - r])
        self.state.conv[:, first:first + B].copy_(state.conv)
        self.state.ssm[:, first:first + B].copy_(state.ssm)

    def write_many(self, items: Sequence[tuple[int, State]]) -> None:
        """write_rows for each (row, batch-1 state); a run of consecutive rows whose states are
        consecutive rows of one tensor (a prompt batch's outputs, in order) is one copy per tensor."""
        i = 0
        while i < len(items):
            first, st = items[i]
            j = i + 1
            while (j < len(items) and items[j][0] == first + (j - i)
                   and _next_row(items[j - 1][1], items[j][1])):
                j += 1
            if j - i > 1:
                st = State(self.config, _rows_view(st.conv, j - i), _rows_view(st.ssm, j - i))
            self.write_rows(first, st)
            i = j

    def gather(self, rows: Sequence[int]) -> State:
        """The states of these rows as one new State (rows in order)."""
        idx = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        return State(self.config, self.state.conv.index_select(1, idx), self.state.ssm.index_select(1, idx))

    def decode_view(self, rows: int) -> State:
        """rows [0, rows) as a State sharing the pool's memory (a step on it updates the rows)."""
        return State(self.config, self.state.conv[:, :rows], self.state.ssm[:, :rows])

    # ---- sampling tables -----------------------------------------------------------------------
    def sampler_rows(self, first: int, count: int):
        """rows [first, first + count) of the sampling table (ops.sample.SamplerRows views)."""
        return self.sampling.rows(first, count)

    def set_sampling(self, first: int, params: Sequence, seeds: Sequence[int],
                     seen_ids: Sequence[Sequence[int]] | None = None) -> None:
        """Fill rows first.. with each row's SamplingParams and seed; the draw counter starts at 0;
        seen_ids (per row, used where a row has a repetition penalty): the prompt's tokens."""
        self.sampling.set_rows(first, params, seeds, seen_ids)


def _compact(keys: list, leaving: set) -> tuple[list, list[tuple[int, int]]]:
    """keys without those in leaving, packed: the last kept keys fill the holes in order. Returns
    (the new list, (old index, new index) of each key that moved)."""
    keep = len(keys) - len(leaving)
    holes = [i for i in range(keep) if keys[i] in leaving]
    movers = [i for i in range(keep, len(keys)) if keys[i] not in leaving]
    new = keys[:keep]
    for h, m in zip(holes, movers):
        new[h] = keys[m]
    return new, list(zip(movers, holes))


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 row indices on the device without waiting for queued GPU work (pinned, async)."""
    t = torch.tensor(values, dtype=torch.long)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def _next_row(a: State, b: State) -> bool:
    """b's tensors are the row after a's in the same tensors (views of one batch's outputs)."""
    for x, y in ((a.conv, b.conv), (a.ssm, b.ssm)):
        if (x.shape != y.shape or x.stride() != y.stride() or x.dtype != y.dtype
                or x.untyped_storage().data_ptr() != y.untyped_storage().data_ptr()
                or y.storage_offset() != x.storage_offset() + x.stride(1)):
            return False
    return True


def _rows_view(t: torch.Tensor, n: int) -> torch.Tensor:
    """(nL, 1, ...) row view t widened to n rows of the tensor it views."""
    return t.as_strided((t.shape[0], n, *t.shape[2:]), t.stride(), t.storage_offset())
