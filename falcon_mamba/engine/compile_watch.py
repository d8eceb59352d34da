"""Say when a Triton kernel compiles while the engine serves.

A compile takes 0.1-3 s (H200: a first burst of 64 prompts waited 2.5 s), and every request in the
step waits for it; the warm-up exists to compile every variant first. A variant it missed shows in
the server's log as a warning naming the kernel, its specialisation and the time it took, which is
what a fix of the warm-up needs. No effect where Triton lacks the hooks (Triton < 3.4).
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("falcon_mamba.engine")


def watch_late_compiles() -> bool:
    """From now on, log a warning for each Triton compile (not a cache hit) of this process.
    Returns whether the hooks could be installed."""
    try:
        from triton import knobs
    except ImportError:
        return False
    runtime = getattr(knobs, "runtime", None)
    if runtime is None or not hasattr(runtime, "jit_post_compile_hook"):
        return False
    started: dict = {}

    def before(*, key, repr, **_):  # noqa: A002 (Triton's keyword)
        started[str(key)] = time.perf_counter()
        return None  # None: compile as usual

    def after(*, key, repr, **_):  # noqa: A002
        t0 = started.pop(str(key), None)
        took = f" in {(time.perf_counter() - t0) * 1e3:.0f} ms" if t0 is not None else ""
        log.warning("Triton compiled a kernel variant while serving%s (its requests waited): %s",
                    took, repr[:400])

    runtime.jit_cache_hook = before
    runtime.jit_post_compile_hook = after
    return True
