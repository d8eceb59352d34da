"""The registry of projection modes of the decode step, and the decode options.

A mode says how the projections of a step run (decode/step.py's fast_step flags). At batch 1 the
decoder times every supported batch-1 mode, each with and without programmatic dependent launch
(ops/pdl.py), checks each one's logits against the cuBLAS path and keeps the fastest
(decode/graphs.py). Above one row in_proj and dt_proj are cuBLAS matmuls, and per batch bucket the
decoder times two ways of asking cuBLAS for out_proj: "cublas" (F.linear) and "cublas_lt"
(F.linear with a zero bias: PyTorch sends a product with a 1-D bias to cuBLASLt's gemm-and-bias,
whose heuristic picks another kernel; adding 0 changes no output bit), each with x_proj by cuBLAS
or, above DT_PROJ_MAX_BATCH rows, by ops/triton_xproj.py ("split_x", "split_x_lt": split-K
partials and one kernel that sums them and norms dt_r, 2 launches for cuBLAS's 2 and the norm's
1). Every choice is cached on disk per GPU, model shape, rows, dtype and weight format
(decode/tuning.py).

Which modes exist is measured, not wished: each one below won on some GPU and weight format
(benchmarks/results/): triton_cx for bf16 and int8 and triton_xp for int4 on the H100 (session 5),
triton for int8 before triton_cx existed; cublas is the correctness reference of the autotune;
cublas_lt at 64 rows of the 7B on the H200 (out_proj 20.9 against 23.4 us a layer, 16 distinct
weights in a CUDA graph; at 16 and 256 rows F.linear was as fast or faster:
results/h200-decode-gemms-ffdd39d.json); split_x at 8-16 rows and split_x_lt at 24-120 rows of the
7B on the H200 (the server's bucket timing, three calls; the 64-row step's GPU time 6.92 -> 6.61 ms
and 64 streaming clients 7,874 -> 8,118 tok/s against the code before it in the same call:
results/h200-serve-0caa448.json). The "fused" (norm + in_proj + conv in one launch) and "chain"
(out_proj's epilogue computing the next norm's statistics) modes never won (H100: +0.35 and +0.12 ms
per bf16 step over triton_cx) and were removed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from falcon_mamba.errors import UserError


@dataclass(frozen=True)
class Mode:
    name: str
    gemv: bool = False  # the Triton batch-1 GEMV for every projection
    conv_fold: bool = False  # the conv step folded into x_proj's GEMV input and the SSM kernel
    xproj_merge: bool = False  # int4 x_proj as extra programs of the packed in_proj launch
    lt_out_proj: bool = False  # above one row: out_proj through cuBLASLt (a zero bias); at batch 1
    # this mode is cublas
    split_x: bool = False  # above DT_PROJ_MAX_BATCH rows: x_proj by ops/triton_xproj.py
    supported: Callable | None = None  # model -> bool; None: always
    needs: str = ""  # what `supported` checks, for the error of a forced mode

    def applies(self, model) -> bool:
        return self.supported is None or bool(self.supported(model))

    def step_kwargs(self, rows: int) -> dict:
        """fast_step's flags for this mode at `rows` rows (every mode is cuBLAS above one row), and
        lt_out_proj (the caller passes fast_step the zero bias it needs)."""
        one = rows == 1
        return {"gemv": self.gemv and one, "conv_fold": self.conv_fold and one,
                "xproj_merge": self.xproj_merge and one, "lt_out_proj": self.lt_out_proj and not one,
                "split_x": self.split_x and rows > _split_min_rows()}


def _conv_fold(model) -> bool:
    from falcon_mamba.decode.step import conv_fold_supported

    return conv_fold_supported(model)


def _plain_out_proj(model) -> bool:
    """Every out_proj a bias-free dense torch Linear on CUDA (a quantized one has its own kernel)."""
    layers = model.backbone.layers
    return model.device.type == "cuda" and len(layers) > 0 and all(
        type(b.mixer.out_proj) is torch.nn.Linear and b.mixer.out_proj.bias is None for b in layers)


def _split_min_rows() -> int:
    """split_x applies above this many rows (at fewer the SSM kernel runs dt_proj and its norm)."""
    from falcon_mamba.ops.triton_decode import DT_PROJ_MAX_BATCH

    return DT_PROJ_MAX_BATCH


def _split_x(model) -> bool:
    from falcon_mamba.decode.step import split_xproj_supported

    return model.device.type == "cuda" and split_xproj_supported(model)


def _split_x_lt(model) -> bool:
    return _split_x(model) and _plain_out_proj(model)


def _xproj_merge(model) -> bool:
    from falcon_mamba.decode.step import xproj_merge_supported

    return xproj_merge_supported(model)


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("cublas"),
    Mode("cublas_lt", lt_out_proj=True, supported=_plain_out_proj,
         needs="a bias-free dense out_proj on a CUDA GPU"),
    Mode("split_x", split_x=True, supported=_split_x,
         needs="bias-free dense x_proj Linears on a CUDA GPU"),
    Mode("split_x_lt", split_x=True, lt_out_proj=True, supported=_split_x_lt,
         needs="bias-free dense x_proj and out_proj Linears on a CUDA GPU"),
    Mode("triton", gemv=True),
    Mode("triton_cx", gemv=True, conv_fold=True, supported=_conv_fold,
         needs="GEMV-able x_proj and a fusable dt_proj (dense, or quantized with its bias outside the "
               "forward)"),
    Mode("triton_xp", gemv=True, xproj_merge=True, supported=_xproj_merge,
         needs="int4 in_proj and x_proj on the packed int4 kernel (a CUDA GPU)"),
)}

# the modes of the steps above one row (cublas, the reference, first)
BATCHED = ("cublas", "cublas_lt", "split_x", "split_x_lt")
PDL_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class DecodeOptions:
    """How decoding runs; parsed once at the edge (CLI flags, server flags, generate() keywords).

    mode: "auto" (timed at batch 1 and per batch bucket, the fastest correct one kept) or a name of
    MODES, forced (above one row a batch-1-only mode means cublas).
    pdl: programmatic dependent launch of the Triton kernels: "auto" (timed both ways), "on", "off".
    cuda_graphs: replay the step as CUDA graphs (one per batch bucket) where it can run (CUDA and the
    triton op backend); False runs the same step eagerly.
    tuning_cache: folder of the on-disk tuning cache (None: the default, ~/.cache/falcon-mamba/tuning;
    "" turns it off).
    """

    mode: str = "auto"
    pdl: str = "auto"
    cuda_graphs: bool = True
    tuning_cache: str | None = None

    def __post_init__(self) -> None:
        if self.mode != "auto" and self.mode not in MODES:
            raise UserError(f"decode mode {self.mode!r} is unknown; use auto or one of {', '.join(MODES)}")
        if self.pdl not in PDL_CHOICES:
            raise UserError(f"pdl {self.pdl!r} is unknown; use one of {', '.join(PDL_CHOICES)}")

    def candidates(self, model, rows: int = 1) -> list[Mode]:
        """The modes to time at `rows` rows (the forced one alone), cublas first (the reference):
        at batch 1 the batch-1 modes, above it cublas and cublas_lt, and above
        DT_PROJ_MAX_BATCH rows split_x and split_x_lt too."""
        batched = [MODES[n] for n in BATCHED]
        if self.mode != "auto":
            m = MODES[self.mode]
            if not m.applies(model):
                raise UserError(f"decode mode {m.name} needs {m.needs}; use --decode-mode auto")
            return [m] if rows == 1 or m in batched else [MODES["cublas"]]
        if rows > 1:
            return [m for m in batched if m.applies(model) and (rows > _split_min_rows() or not m.split_x)]
        return [m for m in MODES.values() if m not in batched[1:] and m.applies(model)]


def add_decode_arguments(parser) -> None:
    """The decode flags shared by generate, chat, serve and bench."""
    g = parser.add_argument_group("decoding (CUDA)")
    g.add_argument("--decode-mode", default="auto", choices=("auto", *MODES),
                   help="projection mode: auto (timed at start per batch size, cached on disk) or forced")
    g.add_argument("--pdl", default="auto", choices=PDL_CHOICES,
                   help="programmatic dependent launch of the decode kernels (auto: timed)")
    g.add_argument("--no-cuda-graphs", action="store_true",
                   help="run the decode step eagerly instead of as CUDA-graph replays")
    g.add_argument("--tuning-cache", default=None, metavar="DIR",
                   help="folder of the decode tuning cache (default ~/.cache/falcon-mamba/tuning; '' = off)")


def options_from_args(args) -> DecodeOptions:
    return DecodeOptions(mode=args.decode_mode, pdl=args.pdl, cuda_graphs=not args.no_cuda_graphs,
                         tuning_cache=args.tuning_cache)
