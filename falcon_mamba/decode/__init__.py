"""Decoding: the fused decode step, its batch-1 projection modes, and the CUDA graphs that replay it
over a state pool's rows with the sampler inside.

    step.py     fast_step: one token per row with the fused kernels (what the graphs capture)
    modes.py    the registry of batch-1 projection modes and DecodeOptions (parsed at the edge)
    graphs.py   DecodeGraphs: one graph per batch bucket over the pool's tensors; batch-1 autotune
    tuning.py   the on-disk cache of the autotune's choice

The server's engine and ``generate()`` both decode through engine/runner.py, which drives these.
"""

from falcon_mamba.decode.modes import MODES, DecodeOptions, Mode

__all__ = ["MODES", "DecodeOptions", "Mode"]
