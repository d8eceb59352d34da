"""A pool of fixed-size state slots: one State whose batch rows are handed out to sequences.

Mamba's whole per-sequence memory is one state of fixed size (conv + SSM, about 37 MB for the 7B
with a bf16 conv state), so the number of sequences a server can hold is just
``memory budget // slot_bytes``: no paging, no fragmentation, no eviction mid-answer.

Decode runs on a contiguous view of the first rows, not on a gathered copy: ``batch_view(keys)``
moves the requested sequences into rows 0..n-1 (a row swap only when the membership changed)
and returns ``State(conv[:, :n], ssm[:, :n])``, which ``model.step`` updates in place. Each
layer's slice ``conv[l, :n]`` is contiguous, so no kernel sees a strided state.

Legend: nL layers, S slots, K conv width, D inner width, N state size.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from falcon_mamba.config import ModelConfig
from falcon_mamba.errors import UserError
from falcon_mamba.state import State


def slot_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of one sequence's state: conv (nL, K-1, D) in the model dtype + SSM (nL, D, N) fp32."""
    nL, K, D, N = (config.num_hidden_layers, config.conv_kernel, config.intermediate_size,
                   config.state_size)
    return nL * (K - 1) * D * torch.finfo(dtype).bits // 8 + nL * D * N * 4


def slots_for_budget(config: ModelConfig, dtype: torch.dtype, budget_bytes: int,
                     max_slots: int) -> int:
    """How many slots fit in budget_bytes, at most max_slots; at least one must fit."""
    per = slot_bytes(config, dtype)
    n = min(max_slots, budget_bytes // per)
    if n < 1:
        raise UserError(f"the state memory budget ({budget_bytes:,} bytes) holds no sequence; one "
                        f"needs {per:,} bytes; raise --state-memory")
    return int(n)


class StatePool:
    def __init__(self, config: ModelConfig, num_slots: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.config = config
        self.num_slots = num_slots
        self.state = State.zeros(config, num_slots, dtype, device)  # conv (nL,S,K-1,D), ssm (nL,S,D,N)
        self._row: dict[Hashable, int] = {}
        self._owner: list[Hashable | None] = [None] * num_slots

    @property
    def nbytes(self) -> int:
        return self.state.nbytes

    @property
    def num_used(self) -> int:
        return len(self._row)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._row

    def alloc(self, key: Hashable) -> int:
        if key in self._row:
            raise KeyError(f"{key!r} already holds a slot")
        for r, owner in enumerate(self._owner):
            if owner is None:
                self._owner[r] = key
                self._row[key] = r
                return r
        raise RuntimeError("state pool is full")  # the scheduler never admits past the slot count

    def free(self, key: Hashable) -> None:
        self._owner[self._row.pop(key)] = None

    def row(self, key: Hashable) -> int:
        return self._row[key]

    # ---- moving states in and out ------------------------------------------------------------
    def read(self, key: Hashable, device: torch.device | str | None = None) -> State:
        """A copy of one slot as a batch-1 State (on ``device``, default the pool's)."""
        r = self._row[key]
        st = self.state
        conv, ssm = st.conv[:, r:r + 1], st.ssm[:, r:r + 1]
        if device is None or torch.device(device) == st.device:
            conv, ssm = conv.clone(), ssm.clone()
        else:
            conv, ssm = conv.to(device), ssm.to(device)
        return State(self.config, conv, ssm)

    def view(self, key: Hashable) -> State:
        """One slot as a batch-1 State sharing the pool's memory (read it, don't keep it)."""
        r = self._row[key]
        return State(self.config, self.state.conv[:, r:r + 1], self.state.ssm[:, r:r + 1])

    def write(self, key: Hashable, state: State) -> None:
        """Copy a batch-1 state into the key's slot."""
        assert state.batch_size == 1, state.batch_size
        r = self._row[key]
        self.state.conv[:, r:r + 1].copy_(state.conv)
        self.state.ssm[:, r:r + 1].copy_(state.ssm)

    def copy(self, src: Hashable, dsts: Sequence[Hashable]) -> None:
        """Fork: copy one slot into others (n continuations of one prompt)."""
        if not dsts:
            return
        s = self._row[src]
        idx = torch.tensor([self._row[d] for d in dsts], device=self.state.device)
        for t in (self.state.conv, self.state.ssm):
            t.index_copy_(1, idx, t[:, s:s + 1].expand(-1, len(dsts), *t.shape[2:]).contiguous())

    def batch_view(self, keys: Sequence[Hashable]) -> tuple[State, list[Hashable]]:
        """Put the given keys in rows 0..n-1 and return (a State viewing those rows, the key of
        each row). The view shares memory with the pool: model.step on it updates the slots."""
        n = len(keys)
        wanted = set(keys)
        assert len(wanted) == n, "duplicate keys"
        outsiders = [k for k in keys if self._row[k] >= n]
        holes = [r for r in range(n) if self._owner[r] not in wanted]
        assert len(outsiders) == len(holes)
        if outsiders:
            src = [self._row[k] for k in outsiders]
            # Swap each outsider with a hole (a hole may be free or hold a sequence not decoding
            # now, e.g. one still reading its prompt); the right side is gathered before writing.
            a = torch.tensor(holes + src, device=self.state.device)
            b = torch.tensor(src + holes, device=self.state.device)
            for t in (self.state.conv, self.state.ssm):
                t[:, a] = t[:, b]
            for k, r_old, r_new in zip(outsiders, src, holes):
                other = self._owner[r_new]
                self._owner[r_new], self._owner[r_old] = k, other
                self._row[k] = r_new
                if other is not None:
                    self._row[other] = r_old
        st = self.state
        return State(self.config, st.conv[:, :n], st.ssm[:, :n]), list(self._owner[:n])
