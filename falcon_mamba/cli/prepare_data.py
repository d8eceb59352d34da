"""`falcon-mamba prepare-data`: text or jsonl files -> token shards with a validation split."""

from __future__ import annotations

NAME = "prepare-data"
HELP = "tokenize text/jsonl files into training shards (document boundaries kept, validation held out)"


def add_arguments(p) -> None:
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="text or .jsonl files; NAME=FILE names the source (for the mixture)")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer.json, a model folder, or bpe:N (fit an N-token BPE to the training split)")
    p.add_argument("--out", required=True, help="the data folder to create")
    p.add_argument("--val-fraction", type=float, default=0.02,
                   help="held out: the last fraction of each file (cut at a line break); default 0.02")
    p.add_argument("--text-field", default="text", help="the field holding the text in .jsonl files")
    p.add_argument("--chat", action="store_true",
                   help='.jsonl with {"messages": [...]} per line: rendered by the chat template, '
                        "loss only on assistant tokens")
    p.add_argument("--doc-separator", default=None,
                   help=r"cut text files into documents at this string, e.g. '\n\n\n' (default: 1 per file)")
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"], help="shard id dtype")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty --out folder (never one that holds an input)")


def unescape_separator(text: str) -> str:
    r"""'\n\n' -> two newlines: Python's backslash escapes, the other characters as given."""
    from falcon_mamba.errors import UserError

    try:
        sep = text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise UserError(f"--doc-separator {text!r}: bad backslash escape ({e.reason}); write e.g. "
                        r"'\n\n\n' or '\x0c'") from None
    if not sep:
        raise UserError("--doc-separator must not be empty")
    return sep


def run(args) -> int:
    from falcon_mamba.data.prepare import prepare

    sep = unescape_separator(args.doc_separator) if args.doc_separator is not None else None
    out = prepare(args.files, args.out, args.tokenizer, val_fraction=args.val_fraction,
                  text_field=args.text_field, chat=args.chat, doc_separator=sep, dtype=args.dtype,
                  overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
