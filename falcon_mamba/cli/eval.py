"""`falcon-mamba eval`: perplexity of text files, passkey retrieval, lm-evaluation-harness.

    falcon-mamba eval perplexity --model DIR book.txt notes.txt [--chunk-size 1024] [--json]
    falcon-mamba eval passkey --model DIR --lengths 1k,8k,64k [--trials 5] [--json]
    falcon-mamba eval harness --model falcon-mamba --model_args pretrained=DIR --tasks ...   (lm-eval)
"""

from __future__ import annotations

import argparse

NAME = "eval"
HELP = "evaluate a model: perplexity / bits per byte of text files, passkey retrieval, lm-eval tasks"


def add_arguments(p) -> None:
    from falcon_mamba.cli.generate import add_model_arguments

    sub = p.add_subparsers(dest="eval_command", metavar="EVAL", required=True)
    pp = sub.add_parser("perplexity", help="perplexity and bits per byte of UTF-8 text files "
                                           "(chunked, constant memory)")
    add_model_arguments(pp)
    pp.add_argument("files", nargs="+", metavar="FILE",
                    help="UTF-8 text files, each scored as one document")
    pp.add_argument("--chunk-size", type=int, default=1024, help="tokens per forward chunk (default 1024)")
    pp.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    pp.add_argument("--no-progress", action="store_true", help="no progress bar")

    pk = sub.add_parser("passkey", help="passkey retrieval at several context lengths (long-context recall)")
    add_model_arguments(pk)
    pk.add_argument("--lengths", default="1k,8k,64k", help="prompt lengths in tokens (default 1k,8k,64k)")
    pk.add_argument("--trials", type=int, default=5, help="trials per length, at evenly spread depths")
    pk.add_argument("--seed", type=int, default=0, help="seed of the random keys")
    pk.add_argument("--chunk-size", type=int, default=2048, help="prefill chunk in tokens (default 2048)")
    pk.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    # prefix_chars="+": every argument after `harness`, --options included, goes to lm_eval.
    hp = sub.add_parser("harness", help="run lm-evaluation-harness with the 'falcon-mamba' model "
                                        "registered (arguments go to lm_eval)", add_help=False,
                        prefix_chars="+")
    hp.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm_eval")


def _perplexity(args) -> int:
    import json

    from falcon_mamba.cli.generate import load_model_and_tokenizer
    from falcon_mamba.eval.perplexity import PerplexityResult, iter_text_blocks, perplexity_file

    for f in args.files:  # bad files fail before the model loads
        next(iter_text_blocks(f, block_bytes=4096))
    model, tok = load_model_and_tokenizer(args)
    results = [perplexity_file(model, tok, f, args.chunk_size, progress=not args.no_progress)
               for f in args.files]
    if len(results) > 1:
        results.append(PerplexityResult("total", sum(r.tokens for r in results),
                                        sum(r.bytes for r in results), sum(r.nll for r in results)))
    if args.json:
        print(json.dumps({"model": str(args.model), "results": [r.as_dict() for r in results]}))
        return 0
    width = max(len(r.name) for r in results)
    print(f"{'file':<{width}} {'tokens':>12} {'bytes':>12} {'perplexity':>11} {'bits/byte':>10}")
    for r in results:
        print(f"{r.name:<{width}} {r.tokens:>12,} {r.bytes:>12,} {r.perplexity:>11.3f} "
              f"{r.bits_per_byte:>10.4f}")
    return 0


def _passkey(args) -> int:
    import json

    from falcon_mamba.cli.generate import load_model_and_tokenizer
    from falcon_mamba.eval.passkey import format_table, parse_lengths, run_passkey

    lengths = parse_lengths(args.lengths)
    model, tok = load_model_and_tokenizer(args)
    rows = run_passkey(model, tok, lengths, trials=args.trials, seed=args.seed, chunk_size=args.chunk_size)
    if args.json:
        print(json.dumps({"model": str(args.model), "rows": [
            {"length": r.length, "prompt_tokens": r.mean_prompt_tokens, "trials": r.trials,
             "found": r.found, "accuracy": r.accuracy, "seconds": r.seconds, "outputs": r.outputs}
            for r in rows]}))
    else:
        print(format_table(rows))
    return 0


def _harness(args) -> int:
    from falcon_mamba.errors import UserError

    try:
        from falcon_mamba.eval import harness
    except ImportError as e:
        raise UserError(f"lm-evaluation-harness is not installed ({e}); "
                        "pip install 'falcon-mamba[eval]'") from None
    harness.main(args.lm_eval_args)
    return 0


def run(args) -> int:
    return {"perplexity": _perplexity, "passkey": _passkey, "harness": _harness}[args.eval_command](args)
