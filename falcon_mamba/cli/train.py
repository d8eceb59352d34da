"""`falcon-mamba train`: run a recipe on a prepared data folder (one process, or under torchrun)."""

from __future__ import annotations

NAME = "train"
HELP = "train a model with a recipe preset on a prepared data folder (works under torchrun)"


def add_arguments(p) -> None:
    from falcon_mamba.train.recipes import RECIPES

    p.add_argument("--preset", default="tiny", help=f"recipe: {', '.join(RECIPES)} (default tiny)")
    p.add_argument("--data", required=True, help="data folder made by `falcon-mamba prepare-data`")
    p.add_argument("--out", required=True, help="run folder: metrics, checkpoint, exported model/")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides the preset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set lr=1e-3 --set model.num_hidden_layers=4")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="save a checkpoint after STEP and exit (time-limited sessions; --resume continues)")
    p.add_argument("--export-only", action="store_true",
                   help="only export the latest checkpoint in --out to --out/model (HF format; one process)")
    p.add_argument("--export-dtype", default=None,
                   help="weights dtype of the exported model (default: the dtype init_from stores, "
                        "float32 for a model trained from scratch)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl still written)")


def export_only(out: str, dtype) -> int:
    from pathlib import Path

    from falcon_mamba.train.build import base_dtype, export_model
    from falcon_mamba.train.checkpoint import load_checkpoint
    from falcon_mamba.train.config import TrainConfig

    payload = load_checkpoint(out)  # the whole model, from the shards of any number of processes
    cfg = TrainConfig.from_dict(payload["config"])
    folder = Path(payload["data"]["folder"])
    path = export_model(cfg, payload["model"], Path(out) / "model", folder, dtype or base_dtype(cfg))
    print(f"exported step {payload['step']} to {path}")
    return 0


RUN_FILES = ("checkpoint.pt", "train_config.json", "metrics.jsonl")


def check_run_folder(out: str, flag: str = "--out") -> None:
    """A run folder is new, empty, or an earlier run (it holds one of RUN_FILES): training writes
    model/ and its own files there, so any other folder could lose its contents."""
    from pathlib import Path

    from falcon_mamba.errors import UserError
    from falcon_mamba.outputs import check_output_folder

    check_output_folder(out, command="train", flag=flag,
                        is_previous=lambda d: any((d / f).is_file() for f in RUN_FILES))
    if Path(out).is_dir() and (Path(out) / "model").exists() and not (Path(out) / "model").is_dir():
        raise UserError(f"{flag} {out}: {out}/model is a file; training exports the model there")


def run(args) -> int:
    import json

    from falcon_mamba.dtypes import parse_dtype
    from falcon_mamba.errors import UserError
    from falcon_mamba.train import apply_overrides, get_recipe, train

    dtype = None if args.export_dtype is None else parse_dtype(args.export_dtype)
    if args.stop_at is not None and args.stop_at < 1:
        raise UserError(f"--stop-at must be a step number of at least 1, got {args.stop_at}")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if not args.print_config:
        check_run_folder(args.out)
    if args.export_only:
        return export_only(args.out, dtype)
    cfg = apply_overrides(get_recipe(args.preset), args.set)
    if args.steps is not None:
        cfg = cfg.replace(steps=args.steps)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    train(cfg, args.data, args.out, resume=args.resume, progress=not args.no_progress, export_dtype=dtype,
          stop_at=args.stop_at)
    return 0
