"""Programmatic dependent launch (PDL, Hopper and later) for the decode-step kernels.

A decode step is ~6 small launches per layer; between two kernels in a CUDA graph the GPU drains
the first grid, then launches the next one (a few microseconds, x 384 per token for the 7B). With
PDL the next kernel is launched while the previous one still runs: every kernel below starts with
``griddepcontrol.wait`` (it blocks until the previous grid has finished and its writes are
visible) and then ``griddepcontrol.launch_dependents`` (let the next kernel be scheduled). Nothing
is read before the wait, so the data flow is unchanged; only the launch latency is hidden.

``active()`` says whether the kernels launched now should use it: inside ``enabled(True)`` (the
CUDA-graph decoder times both ways and keeps the faster), on CUDA, not under Triton's interpreter
(which cannot run the inline PTX).
"""

from __future__ import annotations

import contextlib
import os
import threading

import triton
import triton.language as tl

_state = threading.local()


def _interpreting() -> bool:
    return bool(os.environ.get("TRITON_INTERPRET"))


@contextlib.contextmanager
def enabled(on: bool = True):
    """Kernels launched inside use PDL (when the device supports it)."""
    prev = getattr(_state, "on", False)
    _state.on = on
    try:
        yield
    finally:
        _state.on = prev


def supported(device) -> bool:
    """Hopper or later, outside the interpreter."""
    if _interpreting():
        return False
    import torch

    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 9


def active(device) -> bool:
    return getattr(_state, "on", False) and supported(device)


def launch_kwargs(device) -> dict:
    """Keyword arguments for a kernel launch: the PDL constexpr and Triton's launch option."""
    on = active(device)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}


if not _interpreting():
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def dep_sync(PDL: tl.constexpr):
        """Call first in a kernel: wait for the previous grid, then let the next one launch."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
else:
    @triton.jit
    def dep_sync(PDL: tl.constexpr):
        pass
