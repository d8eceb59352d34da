"""The `falcon-mamba` command. Each subcommand is one module in this package that defines
NAME, HELP, add_arguments(parser) and run(args) -> int; they are found automatically, so adding a
command is adding a file.

User mistakes (UserError, a missing file) print one line on stderr and exit 2; internal errors keep
their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from falcon_mamba.errors import UserError


def _commands() -> dict:
    mods = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(mod, "NAME") and hasattr(mod, "run"):
            mods[mod.NAME] = mod
    return dict(sorted(mods.items()))


def build_parser() -> argparse.ArgumentParser:
    from falcon_mamba import __version__

    parser = argparse.ArgumentParser(prog="falcon-mamba",
                                     description="Falcon Mamba: attention-free language models.")
    parser.add_argument("--version", action="version", version=f"falcon-mamba {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in _commands().items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"falcon-mamba {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
