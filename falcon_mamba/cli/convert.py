"""`falcon-mamba convert`: export a model folder to another format (GGUF for llama.cpp).

    falcon-mamba convert --model DIR --to gguf --outtype q8_0 --out model.gguf
"""

from __future__ import annotations

NAME = "convert"
HELP = "export a model to GGUF (llama.cpp, LM Studio): --to gguf --outtype f32|f16|bf16|q8_0|q4_0|..."


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="model folder or Hub id, HF format, high precision "
                                                 "(default: the small model embedded in the package)")
    p.add_argument("--to", required=True, help="target format: gguf")
    p.add_argument("--outtype", default="f16",
                   help="2-D weights: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1 or q4_0 (default f16)")
    p.add_argument("--out", required=True, help="output file, e.g. model-q8_0.gguf")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json to embed (default: the one in the model folder)")
    p.add_argument("--tokenizer-pre", default=None,
                   help="llama.cpp pre-tokenizer name, when it cannot be recognised (e.g. falcon)")


def run(args) -> int:
    import sys

    from falcon_mamba.errors import UserError

    if args.to.lower() != "gguf":
        raise UserError(f"unknown target format {args.to!r}; supported: gguf")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("GGUF export needs the gguf package: pip install 'falcon-mamba[gguf]'") from None
    from falcon_mamba import default_model
    from falcon_mamba.gguf import export_gguf

    out = export_gguf(args.model or default_model.path(), args.out, outtype=args.outtype.lower(),
                      tokenizer=args.tokenizer, tokenizer_pre=args.tokenizer_pre,
                      progress=sys.stderr.isatty())
    print(f"wrote {out} ({out.stat().st_size / 1e6:,.1f} MB, {args.outtype.lower()})")
    return 0
