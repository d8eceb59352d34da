"""Checks on the places a command writes to, made before any work starts.

Two rules, for every command that writes:
- an output file (``--state-out``, ``/save``) must be writable now: not a folder, not under a file,
  in a folder this process may write; otherwise the error comes before the prompt is read;
- an output folder (``--out``) never replaces or deletes what the command did not create: a
  non-empty folder that is not an earlier output of the same command is refused unless
  ``--overwrite`` is given, and a folder that holds one of the inputs (or the current folder) is
  refused always.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from falcon_mamba.errors import UserError


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """UserError unless a file can be written (created or replaced by a rename) at path."""
    path = Path(path).expanduser()
    if str(path) in ("", "."):
        raise UserError(f"{what}: give a file name")
    if path.is_dir():
        raise UserError(f"{what} {path}: is a folder; give a file name")
    parent = path.parent
    base = _nearest_existing(parent)
    if not base.is_dir():
        raise UserError(f"{what} {path}: {base} is a file, so nothing can be written under it")
    if base == parent:
        try:  # the only reliable test: permissions, read-only filesystems, ACLs, quotas of inodes
            fd, probe = tempfile.mkstemp(dir=parent, prefix=".falcon-mamba-write-test.")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise UserError(f"{what} {path}: cannot write in {parent} ({e.strerror})") from None
    elif not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: cannot create {parent} (no write permission in {base})")
    return path


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_folder(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *,
                        overwrite: bool = False, is_previous: Callable[[Path], bool] | None = None,
                        flag: str = "--out", command: str = "this command") -> Path:
    """Validate an output folder before any work; returns it. ``is_previous(folder)`` says whether
    an existing folder is an earlier output of the same command (replaced without --overwrite)."""
    out = Path(out).expanduser()
    if str(out) in ("", "."):
        real = Path.cwd().resolve()
    else:
        real = out.resolve()
    if _inside(Path.cwd().resolve(), real):
        raise UserError(f"{flag} {out}: is the current folder (or holds it); give a new folder name")
    if real == Path(real.anchor) or real == Path.home().resolve():
        raise UserError(f"{flag} {out}: refusing to write over {real}; give a new folder name")
    for inp in inputs:
        if inp is None:
            continue
        ip = Path(inp).expanduser()
        if not ip.exists():
            continue
        if _inside(ip.resolve(), real):
            raise UserError(f"{flag} {out} holds the input {inp}; writing there would delete it. "
                            "Choose another output folder")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UserError(f"{flag} {out}: is a file; give a folder name")
        try:
            empty = not any(out.iterdir())
        except OSError as e:
            raise UserError(f"{flag} {out}: cannot be read ({e.strerror})") from None
        if not empty and not overwrite and not (is_previous is not None and is_previous(out)):
            raise UserError(f"{flag} {out}: exists, is not empty and is not an earlier output of "
                            f"{command}; pass --overwrite to replace it, or choose another folder")
    base = _nearest_existing(out.parent if out.parent != out else out)
    if not base.is_dir():
        raise UserError(f"{flag} {out}: {base} is a file, so no folder can be made under it")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out}: no write permission in {base}")
    return out
