"""The Falcon Mamba paper's two efficiency figures, for `falcon-mamba bench`.

1. memcap: the longest prompt that fits under a memory cap (24 GB, the paper's A10), for parallel
   and chunked prefill, Falcon Mamba against a Mistral-7B-shaped transformer.
2. generation: decode throughput and peak memory against the position in a long generation
   (up to 130k tokens) for both. A position P is reached by prefilling P tokens (chunked), then
   n tokens are decoded there and timed: a decode step at position P does the same work whether
   the P tokens before it were prompt or generated, and a generated run of 130k tokens at batch 1
   would not fit a lease (over 10 minutes even at the bandwidth ceiling).
"""

from __future__ import annotations

import time

import torch

from falcon_mamba.cli._bench_util import free_memory, is_oom, memory_cap, peak_bytes, reset_peak, sync


def _fits(fn, length: int, device, log) -> bool:
    try:
        fn(length)
        sync(device)
        ok = True
    except Exception as e:  # noqa: BLE001 - only out-of-memory means "does not fit"
        if not is_oom(e):
            raise
        ok = False
    free_memory(device)
    log(f"   {length:>9,} tokens: {'fits' if ok else 'out of memory'}")
    return ok


def longest_fitting(fn, device, start: int, limit: int, log, step: int = 1024) -> dict:
    """Largest multiple of `step` tokens for which fn(length) runs: doubling, then bisection to
    about 3%."""
    ok, bad, tries = 0, None, 0
    length = start
    while length <= limit:
        tries += 1
        if _fits(fn, length, device, log):
            ok = length
            length *= 2
        else:
            bad = length
            break
    while bad is not None and bad - ok > max(step, ok // 32):
        mid = (ok + bad) // 2 // step * step
        if mid <= ok:
            break
        tries += 1
        if _fits(fn, mid, device, log):
            ok = mid
        else:
            bad = mid
    return {"max_tokens": ok, "first_failure": bad, "tested_limit": limit, "tries": tries}


# ---- prefill closures -------------------------------------------------------------------------

def ours_parallel(model, device):
    V = model.config.vocab_size

    def run(length):
        with torch.no_grad():
            model(torch.randint(0, V, (1, length), device=device), last_only=True)
    return run


def ours_chunked(model, device, chunk: int):
    V = model.config.vocab_size

    def run(length):
        state, done = None, 0
        with torch.no_grad():
            while done < length:
                n = min(chunk, length - done)
                _, state = model(torch.randint(0, V, (1, n), device=device), state=state,
                                 last_only=True)
                done += n
    return run


def hf_parallel(hf_model, vocab, device):
    def run(length):
        with torch.no_grad():
            hf_model(torch.randint(0, vocab, (1, length), device=device), use_cache=True,
                     logits_to_keep=1)
    return run


def hf_chunked(hf_model, vocab, device, chunk: int):
    def run(length):
        cache, done = None, 0
        with torch.no_grad():
            while done < length:
                n = min(chunk, length - done)
                out = hf_model(torch.randint(0, vocab, (1, n), device=device), past_key_values=cache,
                               use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
                done += n
    return run


def memcap(name_fns: dict, device, cap_bytes: int, starts: dict, limits: dict, log) -> dict:
    """For each named prefill closure, the longest prompt that fits under the cap."""
    out = {}
    with memory_cap(device, cap_bytes):
        for name, fn in name_fns.items():
            log(f"  {name} (cap {cap_bytes / 1e9:.0f} GB)")
            t0 = time.perf_counter()
            out[name] = longest_fitting(fn, device, starts[name], limits[name], log)
            out[name]["seconds"] = round(time.perf_counter() - t0, 1)
    return out


# ---- generation curves --------------------------------------------------------------------------

def curve_ours(model, device, positions, n_tokens, chunk: int, deadline: float, log) -> list:
    """Decode speed and peak memory at each position, ours (graphed greedy decode, batch 1)."""
    V = model.config.vocab_size
    use_graph = device.type == "cuda"
    from falcon_mamba.decode.loop import KernelLoop

    state = model.new_state(1)
    tok = torch.randint(0, V, (1,), device=device)
    if use_graph:
        loop = KernelLoop(model, 1)
        loop.run(2)  # capture
    pos = state.tokens_seen
    points = []
    for P, n in zip(positions, n_tokens):
        if time.perf_counter() > deadline:
            log(f"   deadline reached before position {P:,}")
            break
        with torch.no_grad():
            while pos < P:  # prefill up to P, carrying the state
                k = min(chunk, P - pos)
                _, state = model(torch.randint(0, V, (1, k), device=device), state=state, last_only=True)
                pos += k
        free_memory(device)
        reset_peak(device)
        t0 = time.perf_counter()
        if use_graph:
            loop.load(state, tok)
            loop.run(n)
            state = loop.pool.read(0)  # the state the decode advanced, for the next prefill
            state.tokens_seen = pos + n
        else:
            with torch.no_grad():
                t_ = tok
                for _ in range(n):
                    t_ = model.step(t_, state).argmax(-1)
        sync(device)
        dt = time.perf_counter() - t0
        points.append({"position": pos, "tokens": n, "tok_per_s": n / dt,
                       "peak_gib": peak_bytes(device) / 2 ** 30})
        log(f"   ours at {pos:>9,}: {n / dt:8.1f} tok/s, peak {points[-1]['peak_gib']:.2f} GiB")
        pos += n
    return points


def curve_hf(hf_model, vocab, device, positions, n_tokens: int, chunk: int, deadline: float, log) -> list:
    """The same for a transformers model with its KV cache (eager decode, batch 1)."""
    cache, pos = None, 0
    tok = torch.randint(0, vocab, (1, 1), device=device)
    points = []
    with torch.no_grad():
        out = hf_model(tok, use_cache=True)  # position 0: the first token starts the cache
        cache, pos = out.past_key_values, 1
        for P in positions:
            if time.perf_counter() > deadline:
                log(f"   deadline reached before position {P:,}")
                break
            try:
                while pos < P:
                    k = min(chunk, P - pos)
                    out = hf_model(torch.randint(0, vocab, (1, k), device=device), past_key_values=cache,
                                   use_cache=True, logits_to_keep=1)
                    cache = out.past_key_values
                    pos += k
                free_memory(device)
                reset_peak(device)
                t0 = time.perf_counter()
                for _ in range(n_tokens):
                    out = hf_model(tok, past_key_values=cache, use_cache=True)
                    cache = out.past_key_values
                    tok = out.logits[:, -1:].argmax(-1)
                sync(device)
                dt = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    raise
                points.append({"position": P, "oom": True})
                log(f"   transformer out of memory at {P:,}")
                break
            points.append({"position": pos, "tokens": n_tokens, "tok_per_s": n_tokens / dt,
                           "peak_gib": peak_bytes(device) / 2 ** 30})
            log(f"   transformer at {pos:>9,}: {n_tokens / dt:8.1f} tok/s, "
                f"peak {points[-1]['peak_gib']:.2f} GiB")
            pos += n_tokens
    del cache, out
    free_memory(device)
    return points
