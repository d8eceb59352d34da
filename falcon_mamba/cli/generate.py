"""`falcon-mamba generate`: continue a prompt, streaming the new text to stdout.

    falcon-mamba generate "Once upon a time" --max-new-tokens 64 --temperature 0.7   # embedded model
    falcon-mamba generate --model DIR "Once upon a time" --max-new-tokens 64 --temperature 0.7
    falcon-mamba generate --model DIR --prompt-file book.txt --max-new-tokens 0 --state-out book.state
    falcon-mamba generate --model DIR --state-in book.state "Q: who is the narrator? A:" --stats
"""

from __future__ import annotations

import sys

NAME = "generate"
HELP = "generate text from a prompt (streamed to stdout); save or resume the recurrent state"

PROGRESS_MIN_CHUNKS = 4  # the progress bar appears for prompts longer than this many chunks


def add_model_arguments(p) -> None:
    """--model, --device, --dtype (shared with `chat`)."""
    p.add_argument("--model", help="model folder or Hugging Face Hub id (default: the small model "
                                   "embedded in the package)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None,
                   help="weights dtype: bfloat16, float16 or float32 (default: bfloat16 on cuda, "
                        "float32 on cpu)")


def add_sampling_arguments(p, max_new_tokens: int = 256) -> None:
    """The sampling flags (shared with `chat`); defaults are SamplingParams' defaults."""
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"most tokens to generate (default {max_new_tokens}; 0 only reads the prompt)")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top one")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    g.add_argument("--seed", type=int, default=None, help="same seed, same output (default: random)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (repeatable; \\n and \\t mean newline and "
                        "tab); it is not printed")
    g.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID",
                   help="stop at this token id (repeatable); the tokenizer's EOS always stops")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the EOS token")


def add_arguments(p) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt text, or - to read it from stdin")
    p.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 text file")
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--logprobs", action="store_true",
                   help="after the text, print each generated token and its log-probability on stderr")
    g = p.add_argument_group("prefill and state")
    g.add_argument("--prefill", choices=("auto", "chunked", "parallel"), default="auto",
                   help="read the prompt all at once (parallel) or in chunks of --chunk-size "
                        "tokens (chunked: memory independent of the prompt length); auto = "
                        "chunked above one chunk")
    g.add_argument("--chunk-size", type=int, default=None, help="tokens per prefill chunk (default 2048)")
    g.add_argument("--state-in", metavar="FILE", help="start from a saved state (instead of nothing)")
    g.add_argument("--state-out", metavar="FILE",
                   help="save the state after the prompt and the generated text "
                        "(with --max-new-tokens 0: after the prompt only)")
    g.add_argument("--stats", action="store_true",
                   help="print prompt tok/s, generation tok/s and peak memory on stderr")
    g.add_argument("--progress", action="store_true",
                   help="show the prompt progress bar even when stderr is not a terminal")
    from falcon_mamba.decode.modes import add_decode_arguments

    add_decode_arguments(p)


def read_prompt(args) -> str:
    """The prompt from the argument, stdin (-) or --prompt-file; UserError if none or unreadable."""
    from falcon_mamba.errors import UserError

    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give the prompt either as an argument or with --prompt-file, not both")
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise UserError(f"{args.prompt_file}: prompt file is not UTF-8 text") from None
        except OSError as e:
            raise UserError(f"{args.prompt_file}: cannot read the prompt file "
                            f"({e.strerror or type(e).__name__})") from None
    elif args.prompt == "-":
        text = read_stdin_text()
    elif args.prompt is not None:
        text = args.prompt
    else:
        raise UserError("no prompt: give PROMPT, --prompt-file FILE, or - to read stdin")
    if not text:
        raise UserError("empty prompt: give at least one character of text")
    from falcon_mamba.tokenizer import check_text

    check_text(text, "the prompt")
    return text


def read_stdin_text() -> str:
    """All of stdin as UTF-8 text, strictly (Python's own stdin may turn bad bytes into
    surrogates under a C locale and accept them silently). UserError when stdin is closed or not
    UTF-8."""
    from falcon_mamba.errors import UserError

    if sys.stdin is None:
        raise UserError("stdin is closed: pipe the prompt in, or give it as an argument")
    stream = getattr(sys.stdin, "buffer", None)
    try:
        if stream is None:  # a text stream put in place of stdin (tests, embedding programs)
            return sys.stdin.read()
        data = stream.read()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read stdin ({getattr(e, 'strerror', None) or e})") from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise UserError(f"stdin is not UTF-8 text (bad byte at offset {e.start}); convert it first, "
                        "e.g. with iconv") from None


def load_model_and_tokenizer(args):
    """(model, tokenizer) from --model/--device/--dtype, with clear errors."""
    import torch

    import falcon_mamba as fm
    from falcon_mamba import default_model
    from falcon_mamba.dtypes import parse_device, parse_dtype
    from falcon_mamba.tokenizer import check_fits

    device = parse_device(args.device)
    if not args.model:
        args.model = str(default_model.path())  # a UserError naming --model when none is installed
    default = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = fm.load_model(args.model, parse_dtype(args.dtype, default), device)
    tok = fm.load_tokenizer(args.model)
    check_fits(tok, model.config.vocab_size)
    return model, tok


def unescape(text: str) -> str:
    """A shell cannot easily pass a newline: read \\n, \\t and \\\\ in --stop values."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


MAX_SEED = (1 << 63) - 1
MAX_TOKENS = 1 << 31


def check_sampling_flags(args) -> None:
    """Ranges the flags' types do not say: every accepted value must be computable."""
    import math

    from falcon_mamba.errors import UserError

    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be in [0, 2**63 - 1], got {args.seed}")
    if not 0 <= args.max_new_tokens <= MAX_TOKENS:
        raise UserError(f"--max-new-tokens must be in [0, {MAX_TOKENS}], got {args.max_new_tokens}")
    if not 0 <= args.top_k <= MAX_TOKENS:
        raise UserError(f"--top-k must be in [0, {MAX_TOKENS}] (0 = off), got {args.top_k}")
    for flag, v in (("--temperature", args.temperature), ("--top-p", args.top_p),
                    ("--min-p", args.min_p), ("--repetition-penalty", args.repetition_penalty)):
        if not math.isfinite(v):
            raise UserError(f"{flag} must be a finite number, got {v}")
    if any(not 0 <= t < 1 << 31 for t in args.stop_token_id):
        raise UserError("--stop-token-id must be a token id (0 or more)")
    for text in args.stop:
        from falcon_mamba.tokenizer import check_text

        check_text(text, "--stop")


def sampling_params(args, **extra):
    from falcon_mamba.sampling import SamplingParams

    check_sampling_flags(args)
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed,
                          stop=tuple(unescape(x) for x in args.stop),
                          stop_token_ids=tuple(args.stop_token_id),
                          ignore_eos=args.ignore_eos, **extra)


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def run(args) -> int:
    import time
    from pathlib import Path

    import torch

    import falcon_mamba as fm
    from falcon_mamba.decode.modes import options_from_args
    from falcon_mamba.errors import UserError
    from falcon_mamba.generate import DEFAULT_CHUNK_SIZE, encode_prompt, engine_for, generate, peak_memory

    params = sampling_params(args, logprobs=args.logprobs)  # validate flags before loading
    decode = options_from_args(args)
    if args.chunk_size is not None and args.chunk_size < 1:
        raise UserError(f"--chunk-size must be a positive integer, got {args.chunk_size}")
    if args.state_out:  # before the prompt is read and the text generated, not after
        from falcon_mamba.state import check_state_path

        check_state_path(args.state_out, "--state-out")
    if args.state_in and Path(args.state_in).is_dir():
        raise UserError(f"--state-in {args.state_in}: is a folder, not a state file")
    if args.state_in and not Path(args.state_in).is_file():
        raise UserError(f"--state-in {args.state_in}: state file not found")
    text = read_prompt(args)
    model, tok = load_model_and_tokenizer(args)
    state = None
    if args.state_in:
        state = fm.load_state(args.state_in, model)
        if state.batch_size != 1:
            raise UserError(f"{args.state_in}: holds {state.batch_size} rows; generate needs a "
                            "state of one row")
    ids = encode_prompt(tok, text, model.config.vocab_size)
    # The decoder's start-up (CUDA-graph capture; the batch-1 mode timed or read from the tuning
    # cache) before the clock of --stats starts: it is paid once per process, not per token.
    t0 = time.perf_counter()
    engine = engine_for(model, tok, 1, decode)
    engine.warm_up()
    ready_s = time.perf_counter() - t0
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)

    chunk = args.chunk_size or DEFAULT_CHUNK_SIZE
    chunked = args.prefill == "chunked" or (args.prefill == "auto" and len(ids) > chunk)
    show_bar = chunked and len(ids) > PROGRESS_MIN_CHUNKS * chunk and (args.progress or sys.stderr.isatty())
    bar = None
    if show_bar:
        from tqdm import tqdm

        bar = tqdm(total=len(ids), unit="tok", desc="reading prompt", file=sys.stderr,
                   dynamic_ncols=True, leave=False)
    stream = generate(model, tok, ids, params=params, state=state, stream=True,
                      prefill=args.prefill, chunk_size=args.chunk_size, decode=decode,
                      progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    out = sys.stdout
    last = ""
    for piece in stream:
        out.write(piece)
        out.flush()
        last = piece
    if out.isatty() and not last.endswith("\n"):
        out.write("\n")
    res = stream.result
    if args.state_out:
        res.state.save(args.state_out)
    if args.logprobs:
        for t, lp in zip(res.token_ids, res.logprobs or []):
            print(f"{t}\t{tok.decode([t])!r}\t{lp:.4f}", file=sys.stderr)
    if args.stats:
        n_gen = len(res.token_ids)
        mem, what = peak_memory(model.device)
        rate = lambda n, s: f"{n / s:,.1f} tok/s" if s > 0 else "n/a"  # noqa: E731
        mode = "chunked" if chunked else "parallel"
        print(f"prompt: {res.prompt_tokens} tokens in {res.prefill_seconds:.3f} s "
              f"({rate(res.prompt_tokens, res.prefill_seconds)}, prefill {mode})", file=sys.stderr)
        print(f"generation: {n_gen} tokens in {res.decode_seconds:.3f} s "
              f"({rate(n_gen, res.decode_seconds)}), finish: {res.finish_reason}", file=sys.stderr)
        print(f"peak memory: {format_bytes(mem)} ({what}); state: {format_bytes(res.state.nbytes)}; "
              f"seed: {res.seed}", file=sys.stderr)
        graphs = engine.runner.graphs
        how = (f"CUDA graphs, batch-1 mode {graphs.batch1_choice()[0].name}"
               + (" (tuning cache)" if graphs.tuned_from_cache else "") if graphs.use_graphs else
               "eager" + (" fused kernels" if graphs.fast else " model.step"))
        print(f"decoder: {how}; ready in {ready_s:.2f} s (start-up, not in the figures above)",
              file=sys.stderr)
    return 0
