"""Writing folders so that a crash never leaves a half-written one where a good one was.

The new folder is built in a temporary folder beside its destination (same filesystem, so the
final move is a rename), then swapped in; an existing folder is kept until the new one is in place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def temp_dir_beside(dest: Path) -> Path:
    """An empty temporary folder next to dest (dest's parent is created if needed)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + ".", suffix=".tmp"))
    # mkdtemp makes the folder private (0700); the finished folder should get the usual mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def replace_dir(new: Path, dest: Path) -> None:
    """Move the finished folder `new` to `dest`, replacing what was there."""
    if dest.exists():
        old = dest.with_name(dest.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(new, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, dest)
