"""Fast decode on CUDA: the fused single-token step (decode_step.py), replayed as CUDA graphs per
batch-size bucket.

Legend: B batch (Bb: its bucket), nL layers, K conv taps, D inner width, N state size, V vocab.

``GraphDecoder`` captures decode_step.fast_step once per bucket (1, 2, 4, ... 256 rows) over static
buffers: the token ids, the conv state (nL, Bb, K-1, D), the SSM state (nL, Bb, D, N) and the logits.
A State handed to ``step`` is *bound* to its bucket: its rows are copied in once and its tensors become
views of the static buffers, so later steps replay the graph with no copies (the token ids are
range-checked on the host: one synchronisation per ``step`` call, one per ``greedy`` call). A State
that loses its bucket to another one gets its tensors back as private
copies first, so states never alias. The graph also writes the greedy next token into the token
buffer and (CUDA) into a ring of HISTORY steps per row, so ``greedy`` runs n steps as n replays with
nothing launched between them and nothing read back until the end. At batch 1
the slot times the step's projection modes (and programmatic dependent launch on/off) and keeps the
fastest whose logits agree with the cuBLAS path.
"""

from __future__ import annotations

import os
import weakref

import torch

from falcon_mamba.decode_chain import chain_step, chain_supported
from falcon_mamba.decode_step import conv_fold_supported, fast_step, fused_supported, xproj_merge_supported
from falcon_mamba.state import State

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
HISTORY = 256  # greedy steps recorded on the device between two copies out
# The autotune's agreement check: candidates' logits within this fraction of the largest logit of
# the reference candidate (bf16 rounding differences measured up to 2.5e-2; a wrong kernel ~1).
PROBE_TOL = 0.1


# FALCON_MAMBA_GEMV value -> (batch-1 mode, the model check it needs or None, what it needs)
_FORCED = {
    "triton": ("triton_gemv", None, ""),
    "triton_cx": ("triton_gemv_cx", conv_fold_supported, "GEMV-able x_proj and a fusable dt_proj (dense, or "
                  "quantized with its bias outside the forward)"),
    "triton_xp": ("triton_gemv_xp", xproj_merge_supported, "int4 in_proj and x_proj on the packed int4 "
                  "kernel (a CUDA GPU)"),
    "fused": ("fused", fused_supported, "bias-free Linear or QuantLinear projections"),
    "chain": ("chain", chain_supported, "GEMV-able projections and a fusable dt_proj"),
}


def _check_env(name: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        from falcon_mamba.errors import UserError

        raise UserError(f"{name}={value!r} is not one of {', '.join(allowed)}; unset it to let the "
                        f"decoder choose")


class _Slot:
    """Static buffers (and, on CUDA, the captured graph) of one batch-size bucket."""

    def __init__(self, model, rows: int, use_graph: bool, pool):
        c = model.config
        dev = model.device
        self.model = model
        self.rows = rows
        self.tokens = torch.zeros(rows, dtype=torch.long, device=dev)
        self.conv = torch.zeros(c.num_hidden_layers, rows, c.conv_kernel - 1, c.intermediate_size,
                                dtype=model.dtype, device=dev)
        self.ssm = torch.zeros(c.num_hidden_layers, rows, c.intermediate_size, c.state_size,
                               dtype=torch.float32, device=dev)
        self.logits: torch.Tensor | None = None
        # CUDA: the greedy tokens of successive replays, recorded by the graph itself (a ring of
        # HISTORY steps per row and each row's next position), so greedy() launches nothing between
        # replays
        self.hist = torch.zeros(rows, HISTORY, dtype=torch.long, device=dev) if dev.type == "cuda" else None
        self.hpos = torch.zeros(rows, dtype=torch.int32, device=dev) if dev.type == "cuda" else None
        self.owner = None  # weakref to the State bound to these buffers
        self.graph = None
        # batch-1 projections: "cublas" (modules), "triton_gemv", "triton_gemv_cx" (triton_gemv with
        # the conv step folded into x_proj and the SSM kernel), "fused" or "chain" (decode_chain.py)
        # (FALCON_MAMBA_GEMV=cublas|triton|triton_cx|fused|chain; auto: timed on CUDA, cublas
        # without graphs)
        self.mode = "cublas"
        # programmatic dependent launch of the Triton kernels (ops/pdl.py): FALCON_MAMBA_PDL=1|0;
        # auto: timed both ways on CUDA
        pdl_choice = os.environ.get("FALCON_MAMBA_PDL", "auto")
        choice = os.environ.get("FALCON_MAMBA_GEMV", "auto")
        _check_env("FALCON_MAMBA_PDL", pdl_choice, ("auto", "1", "0"))
        _check_env("FALCON_MAMBA_GEMV", choice, ("auto", "cublas", *_FORCED))
        self.pdl = pdl_choice == "1"
        self.timings: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        if rows == 1 and choice in _FORCED:
            self.mode, supported, needs = _FORCED[choice]
            if supported is not None and not supported(model):
                from falcon_mamba.errors import UserError

                raise UserError(f"FALCON_MAMBA_GEMV={choice} needs {needs}; unset it to let the decoder "
                                "choose")
        if use_graph:
            modes = [self.mode]
            if rows == 1 and choice == "auto":
                modes = (["cublas", "triton_gemv"]
                         + (["triton_gemv_cx"] if conv_fold_supported(model) else [])
                         + (["triton_gemv_xp"] if xproj_merge_supported(model) else [])
                         + (["fused"] if fused_supported(model) else [])
                         + (["chain"] if chain_supported(model) else []))
            from falcon_mamba.ops import pdl

            pdls = [False, True] if pdl_choice == "auto" and pdl.supported(dev) else [self.pdl]
            if len(modes) * len(pdls) > 1:
                self._autotune(pool, [(m, p) for m in modes for p in pdls])
            else:
                self.graph = self._capture(pool)

    @property
    def gemv(self) -> bool:
        """The Triton GEMV (unfused) mode was chosen (read by the benchmarks)."""
        return self.mode == "triton_gemv"

    def _body(self) -> None:
        from falcon_mamba.ops import pdl

        with pdl.enabled(self.pdl):
            if self.mode == "chain":
                self.logits = chain_step(self.model, self.tokens, self.conv, self.ssm)
            else:
                self.logits = fast_step(self.model, self.tokens, self.conv, self.ssm,
                                        self.mode in ("triton_gemv", "triton_gemv_cx", "triton_gemv_xp"),
                                        self.mode == "fused", conv_fold=self.mode == "triton_gemv_cx",
                                        xproj_merge=self.mode == "triton_gemv_xp")
            if self.logits.is_cuda:  # the greedy token straight into the token buffer (~2 us, not ~20)
                from falcon_mamba.ops.triton_argmax import greedy_tokens

                greedy_tokens(self.logits, self.tokens, history=(self.hist, self.hpos))
        if not self.logits.is_cuda:
            self.tokens.copy_(self.logits.argmax(-1))

    def _capture(self, pool=None):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compile the kernels, create the cuBLAS handles
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self._body()
        return graph

    def _probe(self, graph) -> torch.Tensor:
        """Logits (rows, V) fp32 after two replays from zero state and token 0 (the second step
        reads a state the first one wrote); the buffers are zeroed again after."""
        for t in (self.conv, self.ssm, self.tokens):
            t.zero_()
        graph.replay()
        graph.replay()
        out = self.logits.float().clone()
        for t in (self.conv, self.ssm, self.tokens):
            t.zero_()
        return out

    def _autotune(self, pool, candidates) -> None:
        """Time the step captured in each (projection mode, PDL) candidate: at batch 1 cuBLAS, the
        Triton GEMV projections, those with the conv step folded and the fused GEMVs (the last two
        where supported), each with and without
        programmatic dependent launch; then capture the fastest for good (self.logits then points
        at that graph's output). Speed alone never decides: a candidate whose logits (two steps
        from a zero state) stray from the first candidate's by more than PROBE_TOL of their
        largest magnitude, or that fails to capture, is recorded in self.errors and skipped."""
        ref = None
        for mode, use_pdl in candidates:
            self.mode, self.pdl = mode, use_pdl
            key = mode + ("+pdl" if use_pdl else "")
            try:
                graph = self._capture()  # a private pool: freed with the trial graph
            except Exception as e:  # noqa: BLE001 - e.g. a driver without PDL in graphs
                self.errors[key] = f"{type(e).__name__}: {e}"[:200]
                torch.cuda.synchronize()
                continue
            out = self._probe(graph)
            if ref is None:
                ref = out
            else:
                err = ((out - ref).abs().max() / ref.abs().max().clamp(min=1e-6)).item()
                if not err <= PROBE_TOL:  # also catches NaN
                    self.errors[key] = f"logits differ from {candidates[0][0]}: rel err {err:.3g}"
                    del graph
                    continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for _ in range(3):
                graph.replay()
            start.record()
            for _ in range(10):
                graph.replay()
            end.record()
            end.synchronize()
            self.timings[key] = start.elapsed_time(end) / 10
            del graph
        for t in (self.conv, self.ssm, self.tokens):
            t.zero_()
        best = min(self.timings, key=self.timings.get)
        self.mode, self.pdl = best.split("+")[0], best.endswith("+pdl")
        self.graph = self._capture(pool)

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._body()

    def bind(self, state: State) -> None:
        """Make ``state``'s tensors views of these buffers (copying its rows in) unless they are."""
        B = state.batch_size
        if (self.owner is not None and self.owner() is state and state.ssm.data_ptr() == self.ssm.data_ptr()
                and state.conv.data_ptr() == self.conv.data_ptr()):
            return
        prev = self.owner() if self.owner is not None else None
        if prev is not None and prev is not state and prev.ssm.data_ptr() == self.ssm.data_ptr():
            prev.conv, prev.ssm = prev.conv.clone(), prev.ssm.clone()  # give it its own memory back
        self.conv[:, :B].copy_(state.conv)
        self.ssm[:, :B].copy_(state.ssm)
        self.conv[:, B:].zero_()
        self.ssm[:, B:].zero_()
        self.tokens[B:].zero_()
        state.conv, state.ssm = self.conv[:, :B], self.ssm[:, :B]
        self.owner = weakref.ref(state)


class GraphDecoder:
    """Decode steps of one model as CUDA-graph replays (eager fused steps when use_graph=False)."""

    def __init__(self, model, use_graph: bool | None = None, buckets=BUCKETS):
        self.model = model
        self.use_graph = model.device.type == "cuda" if use_graph is None else use_graph
        self.buckets = tuple(sorted(buckets))
        self._slots: dict[int, _Slot] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graph else None

    def bucket(self, batch: int) -> int:
        for b in self.buckets:
            if b >= batch:
                return b
        return batch  # larger than every bucket: a slot of exactly this size

    def slot(self, batch: int) -> _Slot:
        rows = self.bucket(batch)
        if rows not in self._slots:
            self._slots[rows] = _Slot(self.model, rows, self.use_graph, self._pool)
        return self._slots[rows]

    def _check(self, tokens_B: torch.Tensor, state: State) -> None:
        if tokens_B.dim() != 1 or tokens_B.shape[0] != state.batch_size:
            raise ValueError(f"tokens must be (batch,) = ({state.batch_size},), got {tuple(tokens_B.shape)}")
        if state.device != self.model.device:
            raise ValueError(f"state is on {state.device} but the model is on {self.model.device}")
        V = self.model.config.vocab_size
        # the step's first norm gathers embedding rows without bounds checks; one read-back for both
        lo, hi = torch.stack(torch.aminmax(tokens_B)).tolist() if tokens_B.numel() else (0, 0)
        if lo < 0 or hi >= V:
            raise ValueError(f"token ids must be in [0, {V}), got {tokens_B.tolist()}")

    def step(self, tokens_B: torch.Tensor, state: State) -> torch.Tensor:
        """Like model.step: tokens (B,) -> logits (B, V) fp32 (a fresh tensor); state advances."""
        self._check(tokens_B, state)
        B = state.batch_size
        s = self.slot(B)
        s.bind(state)
        s.tokens[:B].copy_(tokens_B)
        s.replay()
        state.tokens_seen += 1
        return s.logits[:B].clone()

    def greedy(self, tokens_B: torch.Tensor, state: State, n: int) -> torch.Tensor:
        """n greedy steps starting from tokens (B,): returns the generated ids (B, n) on the device.
        No host synchronisation inside the loop."""
        self._check(tokens_B, state)
        B = state.batch_size
        s = self.slot(B)
        s.bind(state)
        s.tokens[:B].copy_(tokens_B)
        out = torch.empty(B, n, dtype=torch.long, device=tokens_B.device)
        if s.hist is not None and s.logits is not None and s.logits.is_cuda:  # the graph records them
            s.hpos.zero_()
            for i0 in range(0, n, HISTORY):
                m = min(HISTORY, n - i0)
                for _ in range(m):
                    s.replay()
                out[:, i0:i0 + m].copy_(s.hist[:B, :m])
                s.hpos.zero_()
        else:
            for i in range(n):
                s.replay()
                out[:, i].copy_(s.tokens[:B])
        state.tokens_seen += n
        return out


_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_for(model) -> GraphDecoder:
    """The model's GraphDecoder (one per model, kept while the model lives)."""
    dec = _decoders.get(model)
    if dec is None:
        dec = _decoders[model] = GraphDecoder(model)
    return dec


def graphs_usable(model) -> bool:
    """True where graphed decoding applies: CUDA model, triton backend, not disabled by
    FALCON_MAMBA_CUDA_GRAPHS=0. (Decoding never needs gradients: the step runs under no_grad.)"""
    if os.environ.get("FALCON_MAMBA_CUDA_GRAPHS", "1") == "0":
        return False
    if model.device.type != "cuda":
        return False
    from falcon_mamba import ops

    return ops.backend_name(model.device) == "triton"


def maybe_graphed_step(model, tokens_B: torch.Tensor, state: State) -> torch.Tensor | None:
    """The hook for generate.decode_step: logits (B, V) from a graph replay, or None where graphs
    do not apply (the caller then runs model.step)."""
    if not graphs_usable(model):
        return None
    return decoder_for(model).step(tokens_B, state)
