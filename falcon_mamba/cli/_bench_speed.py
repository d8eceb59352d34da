"""Decode and prefill speed for `falcon-mamba bench`: ours against transformers on the same device.

Every figure is also given as a fraction of its ceiling: decode from the bytes a step must move
(weights except the embedding table, the embedding rows, the state read and written, the logits)
over the measured copy bandwidth; prefill from the matmul FLOPs per token over the measured matmul
rate. Legend: B batch, L length, V vocab.
"""

from __future__ import annotations

import time

import torch

from falcon_mamba.cli._bench_util import allocated, free_memory, peak_bytes, reset_peak, sync, timed

# ---- ceilings --------------------------------------------------------------------------------

def decode_bytes_per_step(config, batch: int, weight_bytes: int = 2) -> int:
    c = config
    embed = c.vocab_size * c.hidden_size
    weights = (c.num_parameters - embed) * weight_bytes  # every weight but the embedding table
    state = c.num_hidden_layers * (c.intermediate_size * c.state_size * 4
                                   + (c.conv_kernel - 1) * c.intermediate_size * weight_bytes)
    return weights + batch * (c.hidden_size * weight_bytes + 2 * state + c.vocab_size * 4)


def prefill_flops_per_token(config) -> int:
    c = config
    H, D, N, R = c.hidden_size, c.intermediate_size, c.state_size, c.time_step_rank
    per_layer = 2 * (H * 2 * D + D * (R + 2 * N) + R * D + D * H)
    return c.num_hidden_layers * per_layer


def decode_ceiling(config, batch: int, copy_bw: float | None) -> float | None:
    return None if not copy_bw else batch * copy_bw / decode_bytes_per_step(config, batch)


def prefill_ceiling(config, matmul_rate: float | None) -> float | None:
    return None if not matmul_rate else matmul_rate / prefill_flops_per_token(config)


# ---- ours ------------------------------------------------------------------------------------

def decode_ours(model, batch: int, n_tokens: int, device: torch.device, graphs: bool = True) -> dict:
    """The kernel loop (decode/loop.py): n_tokens greedy steps per row from an empty state, back to
    back: tokens/s over all rows."""
    from falcon_mamba.decode.loop import KernelLoop
    from falcon_mamba.decode.modes import DecodeOptions

    t0 = time.perf_counter()
    loop = KernelLoop(model, batch, DecodeOptions(cuda_graphs=graphs))
    loop.run(3)  # capture the graph, compile the kernels (and time the batch-1 modes)
    sync(device)
    setup = time.perf_counter() - t0
    reset_peak(device)
    t0 = time.perf_counter()
    out = loop.run(n_tokens)
    sync(device)
    dt = time.perf_counter() - t0
    assert out.shape == (batch, n_tokens)
    return {"batch": batch, "tokens": n_tokens, "seconds": dt, "tok_per_s": batch * n_tokens / dt,
            "setup_s": setup, "peak_gib": peak_bytes(device) / 2 ** 30, **loop.mode}


def generate_ours(model, tokenizer, batch: int, n_tokens: int, device: torch.device, sampled: bool) -> dict:
    """fm.generate() on `batch` prompts of 16 random tokens, n_tokens each (EOS ignored), after a
    warm-up call of the same shape (so the figure is a warm process's, as a server's is):
    decode tok/s (from each row's first token to its last) and wall tok/s (the whole call)."""
    from falcon_mamba.generate import generate

    V = model.config.vocab_size
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, V, (16,), generator=g).tolist() for _ in range(batch)]
    kw = dict(max_new_tokens=n_tokens, ignore_eos=True, seed=1, details=True)
    kw.update(temperature=0.8, top_p=0.95) if sampled else kw.update(temperature=0.0)
    generate(model, tokenizer, prompts, **{**kw, "max_new_tokens": 4})  # warm-up
    sync(device)
    t0 = time.perf_counter()
    res = generate(model, tokenizer, prompts, **kw)
    sync(device)
    wall = time.perf_counter() - t0
    decode_s = max(r.decode_seconds for r in res)
    n = sum(len(r.token_ids) for r in res)
    assert n == batch * n_tokens, n
    return {"batch": batch, "tokens": n_tokens, "sampled": sampled,
            "sampling": "temperature 0.8, top_p 0.95" if sampled else "greedy",
            "decode_tok_per_s": (n - batch) / decode_s if decode_s > 0 else None,
            "wall_tok_per_s": n / wall, "wall_s": wall}


def prefill_ours(model, length: int, device: torch.device, reps: int = 3) -> dict:
    """Parallel prefill of one prompt of `length` tokens (logits of the last position only)."""
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    with torch.no_grad():
        base = allocated(device)
        reset_peak(device)
        t = timed(lambda: model(ids, last_only=True), device, reps=reps, warmup=1)
        extra = peak_bytes(device) - base
    free_memory(device)
    return {"length": length, "seconds": t, "tok_per_s": length / t, "extra_gib": extra / 2 ** 30}


def chunked_prefill(model, length: int, chunk: int, device: torch.device) -> dict:
    """Prefill `length` tokens in chunks of `chunk`, carrying the state; peak memory above the
    weights. The prompt is made on the device chunk by chunk (a 1M-token prompt is 8 MB anyway)."""
    V = model.config.vocab_size
    gen = torch.Generator(device=device).manual_seed(0)
    state = None
    with torch.no_grad():
        first = torch.randint(0, V, (1, min(chunk, length)), device=device, generator=gen)
        # warm-up: a whole chunk without and then with a carried state, so that every kernel variant
        # the timed loop uses (lengths, initial state in) is compiled before the clock starts
        _, warm = model(first, last_only=True)
        model(first, state=warm, last_only=True)
        del warm
        sync(device)
        base = allocated(device)
        reset_peak(device)
        t0 = time.perf_counter()
        done = 0
        while done < length:
            n = min(chunk, length - done)
            ids = torch.randint(0, V, (1, n), device=device, generator=gen)
            logits, state = model(ids, state=state, last_only=True)
            done += n
        sync(device)
        dt = time.perf_counter() - t0
        extra = peak_bytes(device) - base
    free_memory(device)
    return {"length": length, "chunk": chunk, "seconds": dt, "tok_per_s": length / dt,
            "extra_gib": extra / 2 ** 30, "finite": bool(torch.isfinite(logits).all())}


# ---- transformers ------------------------------------------------------------------------------

def decode_hf(hf_model, batch: int, n_tokens: int, vocab: int, device: torch.device) -> dict:
    """transformers' generate (greedy): per-token time from two lengths, so the prompt's prefill
    and the setup cancel out."""
    ids = torch.randint(0, vocab, (batch, 4), device=device)

    def gen(k):
        with torch.no_grad():
            out = hf_model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                    use_cache=True, pad_token_id=0, eos_token_id=None)
        assert out.shape[1] == 4 + k

    gen(2)  # warm-up
    sync(device)
    t_short = timed(lambda: gen(2), device, reps=1, warmup=0)
    t_long = timed(lambda: gen(2 + n_tokens), device, reps=1, warmup=0)
    per = max(t_long - t_short, 1e-9) / n_tokens
    return {"batch": batch, "tokens": n_tokens, "s_per_step": per, "tok_per_s": batch / per}


def prefill_hf(hf_model, length: int, vocab: int, device: torch.device, reps: int = 1,
               use_cache: bool = True) -> dict:
    """One forward over a prompt, logits of the last position only (logits_to_keep=1)."""
    ids = torch.randint(0, vocab, (1, length), device=device)
    with torch.no_grad():
        hf_model(ids[:, :16], use_cache=use_cache, logits_to_keep=1)  # warm-up
        base = allocated(device)
        reset_peak(device)
        t = timed(lambda: hf_model(ids, use_cache=use_cache, logits_to_keep=1), device, reps=reps,
                  warmup=0)
        extra = peak_bytes(device) - base
    free_memory(device)
    return {"length": length, "seconds": t, "tok_per_s": length / t, "extra_gib": extra / 2 ** 30}
