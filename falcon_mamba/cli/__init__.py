"""The `falcon-mamba` command. Each subcommand is one module in this package that defines
NAME, HELP, add_arguments(parser) and run(args) -> int; they are found automatically, so adding a
command is adding a file.

User mistakes (UserError, a missing file) print one line on stderr and exit 2; what the machine
refuses (a full disk, a closed or full stdout, no permission, out of memory) prints one line and
exits 1; Ctrl-C exits 130; a reader that goes away (`| head`) ends the command quietly. Internal
errors keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
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


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null, so that the interpreter's last flush of what stdout still buffers
    cannot fail again (and print "Exception ignored ..." with exit status 120)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        _silence_stdout()
        raise


def main(argv: list[str] | None = None) -> int:
    # A closed stdout/stderr (`>&-`) is None in Python; print() then discards silently, and so do we.
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    prog = f"falcon-mamba {args.command}"
    try:
        code = int(args._run(args) or 0)
        _flush_stdout()  # a full stdout (/dev/full) fails here, inside the handlers below
        return code
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): nothing more to say to anyone
        _silence_stdout()
        return 0
    except MemoryError:
        print(f"{prog}: error: out of memory", file=sys.stderr)
        return 1
    except OSError as e:  # the machine refused: disk full, stdout full or closed, permissions
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            _silence_stdout()
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"{prog}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
