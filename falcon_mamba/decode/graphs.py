"""The decode step over a state pool's rows, replayed as one CUDA graph per batch bucket.

Legend: B decoding rows, Bb its bucket (engine/state_pool.bucket), V vocab.

One step for the pool's decoding rows [0, B) runs over rows [0, Bb): the fused step
(decode/step.py) reads each row's next token from ``pool.tokens``, advances the rows' conv and SSM
states in place and computes the logits; the sampler (ops/sample.py, a Triton kernel on CUDA) then
draws each row's next token with that row's own parameters, seed and draw counter, writes it back
into ``pool.tokens`` (the next step's input), and fills ``pool.logprob`` / ``pool.status``. So a
step needs nothing from the host: the graph of bucket Bb is captured once over the pool's own
tensors, rows join and leave between steps without recapture, and the host only reads the chosen
tokens back (asynchronously, engine/runner.py).

At batch 1 the projections can run several ways (decode/modes.py): the first use of bucket 1 times
every supported mode with and without programmatic dependent launch, checks each one's logits
against the first (cuBLAS) candidate and keeps the fastest. Above one row every projection is
cuBLAS, and the first use of each bucket times out_proj asked of cuBLAS two ways (cublas,
cublas_lt) the same way. The choices are cached on disk per GPU, model shape, rows, dtype and
format (decode/tuning.py), so a restarted process skips the timing.

Without graphs (CPU, the torch op backend, or cuda_graphs=False) the same body runs eagerly: the
fused step on CUDA with the triton backend, ``model.step`` elsewhere.
"""

from __future__ import annotations

import torch

from falcon_mamba.decode import tuning
from falcon_mamba.decode.modes import MODES, DecodeOptions, Mode
from falcon_mamba.engine.state_pool import StatePool, bucket

# The autotune's agreement check: candidates' logits within this fraction of the largest logit of
# the reference candidate (bf16 rounding differences measured up to 2.5e-2; a wrong kernel ~1).
PROBE_TOL = 0.1


def fast_path_usable(model) -> bool:
    """The fused step's kernels can run: a CUDA model on the triton op backend."""
    if model.device.type != "cuda":
        return False
    from falcon_mamba import ops

    return ops.backend_name(model.device) == "triton"


class DecodeGraphs:
    """The decode step of one pool (see the module docstring)."""

    def __init__(self, model, pool: StatePool, options: DecodeOptions | None = None,
                 fast: bool | None = None):
        """fast: run the fused step (default: where it can run, fast_path_usable); the CPU tests
        force it under Triton's interpreter. Graphs need CUDA."""
        self.model = model
        self.pool = pool
        self.options = options or DecodeOptions()
        self.fast = fast_path_usable(model) if fast is None else fast
        self.use_graphs = self.fast and self.options.cuda_graphs and model.device.type == "cuda"
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._mempool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._b1: tuple[Mode, bool] | None = None  # the batch-1 (mode, pdl) once chosen
        self._batched: dict[int, tuple[Mode, bool]] = {}  # bucket -> (mode, pdl) once chosen
        # the cublas_lt mode's out_proj bias, allocated here: a tensor first made inside a capture
        # would live in that graph's memory pool
        self._zero_bias = (torch.zeros(model.config.hidden_size, dtype=model.dtype, device=model.device)
                           if self.fast else None)
        if self.fast:  # the quantized kernels' own tuner keeps its choices in the same cache
            from falcon_mamba.quant import triton_qmm

            triton_qmm.configure(cache_dir=tuning.cache_dir(self.options.tuning_cache))
        self.timings: dict[str, float] = {}  # batch-1 candidates' ms per step (when timed)
        self.errors: dict[str, str] = {}  # batch-1 candidates that failed or disagreed
        self.bucket_timings: dict[int, dict[str, float]] = {}  # the same per bucket above 1
        self.bucket_errors: dict[int, dict[str, str]] = {}
        self.buckets_from_cache: set[int] = set()  # buckets whose choice came from the tuning cache
        self.tuned_from_cache = False

    # ---- what runs ---------------------------------------------------------------------------
    def _body(self, rows: int, mode: Mode, use_pdl: bool) -> torch.Tensor:
        """One step over pool rows [0, rows): tokens -> logits (rows, V) fp32, then the sampler."""
        from falcon_mamba.ops.sample import sample_rows

        p = self.pool
        if self.fast:
            from falcon_mamba.decode.step import fast_step
            from falcon_mamba.ops import pdl

            st = p.state
            kw = mode.step_kwargs(rows)
            zero = self._zero_bias if kw.pop("lt_out_proj") else None
            with pdl.enabled(use_pdl):
                logits = fast_step(self.model, p.tokens[:rows], st.conv[:, :rows], st.ssm[:, :rows],
                                   **kw, out_zero_bias=zero)
        else:
            logits = self.model.step(p.tokens[:rows], p.decode_view(rows))
        sample_rows(logits, p.sampler_rows(0, rows), p.tokens[:rows], p.logprob[:rows], p.status[:rows])
        return logits

    def batch1_choice(self) -> tuple[Mode, bool]:
        """(mode, pdl) of the batch-1 step: forced, cached on disk, or timed now."""
        if self._b1 is None:
            self._b1 = self._choose_batch1()
        return self._b1

    def _pdl_choices(self) -> list[bool]:
        from falcon_mamba.ops import pdl

        if self.options.pdl != "auto":
            return [self.options.pdl == "on" and pdl.supported(self.model.device)]
        return [False, True] if self.use_graphs and pdl.supported(self.model.device) else [False]

    def _choose_batch1(self) -> tuple[Mode, bool]:
        modes = self.options.candidates(self.model) if self.fast else [MODES["cublas"]]
        pdls = self._pdl_choices()
        if len(modes) * len(pdls) == 1 or not self.use_graphs:
            return modes[0], pdls[0]
        choice, self.timings, self.errors, self.tuned_from_cache = self._tuned(
            1, [(m, p) for m in modes for p in pdls])
        return choice

    def _choose_batched(self, rows: int) -> tuple[Mode, bool]:
        """(mode, pdl) of bucket `rows` > 1: PDL on unless turned off (only the Triton kernels
        around the cuBLAS projections can overlap their launches); cublas or cublas_lt, timed."""
        from falcon_mamba.ops import pdl

        use_pdl = self.options.pdl != "off" and self.use_graphs and pdl.supported(self.model.device)
        modes = self.options.candidates(self.model, rows) if self.fast else [MODES["cublas"]]
        if len(modes) == 1 or not self.use_graphs:
            return modes[0], use_pdl
        choice, self.bucket_timings[rows], self.bucket_errors[rows], cached = self._tuned(
            rows, [(m, use_pdl) for m in modes])
        if cached:
            self.buckets_from_cache.add(rows)
        return choice

    def _tuned(self, rows: int, candidates: list[tuple[Mode, bool]]):
        """The fastest correct candidate at `rows` rows from the tuning cache, or timed now and
        stored: ((mode, pdl), timings, errors, from the cache)."""
        folder = tuning.cache_dir(self.options.tuning_cache)
        modes = list(dict.fromkeys(m for m, _ in candidates))
        pdls = sorted({p for _, p in candidates})
        key = tuning.model_key(self.model, rows) + f"|modes={','.join(m.name for m in modes)}|pdl={pdls}"
        if self.pool.state.ssm.dtype != torch.float32:  # a bf16 state pool times its own steps
            key += f"|ssm={str(self.pool.state.ssm.dtype).removeprefix('torch.')}"
        hit = tuning.load(folder, self.model.device, key)
        if hit is not None and hit.get("mode") in MODES and MODES[hit["mode"]] in modes:
            return ((MODES[hit["mode"]], bool(hit.get("pdl")) and True in pdls), dict(hit.get("ms", {})),
                    dict(hit.get("errors", {})), True)
        timings, errors = self._autotune(candidates, rows)
        best = min(timings, key=timings.get)
        choice = MODES[best.split("+")[0]], best.endswith("+pdl")
        tuning.store(folder, self.model.device, key,
                     {"mode": choice[0].name, "pdl": choice[1], "ms": timings, "errors": errors})
        return choice, timings, errors, False

    def _autotune(self, candidates: list[tuple[Mode, bool]], rows: int = 1):
        """Time each (mode, pdl) candidate's captured step over rows [0, rows): (ms per step by
        candidate name, errors by name). Speed alone never decides: a candidate whose logits (two
        greedy steps from a zero state) stray from the first candidate's by more than PROBE_TOL of
        their largest magnitude, or that fails to capture, is recorded in the errors and not
        timed. The rows' contents are saved and restored."""
        saved = self._save_rows(rows)
        ref = None
        timings: dict[str, float] = {}
        errors: dict[str, str] = {}
        try:
            for mode, use_pdl in candidates:
                name = mode.name + ("+pdl" if use_pdl else "")
                try:
                    graph, logits = self._capture(rows, mode, use_pdl, pool=None)  # a private pool
                except Exception as e:  # noqa: BLE001 - e.g. a driver without PDL in graphs
                    errors[name] = f"{type(e).__name__}: {e}"[:200]
                    torch.cuda.synchronize()
                    continue
                out = self._probe(graph, logits, rows)
                if ref is None:
                    ref = out
                else:
                    err = ((out - ref).abs().max() / ref.abs().max().clamp(min=1e-6)).item()
                    if not err <= PROBE_TOL:  # also catches NaN
                        errors[name] = f"logits differ from {candidates[0][0].name}: rel err {err:.3g}"
                        continue
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                for _ in range(3):
                    graph.replay()
                start.record()
                for _ in range(10):
                    graph.replay()
                end.record()
                end.synchronize()
                timings[name] = start.elapsed_time(end) / 10
                del graph
        finally:
            self._restore_rows(saved)
        if not timings:
            raise RuntimeError(f"no decode mode could run at {rows} rows: {errors}")
        return timings, errors

    def _zero_rows(self, rows: int) -> None:
        p = self.pool
        t = p.sampling
        for x in (p.state.conv[:, :rows], p.state.ssm[:, :rows], p.tokens[:rows], t.temperature[:rows],
                  t.pos[:rows], t.seen[:rows]):
            x.zero_()
        t.penalty[:rows].fill_(1.0)

    def _probe(self, graph, logits, rows: int) -> torch.Tensor:
        """Logits (rows, V) fp32 after two greedy replays from zero states and token 0."""
        self._zero_rows(rows)
        graph.replay()
        graph.replay()
        return logits.float().clone()

    def _capture(self, rows: int, mode: Mode, use_pdl: bool, pool="shared"):
        from falcon_mamba.cuda_graph import capture

        saved = self._save_rows(rows)
        graph, logits = capture(lambda: self._body(rows, mode, use_pdl),
                                self._mempool if pool == "shared" else pool)
        self._restore_rows(saved)  # the warm-up runs advanced the rows
        return graph, logits

    def _save_rows(self, rows: int) -> list[torch.Tensor]:
        return [t.narrow(dim, 0, rows).clone() for t, dim in self.pool._per_row()]

    def _restore_rows(self, saved: list[torch.Tensor]) -> None:
        for (t, dim), v in zip(self.pool._per_row(), saved):
            t.narrow(dim, 0, v.shape[dim]).copy_(v)

    # ---- the step ----------------------------------------------------------------------------
    def mode_for(self, rows: int) -> tuple[Mode, bool]:
        """(mode, pdl) of the step over `rows` rows (that of its bucket; chosen on first use)."""
        if rows == 1:
            return self.batch1_choice()
        Bb = bucket(rows)
        if Bb not in self._batched:
            self._batched[Bb] = self._choose_batched(Bb)
        return self._batched[Bb]

    def prepare(self, rows: int) -> int:
        """Capture the graph of bucket(rows) now (it is captured on first use otherwise); returns
        the bucket."""
        Bb = bucket(rows)
        if self.use_graphs and Bb not in self._graphs:
            mode, use_pdl = self.mode_for(Bb)
            self._graphs[Bb], self._logits[Bb] = self._capture(Bb, mode, use_pdl)
        return Bb

    def step(self, rows: int) -> torch.Tensor:
        """One decode step for pool rows [0, rows): returns the logits (bucket(rows), V) fp32 (valid
        until the next step). The sampled tokens are in pool.tokens[:rows]."""
        Bb = self.prepare(rows)
        if self.use_graphs:
            self._graphs[Bb].replay()
            return self._logits[Bb]
        mode, use_pdl = self.mode_for(Bb) if self.fast else (MODES["cublas"], False)
        return self._body(Bb, mode, use_pdl)

    @property
    def buckets(self) -> list[int]:
        return sorted(self._graphs)

    def batched_modes(self) -> dict[str, list[int]]:
        """The buckets above one row chosen so far, by mode name (for the warm-up log)."""
        out: dict[str, list[int]] = {}
        for b, (m, _) in sorted(self._batched.items()):
            out.setdefault(m.name, []).append(b)
        return out
