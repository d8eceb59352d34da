"""Capturing a CUDA graph: the one recipe the decode graphs and the prompt graphs share.

torch.cuda.graph() empties the device's and the pinned host memory's caching allocators before
every capture, so each capture after the first gives memory back to the driver and the next
forward allocates it again (cudaMalloc / cudaHostAlloc): with ~75 graphs captured at a server's
warm-up (decode buckets, prompt graphs) that is most of the start-up. Capturing with
CUDAGraph.capture_begin / capture_end on a side stream keeps the caches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def capture(body: Callable[[], object], pool=None, warm_runs: int = 2) -> tuple[torch.cuda.CUDAGraph, object]:
    """Run body warm_runs times on a side stream (compiling its shapes' kernel variants, creating
    the cuBLAS handles and workspaces: none of which may happen inside a capture), then capture one
    more run into a graph on the memory pool (a graph_pool_handle() shared by graphs that never run
    at once; None: a private pool). Returns (graph, what the captured run returned: its static
    outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warm_runs):
            body()
    side.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        graph.capture_begin(pool=pool)
        try:
            out = body()
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(side)
    return graph, out
