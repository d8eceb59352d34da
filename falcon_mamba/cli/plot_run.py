"""`falcon-mamba plot-run`: draw a run's loss and learning-rate curves to a PNG."""

from __future__ import annotations

NAME = "plot-run"
HELP = "draw loss and learning-rate curves of training runs (their metrics.jsonl) to a PNG"


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="+", metavar="DIR", help="run folder(s); LABEL=DIR names a curve")
    p.add_argument("--out", default=None, help="PNG path (default: DIR/run.png of the first run)")
    p.add_argument("--title", default="", help="plot title")


def run(args) -> int:
    from pathlib import Path

    from falcon_mamba.train.plot import plot_runs

    runs = []
    for spec in args.runs:
        label, eq, path = spec.partition("=")
        if not eq:
            label, path = Path(spec).name or spec, spec
        runs.append((label, path))
    out = args.out or str(Path(runs[0][1]) / "run.png")
    print(f"wrote {plot_runs(runs, out, args.title)}")
    return 0
