"""`falcon-mamba quantize`: write an int8 or int4 weight-only quantized copy of a model folder.

    falcon-mamba quantize --model DIR --bits 8 --out DIR-int8
    falcon-mamba quantize --model DIR --bits 4 --group-size 128 --out DIR-int4

in_proj, x_proj, dt_proj, out_proj and lm_head (unless tied to the embeddings) are quantized;
embeddings, norms, conv, A_log, D and the dt bias stay in high precision (--dtype). --dt-proj dense
keeps dt_proj in high precision too (the old default; on the embedded default model both give the
same perplexity within 0.01 percentage points). The folder loads
with fm.load_model and every command that takes --model.
"""

from __future__ import annotations

NAME = "quantize"
HELP = "write an int8 (per channel) or int4 (per group) weight-only quantized copy of a model"


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="model folder or Hub id, high precision (default: the "
                                                 "small model embedded in the package)")
    p.add_argument("--bits", type=int, required=True, choices=(8, 4), help="8 or 4")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4 group size along the input features: 32, 64 or 128 (default 128)")
    p.add_argument("--out", required=True,
                   help="output folder: new, empty, or an earlier quantize output (replaced); any "
                        "other folder only with --overwrite, and never one that holds --model")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out that is not an earlier quantize output")
    p.add_argument("--dtype", default=None,
                   help="dtype of the tensors kept in high precision (default: as stored in --model)")
    p.add_argument("--device", default="cpu", help="where to compute the rounding (cpu or cuda)")
    p.add_argument("--dt-proj", choices=("quantized", "dense"), default=None,
                   help="quantize dt_proj like the other linear layers (default), or keep it in high "
                        "precision (what older versions did)")


def _stored_dtype(folder):
    """The dtype of the embeddings in the checkpoint: what 'as stored' means."""
    from falcon_mamba.checkpoint import _open, _weight_files

    files = _weight_files(folder)
    path = files.get("backbone.embeddings.weight")
    if path is None:
        return None
    with _open(path) as f:
        return f.get_slice("backbone.embeddings.weight").get_dtype()


def run(args) -> int:
    import sys
    from pathlib import Path

    import falcon_mamba as fm
    from falcon_mamba import default_model
    from falcon_mamba.dtypes import parse_dtype
    from falcon_mamba.errors import UserError
    from falcon_mamba.hub import resolve_model_dir
    from falcon_mamba.quant import quantizable_modules, quantize_model, save_quantized
    from falcon_mamba.quant.folder import CONFIG_NAME, check_bits

    group = check_bits(args.bits, args.group_size)
    folder = resolve_model_dir(args.model or default_model.path())
    if (folder / CONFIG_NAME).is_file():
        raise UserError(f"{folder} is already quantized ({CONFIG_NAME} is there); quantize the "
                        "original high-precision folder instead")
    from falcon_mamba.outputs import check_output_folder

    if Path(args.out).expanduser().resolve() == folder.resolve():
        raise UserError("--out is the --model folder; write the quantized copy to another folder")
    out = check_output_folder(args.out, [folder], overwrite=args.overwrite, command="quantize",
                              is_previous=lambda d: (d / CONFIG_NAME).is_file())
    if args.dtype is None:
        stored = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(_stored_dtype(folder) or "")
        dtype = parse_dtype(stored or "float32")
    else:
        dtype = parse_dtype(args.dtype)
    model = fm.load_model(folder, dtype, args.device)
    modules = None if args.dt_proj is None else quantizable_modules(
        model, include_dt_proj=args.dt_proj == "quantized")
    quantize_model(model, args.bits, group, modules=modules, progress=sys.stderr.isatty())
    dt_q = any(n.endswith(".dt_proj") for n in model.quantization["modules"])
    tok_dir = folder if (folder / "tokenizer.json").is_file() else None
    save_quantized(model.to("cpu"), out, tokenizer_dir=tok_dir)
    q = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    label = f"int{args.bits}" + (f", group {group}" if group else ", per channel")
    label += ", dt_proj " + ("quantized" if dt_q else "dense")
    print(f"wrote {out} ({label}; {q / 1e6:,.1f} MB of tensors, rest in {str(dtype).removeprefix('torch.')})")
    return 0
