"""Writing files and folders so that a crash never leaves a half-written one where a good one was.

The new folder (or file) is built under a temporary name beside its destination (same filesystem,
so the final move is a rename), then swapped in; an existing one is kept until the new one is in
place. Temporary names carry the writer's process id, ``NAME.PID.RANDOM.tmp``: one left by a
process that no longer runs (killed with kill -9 mid-write) is removed at the next write of the
same destination. Finished files get the usual mode (0666 minus the umask), not the private 0600
that some writers (safetensors, mkdtemp) use, so a model written by one account can be served by
another.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path


def umask() -> int:
    """The process umask, read without os.umask's set-and-restore (which is not thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process: leave its files alone
    return True


def remove_stale_temps(dest: Path) -> list[Path]:
    """Remove NAME.PID.*.tmp beside dest whose writing process is gone; returns what was removed."""
    removed = []
    pattern = re.compile(re.escape(dest.name) + r"\.(\d+)\..+\.tmp")
    try:
        siblings = list(dest.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = pattern.fullmatch(p.name)
        if m is None or _alive(int(m.group(1))):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def temp_name_beside(dest: Path, what: str = "") -> Path:
    """A fresh NAME.PID.RANDOM.tmp path next to dest (nothing is created)."""
    return dest.with_name(f"{dest.name}.{os.getpid()}.{what}{uuid.uuid4().hex[:8]}.tmp")


def temp_dir_beside(dest: Path) -> Path:
    """An empty temporary folder next to dest (dest's parent is created if needed); stale ones of
    earlier crashed writers are removed first."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f"{dest.name}.{os.getpid()}.", suffix=".tmp"))
    os.chmod(tmp, dir_mode())  # mkdtemp makes the folder private (0700)
    return tmp


def apply_modes(folder: Path) -> None:
    """Give every file and folder under folder the umask's usual mode."""
    fmode, dmode = file_mode(), dir_mode()
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), dmode)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, fmode)


def replace_dir(new: Path, dest: Path) -> None:
    """Move the finished folder `new` to `dest`, replacing what was there."""
    apply_modes(new)
    if dest.exists():
        old = temp_name_beside(dest, "old.")
        os.replace(dest, old)
        os.replace(new, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, dest)
