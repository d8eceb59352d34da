"""The kernel loop: decode steps of a fixed batch back to back, nothing read back in between.

    loop = KernelLoop(model, rows=64)                  # greedy; or sampling=SamplingParams(...)
    tokens = loop.run(256)                             # (rows, 256) on the device

The same graphs (decode/graphs.py) and the same sampler as the engine, without the engine's host
work (scheduling, detokenizing, streaming): the ceiling that `generate()` and the server are
measured against (`falcon-mamba bench decode` reports both), and what the decode benchmarks sweep.
"""

from __future__ import annotations

import torch

from falcon_mamba.decode.graphs import DecodeGraphs
from falcon_mamba.decode.modes import DecodeOptions
from falcon_mamba.engine.state_pool import StatePool
from falcon_mamba.sampling import SamplingParams
from falcon_mamba.state import State


class KernelLoop:
    def __init__(self, model, rows: int, options: DecodeOptions | None = None,
                 sampling: SamplingParams | None = None, seed: int = 0,
                 ssm_dtype: torch.dtype = torch.float32):
        """ssm_dtype: the pool's SSM states (bf16 as serve --state-dtype bfloat16 keeps them)."""
        self.model = model
        self.rows = rows
        self.pool = StatePool(model.config, rows, model.dtype, model.device, ssm_dtype)
        self.pool.join(list(range(rows)))
        params = sampling or SamplingParams(temperature=0.0)
        self.pool.set_sampling(0, [params] * rows, [seed + i for i in range(rows)])
        self.graphs = DecodeGraphs(model, self.pool, options)

    def load(self, state: State, tokens_B: torch.Tensor | None = None) -> None:
        """Start every row from ``state`` (rows rows, or 1 row for all) and these next tokens."""
        st = state if state.batch_size == self.rows else State.cat([state] * self.rows)
        self.pool.write_rows(0, st)
        if tokens_B is not None:
            self.pool.tokens[:self.rows].copy_(tokens_B)

    @torch.inference_mode()
    def run(self, n: int) -> torch.Tensor:
        """n steps; returns the sampled tokens (rows, n) int64 on the device."""
        out = torch.empty(self.rows, n, dtype=torch.long, device=self.model.device)
        for i in range(n):
            self.graphs.step(self.rows)
            out[:, i].copy_(self.pool.tokens[:self.rows])
        return out

    @property
    def mode(self) -> dict:
        """What the batch-1 autotune chose (and what it timed), for result files."""
        g = self.graphs
        if not g.fast:
            return {"mode": "model.step", "graphs": False}
        m, p = g.mode_for(self.rows)
        return {"mode": m.name, "pdl": p, "graphs": g.use_graphs, "candidates_ms": g.timings,
                "errors": g.errors, "from_tuning_cache": g.tuned_from_cache}
