"""Who may touch an index folder: one writer at a time, and readers pinning the files of the version they opened.

An index folder holds `manifest.json` (the commit point) and immutable segment folders. Two kinds of claim
guard it, both `fcntl.flock` locks, so this module runs on Linux and macOS only (not Windows):

    <index_dir>/writer.lock               the writer's lock; writer.json beside it says who holds it
    <index_dir>/readers/<host>-<pid>-<uuid8>.json   one file per open reader, flock-held by that reader

Why flock: the lock belongs to the open file description, so two opens in one process conflict (two
`WriterLock`s on one folder in one process exclude each other, as two processes would), and the kernel drops
it when the last descriptor closes, so a process killed with SIGKILL never leaves a stale lock. A file can
outlive its lock (writer.json, a pin file), so a file is trusted only while its lock is held: `read_holder`
and `pinned_names` check the lock, not the file.

Fork: a child forked while a lock is held shares the open file description, so the lock stays held until
the parent *and* every such child have closed it (the descriptors are O_CLOEXEC, so `exec` drops them). Only
the process that took a lock releases it: `release()` in a forked child closes the child's copy and leaves
the parent's lock, writer.json and pin files alone (unlocking there would unlock the parent's lock too).

Locks on network filesystems are only as good as the filesystem's flock (NFSv4 emulates it with fcntl
locks; some FUSE filesystems ignore it). Neither class is safe to share between threads; give each its own.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from retrieval.io.atomic import atomic_path, write_json

WRITER_LOCK = "writer.lock"  # the file the writer flocks; empty, never deleted
WRITER_INFO = "writer.json"  # {"pid", "host", "since", "purpose"} of the current writer
READERS = "readers"  # the folder of reader pin files

_POLL_S = 0.02  # how often a bounded wait retries the lock
# `read_holder` and `pinned_names` probe a lock by taking it for a few microseconds; a writer asked not to
# wait retries this long before it reports the folder busy, so a concurrent probe is not mistaken for one
_PROBE_GRACE_S = 0.1
_STALE_TMP_S = 60.0  # an unlocked half-made pin file (its maker died before the rename) is deleted after this


class IndexLockedError(RuntimeError):
    """Another process holds the writer lock; the message names it and the fix."""

    def __init__(self, index_dir: str | Path, holder: dict | None = None, waited: float | None = None):
        self.index_dir = Path(index_dir)
        self.holder = holder  # {"pid", "host", "since" (ISO UTC), "purpose"}, or None if unknown
        self.waited = waited  # the seconds waited before giving up, or None when it did not wait
        if holder is None:
            who = "by another process (it has not said who yet)"
        else:
            who = f"by pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} ({holder.get('purpose')})"
        after = "" if waited is None else f", still after waiting {waited:g} s"
        super().__init__(
            f"{self.index_dir} is being written {who}{after}: wait for it to finish, or pass `wait=True` to wait"
        )

    def __reduce__(self):  # pickle (multiprocessing) by the arguments, not by the message
        return (type(self), (self.index_dir, self.holder, self.waited))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _host() -> str:
    return socket.gethostname()


def _try_flock(fd: int, how: int) -> bool:
    """Take `how` (LOCK_EX or LOCK_SH) on `fd` without blocking; False when someone else holds a conflicting lock."""
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _pid_gone(holder: dict) -> bool:
    """True when `holder` names a process on this host that no longer exists (a stale file, not a live lock)."""
    if holder.get("host") != _host() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists under another user
        return False
    return False


def _read_json(path: Path) -> dict | None:
    """The object in `path`, or None when it is missing, half-written or not an object."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _holder_file(index_dir: Path) -> dict | None:
    """writer.json, for a caller that has just seen the lock held (None when it names a dead local process)."""
    holder = _read_json(index_dir / WRITER_INFO)
    if holder is None or _pid_gone(holder):
        return None
    return holder


def read_holder(index_dir: str | Path) -> dict | None:
    """The contents of writer.json if a writer holds the lock on `index_dir` now, else None.

    The lock is probed with a non-blocking shared flock on a fresh descriptor: if it can be taken, nobody
    holds the writer lock and writer.json, if any, is left over from a writer that died.
    """
    index_dir = Path(index_dir)
    try:
        fd = os.open(index_dir / WRITER_LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if _try_flock(fd, fcntl.LOCK_SH):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
    finally:
        os.close(fd)
    return _holder_file(index_dir)


class WriterLock:
    """One writer at a time on INDEX_DIR: flock on <index_dir>/writer.lock, holder info in <index_dir>/writer.json.

    `wait`: False fails at once with IndexLockedError, True blocks until the lock is free, a number of
    seconds waits at most that long and then raises. Use it as a context manager:

        with WriterLock(index_dir, purpose="adding 120 images"):
            ...  # write segments, then the manifest
    """

    def __init__(self, index_dir: str | Path, *, wait: bool | float = False, purpose: str = "writing"):
        if not isinstance(wait, bool) and not (isinstance(wait, (int, float)) and wait >= 0):
            raise ValueError(f"wait must be True, False or a number of seconds >= 0, got {wait!r}")
        self.index_dir = Path(index_dir)
        self.wait = wait
        self.purpose = purpose
        self._fd: int | None = None
        self._pid: int | None = None  # the process that took the lock (a forked child must not release it)
        self._info: dict | None = None  # what we wrote to writer.json

    @property
    def held(self) -> bool:
        return self._fd is not None and self._pid == os.getpid()

    def acquire(self) -> "WriterLock":
        if self.held:
            raise RuntimeError(
                f"this WriterLock on {self.index_dir} is already held: release it before acquiring again"
            )
        # 1. open (creating the folder and the lock file if missing)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.index_dir / WRITER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            # 2. lock: block, or retry until the deadline
            if self.wait is True:
                fcntl.flock(fd, fcntl.LOCK_EX)  # EINTR is retried (PEP 475); Ctrl-C still raises
            else:
                limit = _PROBE_GRACE_S if self.wait is False else max(float(self.wait), _PROBE_GRACE_S)
                deadline = time.monotonic() + limit
                while not _try_flock(fd, fcntl.LOCK_EX):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        waited = None if self.wait is False else float(self.wait)
                        raise IndexLockedError(self.index_dir, _holder_file(self.index_dir), waited)
                    time.sleep(min(_POLL_S, left))
            # 3. say who holds it
            info = {"pid": os.getpid(), "host": _host(), "since": _now(), "purpose": self.purpose}
            write_json(self.index_dir / WRITER_INFO, info)
        except BaseException:
            os.close(fd)  # closing drops the lock if we took it
            raise
        self._fd, self._pid, self._info = fd, os.getpid(), info
        return self

    def release(self) -> None:
        """Give the lock up (idempotent). writer.json is removed first, and only if it is still ours."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._pid == os.getpid():
                info_path = self.index_dir / WRITER_INFO
                if _read_json(info_path) == self._info:
                    info_path.unlink(missing_ok=True)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)  # in a forked child this only drops the child's copy; the parent keeps the lock

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:  # interpreter shutdown: module globals may already be gone
            pass

    def __repr__(self) -> str:
        return f"WriterLock({str(self.index_dir)!r}, held={self.held})"


class ReaderPin:
    """A reader's claim on the files of the version it opened: <index_dir>/readers/<host>-<pid>-<uuid8>.json
    {"version": int, "names": [...], "pid", "host", "since"}, flock-held (LOCK_EX) by this object for its lifetime.

    The file is made under a temporary name, flocked, and only then renamed into place, so no one ever sees a
    pin file that is not yet locked (a writer collecting garbage would take it for stale and delete it).
    """

    def __init__(self, index_dir: str | Path, version: int, names: Iterable[str]):
        self.index_dir = Path(index_dir)
        self.version = int(version)
        self.names = frozenset(names)
        host = re.sub(r"[^A-Za-z0-9._-]", "_", _host())
        self.path = self.index_dir / READERS / f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        self._pid = os.getpid()
        self._fd: int | None = None
        body = {
            "version": self.version,
            "names": sorted(self.names),
            "pid": self._pid,
            "host": _host(),
            "since": _now(),
        }
        (self.index_dir / READERS).mkdir(exist_ok=True)  # the index folder itself must exist
        fd = None
        try:
            with atomic_path(self.path) as tmp:  # renamed to self.path on leaving, fd still on the same file
                fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC)
                fcntl.flock(fd, fcntl.LOCK_EX)  # nobody else knows the file yet: this never blocks
                os.write(fd, (json.dumps(body, sort_keys=True) + "\n").encode())
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None and self._pid == os.getpid()

    def release(self) -> None:
        """Delete the pin file, then unlock and close it (idempotent; a forked child only closes its copy)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._pid == os.getpid():
                self.path.unlink(missing_ok=True)  # before unlocking, so it is never seen unlocked
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "ReaderPin":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:  # interpreter shutdown: module globals may already be gone
            pass

    def __repr__(self) -> str:
        return f"ReaderPin({str(self.index_dir)!r}, version={self.version}, {len(self.names)} names, held={self.held})"


def live_pins(index_dir: str | Path) -> list[dict]:
    """The contents of the live pin files in <index_dir>/readers, oldest first.

    A pin file whose flock can be taken belongs to a process that died (even by SIGKILL): it is deleted and
    left out. Files that vanish or do not parse while being read are skipped.
    """
    folder = Path(index_dir) / READERS
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    pins = []
    for entry in entries:
        if entry.name.endswith(".tmp"):
            _remove_stale_tmp(Path(entry.path))
            continue
        if not entry.name.endswith(".json"):
            continue
        pin = _read_live_pin(Path(entry.path))
        if pin is not None:
            pins.append(pin)
    return sorted(pins, key=lambda p: (str(p.get("since")), str(p.get("pid"))))


def pinned_names(index_dir: str | Path) -> set[str]:
    """The union of the names over the live pins of `index_dir` (stale pins are deleted; see `live_pins`)."""
    return {name for pin in live_pins(index_dir) for name in pin["names"]}


def _read_live_pin(path: Path) -> dict | None:
    """The pin in `path` if its reader still holds it; a stale pin is deleted and gives None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:  # released while we listed the folder
        return None
    try:
        if _try_flock(fd, fcntl.LOCK_SH):  # nobody holds it: its reader is gone
            path.unlink(missing_ok=True)  # uuid names are never reused, so this is the file we probed
            return None
        with os.fdopen(os.dup(fd), "r") as f:
            try:
                pin = json.loads(f.read())
            except ValueError:
                return None
    finally:
        os.close(fd)
    if not isinstance(pin, dict) or not isinstance(pin.get("names"), list):
        return None
    return pin


def _remove_stale_tmp(path: Path) -> None:
    """Delete a pin left half-made (its maker died between creating and renaming it) once it is old and unlocked."""
    try:
        if time.time() - path.stat().st_mtime < _STALE_TMP_S:
            return
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if _try_flock(fd, fcntl.LOCK_SH):
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)
