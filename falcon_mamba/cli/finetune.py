"""`falcon-mamba finetune`: supervised fine-tuning (full or LoRA) of a model on prepared chat data."""

from __future__ import annotations

NAME = "finetune"
HELP = "fine-tune a model (full, or LoRA with --lora-rank) on data made by `prepare-data --chat`"


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="model folder or Hub id to start from (default: the "
                                                 "small model embedded in the package)")
    p.add_argument("--data", required=True, help="data folder (prepare-data --chat --tokenizer MODEL)")
    p.add_argument("--out", required=True, help="run folder; the merged model is exported to OUT/model "
                                                "in the dtype the base stores")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--adapter-only", action="store_true",
                   help="with --lora-rank: export OUT/adapter, a PEFT LoRA adapter folder "
                        "(PeftModel.from_pretrained, fm.load_model(base, adapter=...)), instead of the "
                        "merged model; adapts in_proj and x_proj (what PEFT can load onto transformers' "
                        "Mamba with the same result)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from falcon_mamba import default_model
    from falcon_mamba.cli.train import check_run_folder
    from falcon_mamba.errors import UserError
    from falcon_mamba.train import apply_overrides, get_recipe, train

    if args.lora_rank < 0:
        raise UserError(f"--lora-rank must be 0 (full fine-tuning) or more, got {args.lora_rank}")
    check_run_folder(args.out)
    model = args.model or str(default_model.path())
    cfg = get_recipe("sft-lora" if args.lora_rank else "sft")
    cfg = cfg.replace(init_from=model, **({"lora_rank": args.lora_rank} if args.lora_rank else {}))
    if args.adapter_only:
        from falcon_mamba.hf.adapter import PEFT_TARGETS

        cfg = cfg.replace(lora_targets=",".join(PEFT_TARGETS))  # before --set: a user's choice wins
    cfg = apply_overrides(cfg, args.set)
    if args.steps is not None:
        cfg = cfg.replace(steps=args.steps)
    result = train(cfg, args.data, args.out, resume=args.resume, progress=not args.no_progress,
                   adapter_only=args.adapter_only)
    if result.adapter_dir is not None:
        print(f"wrote the PEFT LoRA adapter {result.adapter_dir} (base {model})")
    return 0
