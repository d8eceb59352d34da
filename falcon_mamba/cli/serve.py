"""`falcon-mamba serve`: an OpenAI-compatible HTTP server (completions, chat, SSE streaming)."""

from __future__ import annotations

import gc
import os
import sys

NAME = "serve"
HELP = "serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)"

API_KEY_ENV = "FALCON_MAMBA_API_KEY"
GIL_SWITCH_S = 0.0005  # the interpreter's switch interval while serving (see run())


def add_arguments(p) -> None:
    p.add_argument("--model", help="model folder or Hub id (default: the small model embedded in "
                                   "the package, when this install has it)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: "
                                                       "this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on every "
                                                   f"route but /health (or set {API_KEY_ENV})")
    p.add_argument("--served-model-name", default=None, help="the model id clients pass "
                                                             "(default: the folder's name)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="weight dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--state-memory", default="auto",
                   help="memory for the state slots, e.g. 4GiB (default: a quarter of free GPU "
                        "memory after loading, 1GiB on CPU)")
    p.add_argument("--state-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the SSM states the slots hold: bfloat16 halves the bytes each "
                        "decode step reads and writes per sequence (as transformers' and mamba_ssm's "
                        "caches in the model dtype; the step still computes in float32) and fits "
                        "~1.8x the slots in --state-memory; float32 (default) matches generate()")
    p.add_argument("--max-batch", type=int, default=64,
                   help="most sequences served at once (state slots), if the budget allows")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a slot; past that: 429 with Retry-After")
    p.add_argument("--prefill-chunk", type=int, default=576,
                   help="prompt tokens of one request read per engine step, between decode steps "
                        "(a chunk of this length, and a prompt up to it, replay a captured graph; "
                        "576 with --long-prompt-interval 2: a 100k-token prompt beside 32 streams is "
                        "read at half the parallel prefill rate within 3x their inter-token p99)")
    p.add_argument("--prefill-budget", type=int, default=2048,
                   help="prompt tokens of all requests read per engine step (batched in few launches)")
    p.add_argument("--long-prompt-interval", type=int, default=2,
                   help="while streams decode, read a long prompt's next chunk every N-th step (1: "
                        "every step; 2 halves what the chunks add to the streams' token latency)")
    p.add_argument("--max-context", type=int, default=1 << 20,
                   help="prompt + max_tokens limit per request (400 above it)")
    p.add_argument("--default-max-tokens", type=int, default=1024,
                   help="max_tokens of a chat request that sets none (completions: 16, as OpenAI)")
    p.add_argument("--max-body", default="16MiB", help="request body size limit (413 above it)")
    p.add_argument("--prefix-cache-memory", default="1GiB",
                   help="memory for cached conversation states (0 turns the cache off)")
    p.add_argument("--prefix-cache-min-prompt", type=int, default=64,
                   help="keep a prompt's end state in the cache from this many tokens (shorter "
                        "prompts are read again; answers' end states are always kept)")
    p.add_argument("--prefix-cache-dir", default=None,
                   help="spill evicted cache states to a private subfolder of this folder (removed "
                        "at exit; nothing else in the folder is touched)")
    p.add_argument("--prefix-cache-disk", default="10GiB", help="disk budget of --prefix-cache-dir")
    p.add_argument("--shutdown-grace", type=float, default=10.0,
                   help="seconds running requests get to finish on Ctrl-C/SIGTERM before cancellation")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's headers (slow clients are dropped)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client has to send a request's body (408 after)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--step-log", default=None, metavar="FILE",
                   help="append one JSON line per engine step to FILE (its time, decode rows, prompt "
                        "chunks): what a latency spike was made of")
    from falcon_mamba.decode.modes import add_decode_arguments

    add_decode_arguments(p)


def _size(text: str, what: str) -> int:
    from falcon_mamba.checkpoint import _parse_size
    from falcon_mamba.errors import UserError

    try:
        n = _parse_size(text)
    except (ValueError, OverflowError):
        raise UserError(f"{what}: cannot read {text!r} as a size (up to 1 EiB); write e.g. 512MiB "
                        "or 4GiB") from None
    if n < 0:
        raise UserError(f"{what} must not be negative")
    return n


def _default_model() -> str:
    from falcon_mamba import default_model

    return str(default_model.path())  # a UserError naming --model when this install has none


def _open_step_log(path: str | None):
    """--step-log's file, opened for appending (nothing of an existing file is lost), line-buffered."""
    from falcon_mamba.errors import UserError

    if path is None:
        return None
    try:
        return open(path, "a", buffering=1, encoding="utf-8")
    except OSError as e:
        raise UserError(f"--step-log {path}: cannot open it for appending ({e.strerror}); give a "
                        "writable file path") from None


def _check(args) -> dict:
    """Validate the numbers before loading anything; returns the parsed sizes."""
    from falcon_mamba.errors import UserError

    for name, v, low in (("--port", args.port, 0), ("--max-batch", args.max_batch, 1),
                         ("--max-queue", args.max_queue, 0), ("--prefill-chunk", args.prefill_chunk, 1),
                         ("--prefill-budget", args.prefill_budget, 1),
                         ("--long-prompt-interval", args.long_prompt_interval, 1),
                         ("--prefix-cache-min-prompt", args.prefix_cache_min_prompt, 0),
                         ("--max-context", args.max_context, 2),
                         ("--default-max-tokens", args.default_max_tokens, 1)):
        if v < low:
            raise UserError(f"{name} must be at least {low}, got {v}")
    if args.port > 65535:
        raise UserError(f"--port must be at most 65535, got {args.port}")
    for name, v, high in (("--max-batch", args.max_batch, 1 << 16), ("--max-queue", args.max_queue, 1 << 20),
                          ("--prefill-chunk", args.prefill_chunk, 1 << 20),
                          ("--long-prompt-interval", args.long_prompt_interval, 1000),
                          ("--max-context", args.max_context, 1 << 40),
                          ("--default-max-tokens", args.default_max_tokens, 1 << 31)):
        if v > high:
            raise UserError(f"{name} must be at most {high}, got {v}")
    import math

    for name, v, high in (("--shutdown-grace", args.shutdown_grace, 86400),
                          ("--header-timeout", args.header_timeout, 86400),
                          ("--body-timeout", args.body_timeout, 86400)):
        if not math.isfinite(v) or v < 0 or v > high:
            raise UserError(f"{name} must be a number of seconds in [0, {high}], got {v}")
    if args.header_timeout == 0 or args.body_timeout == 0:
        raise UserError("--header-timeout and --body-timeout must be more than 0 seconds")
    if args.prefix_cache_dir is not None:
        from pathlib import Path

        d = Path(args.prefix_cache_dir)
        if d.exists() and not d.is_dir():
            raise UserError(f"--prefix-cache-dir {d}: is a file; give a folder")
    return {
        "state": None if args.state_memory == "auto" else _size(args.state_memory, "--state-memory"),
        "body": _size(args.max_body, "--max-body"),
        "cache": _size(args.prefix_cache_memory, "--prefix-cache-memory"),
        "disk": _size(args.prefix_cache_disk, "--prefix-cache-disk"),
    }


def run(args) -> int:
    import logging
    from pathlib import Path

    import torch

    from falcon_mamba import ops
    from falcon_mamba.checkpoint import load_model
    from falcon_mamba.dtypes import parse_device, parse_dtype
    from falcon_mamba.engine.engine import Engine, EngineConfig
    from falcon_mamba.engine.state_pool import SSM_DTYPES, slot_bytes, slots_for_budget
    from falcon_mamba.errors import UserError
    from falcon_mamba.tokenizer import check_fits, load_tokenizer

    try:
        from falcon_mamba.server import ServerSettings
        from falcon_mamba.server import run as run_server
    except ImportError as e:
        raise UserError(f"serving needs the 'serve' extra ({e.name} is missing): "
                        "pip install 'falcon-mamba[serve]'") from None
    from falcon_mamba.decode.modes import options_from_args

    sizes = _check(args)
    decode = options_from_args(args)
    step_log = _open_step_log(args.step_log)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("falcon_mamba.serve")
    ref = args.model or _default_model()
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = load_model(ref, dtype=dtype, device=device)
    tok = load_tokenizer(ref)
    check_fits(tok, model.config.vocab_size)
    budget = sizes["state"]
    if budget is None:  # auto
        budget = torch.cuda.mem_get_info(device)[0] // 4 if device.type == "cuda" else 1 << 30
    state_dtype = SSM_DTYPES[args.state_dtype]
    slots = slots_for_budget(model.config, dtype, budget, args.max_batch, state_dtype)
    engine = Engine(model, tok, EngineConfig(
        num_slots=slots, max_waiting=args.max_queue, prefill_chunk=args.prefill_chunk,
        prefill_budget=max(args.prefill_budget, args.prefill_chunk), max_context=args.max_context,
        long_prompt_interval=args.long_prompt_interval,
        cache_bytes=sizes["cache"], cache_dir=args.prefix_cache_dir, cache_disk_bytes=sizes["disk"],
        cache_min_prompt=args.prefix_cache_min_prompt,
        decode=decode, step_log=step_log, state_dtype=state_dtype))
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    model_id = args.served_model_name or Path(str(getattr(model, "source", ref))).name or "falcon-mamba"
    settings = ServerSettings(model_id, api_key=api_key, max_body_bytes=sizes["body"],
                              default_max_tokens=args.default_max_tokens,
                              header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout)
    engine.start(warm_up=True)  # /health answers 503 "warming up" until the decode graphs are captured
    log.info("serving %s on http://%s:%d/v1 (%s, %s, %s ops; %d state slots of %.3g MiB, %s SSM "
             "states%s)", model_id, args.host, args.port, device, str(dtype).removeprefix("torch."),
             ops.backend_name(device), slots, slot_bytes(model.config, dtype, state_dtype) / 2**20,
             args.state_dtype,
             "; API key required" if api_key else "")
    if tok.has_chat_template:  # the fallback is announced as a warning by the app
        log.info("chat requests use %s", tok.describe_chat_template())
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this address can use it",
                    args.host)
    # Everything built so far (torch, the model's modules, the tokenizer's byte table) lives as
    # long as the server: out of the collector's sight, a full collection scans only what serving
    # allocates (a 256-row engine on the CPU: its longest step, one full collection, 120 -> 2 ms).
    gc.freeze()
    # The engine thread and the event loop share the interpreter lock. A thread that wants it waits
    # for the holder's switch interval (5 ms by default) at every re-acquisition, and the engine
    # thread re-acquires it after each CUDA call that released it: behind a burst of requests being
    # parsed and tokenized on the loop, a step's launches were spread over 50-60 ms of GPU time for
    # ~10 ms of work (H200, results/h200-serve-99b6cab.json, the steps' GPU times). 0.5 ms bounds
    # each wait; both threads still run in slices far longer than a switch costs (~5 us).
    sys.setswitchinterval(GIL_SWITCH_S)
    try:
        run_server(engine, tok, settings, args.host, args.port, args.shutdown_grace,
                   log_level="warning" if args.log_level == "info" else args.log_level)
    finally:
        if engine.is_alive:
            engine.shutdown(0)
        if step_log is not None:
            step_log.close()
    log.info("stopped")
    return 0
