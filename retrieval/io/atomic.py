"""Atomic writes: write a temporary file in the destination folder, fsync, then rename over the target.

A crash (even SIGKILL) at any moment leaves either the old file or the new one, never a torn file.
The result has the permissions a plain write would give it: a new file or folder those of the process's umask
(tempfile makes its temporaries private, 0600 and 0700, which would lock other accounts out of a shared index or
token folder), a replaced file the mode it had.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process_umask() -> int:
    """The process's umask: from /proc where Linux shows it, else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(target: Path, new: int) -> int:
    """The mode a plain write to `target` would leave: its current one if it exists, else `new` less the umask."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        return new & ~process_umask()


@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success fsync it and rename it to `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(target, 0o666))  # after the fsync: a read-only mode would refuse the "rb+"
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(target: str | os.PathLike, write: Callable[[Path], Any], suffix: str = "") -> None:
    """Call write(tmp_path), then move the result onto `target` atomically."""
    with atomic_path(target, suffix) as tmp:
        write(tmp)


def write_json(target: str | os.PathLike, obj: Any) -> None:
    write_atomic(target, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def write_npy(target: str | os.PathLike, array: np.ndarray) -> None:
    def _save(p: Path) -> None:
        with open(p, "wb") as f:
            np.save(f, array, allow_pickle=False)

    write_atomic(target, _save)


def write_parquet(target: str | os.PathLike, frame) -> None:
    write_atomic(target, lambda p: frame.to_parquet(p, index=False), suffix=".parquet")


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success rename it to `target` (which must not exist)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~process_umask())
        fsync_dir(tmp)
        os.rename(tmp, target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(folder: Path) -> int:
    """Delete leftovers of interrupted atomic writes (hidden '*.tmp' entries); returns how many."""
    n = 0
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            n += 1
    return n


def replace_dir(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the finished folder STAGING onto TARGET, replacing any folder there.

    The old TARGET is first renamed to TARGET.old, then STAGING renamed to TARGET, then TARGET.old deleted: at no
    moment is TARGET half-written (a crash in between leaves TARGET.old, the previous version, beside it).
    """
    staging, target = Path(staging), Path(target)
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    fsync_dir(target.parent)
    if old.exists():
        shutil.rmtree(old)
    return target
