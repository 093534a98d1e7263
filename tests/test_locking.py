"""indexes.locking: the writer lock and reader pins, checked with real processes (flock is per process).

Each child is a `python -c` script that imports only `indexes.locking`; it prints "ready" once it holds
what the test needs, then waits for a line on stdin (or is killed with SIGKILL).
"""

import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from indexes.locking import (
    READERS,
    WRITER_INFO,
    IndexLockedError,
    ReaderPin,
    WriterLock,
    live_pins,
    pinned_names,
    read_holder,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock locks: Linux and macOS only")

REPO = Path(__file__).resolve().parents[1]

HOLD_WRITER = """
from indexes.locking import WriterLock
lock = WriterLock(sys.argv[1], purpose="test holder").acquire()
print("ready", flush=True)
line = sys.stdin.readline()  # the parent says when to let go (or kills us)
time.sleep(float(line or 0))
lock.release()
"""

HOLD_PIN = """
from indexes.locking import ReaderPin
pin = ReaderPin(sys.argv[1], 7, ["seg-a", "seg-b"])
print("ready", pin.path, flush=True)
sys.stdin.readline()
"""

COUNT = """
from pathlib import Path
from indexes.locking import WriterLock
counter = Path(sys.argv[1]) / "counter"
sys.stdin.readline()  # start together
for _ in range(10):
    with WriterLock(sys.argv[1], wait=True, purpose="counting"):
        n = int(counter.read_text())
        time.sleep(0.01)  # without the lock the other process would read the same n here
        counter.write_text(str(n + 1))
"""


def start(script: str, *args) -> tuple[subprocess.Popen, str]:
    """Run `script` in a child; return it and the rest of its "ready" line once it has printed one."""
    code = "import sys, time\n" + textwrap.dedent(script)
    child = subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = child.stdout.readline()
    assert line.startswith("ready"), f"child did not start: {line!r}, exit {child.wait(5)}"
    return child, line[len("ready") :].strip()


def stop(child: subprocess.Popen, after_s: float = 0.0) -> None:
    child.stdin.write(f"{after_s}\n")
    child.stdin.flush()


def kill9(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    assert child.wait(5) == -signal.SIGKILL


# ----- the writer lock
def test_second_writer_in_another_process_fails_naming_the_holder(tmp_path):
    child, _ = start(HOLD_WRITER, tmp_path)
    try:
        t0 = time.monotonic()
        with pytest.raises(IndexLockedError) as e:
            WriterLock(tmp_path).acquire()
        assert time.monotonic() - t0 < 0.5  # wait=False fails at once
        message = str(e.value)
        assert f"pid {child.pid} on {socket.gethostname()}" in message
        assert "(test holder)" in message and "`wait=True`" in message
        assert e.value.holder["pid"] == child.pid and e.value.holder["purpose"] == "test holder"
        assert read_holder(tmp_path)["pid"] == child.pid
    finally:
        stop(child)
        assert child.wait(5) == 0
    assert read_holder(tmp_path) is None
    assert not (tmp_path / WRITER_INFO).exists()  # the holder removed its writer.json


def test_bounded_wait_raises_after_the_timeout(tmp_path):
    child, _ = start(HOLD_WRITER, tmp_path)
    try:
        t0 = time.monotonic()
        with pytest.raises(IndexLockedError, match=r"still after waiting 0.5 s") as e:
            WriterLock(tmp_path, wait=0.5).acquire()
        assert 0.45 <= time.monotonic() - t0 < 2.0
        assert e.value.holder["pid"] == child.pid
    finally:
        stop(child)
        child.wait(5)


def test_blocking_wait_gets_the_lock_once_the_holder_releases(tmp_path):
    child, _ = start(HOLD_WRITER, tmp_path)
    stop(child, after_s=0.3)  # the child lets go 0.3 s from now
    t0 = time.monotonic()
    with WriterLock(tmp_path, wait=True, purpose="second") as lock:
        assert time.monotonic() - t0 >= 0.2  # it did wait for the child
        assert lock.held
        assert read_holder(tmp_path) == {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": read_holder(tmp_path)["since"],
            "purpose": "second",
        }
    assert child.wait(5) == 0
    assert not lock.held and read_holder(tmp_path) is None


def test_two_processes_counting_under_the_lock_lose_nothing(tmp_path):
    (tmp_path / "counter").write_text("0")
    children = [
        subprocess.Popen(
            [sys.executable, "-c", "import sys, time\n" + textwrap.dedent(COUNT), str(tmp_path)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdin=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    time.sleep(0.4)  # let both import before they start
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    assert [child.wait(20) for child in children] == [0, 0]
    assert (tmp_path / "counter").read_text() == "20"


def test_killing_the_holder_frees_the_lock(tmp_path):
    child, _ = start(HOLD_WRITER, tmp_path)
    assert read_holder(tmp_path)["pid"] == child.pid
    kill9(child)
    assert (tmp_path / WRITER_INFO).exists()  # the dead writer's file is left behind ...
    assert read_holder(tmp_path) is None  # ... and not trusted, since nobody holds the lock
    t0 = time.monotonic()
    with WriterLock(tmp_path) as lock:  # wait=False: succeeds at once
        assert lock.held
        assert read_holder(tmp_path)["pid"] == os.getpid()
    assert time.monotonic() - t0 < 0.5


def test_a_second_writer_lock_in_the_same_process_fails(tmp_path):
    with WriterLock(tmp_path, purpose="first"):
        with pytest.raises(IndexLockedError, match=rf"pid {os.getpid()} .*\(first\)"):
            WriterLock(tmp_path).acquire()
    with WriterLock(tmp_path) as second:  # free again once the first is released
        assert second.held


def test_writer_lock_creates_the_folder_and_release_is_idempotent(tmp_path):
    index_dir = tmp_path / "new" / "index"
    assert read_holder(index_dir) is None  # no folder, no lock file: nobody writes
    lock = WriterLock(index_dir).acquire()
    assert (index_dir / "writer.lock").exists() and lock.held
    with pytest.raises(RuntimeError, match="already held"):
        lock.acquire()
    lock.release()
    lock.release()
    assert not lock.held and read_holder(index_dir) is None


def test_bad_wait_is_refused():
    with pytest.raises(ValueError, match="wait must be"):
        WriterLock("x", wait=-1)


def test_locked_error_survives_pickling(tmp_path):
    holder = {"pid": 12, "host": "h", "since": "2024-01-01T00:00:00+00:00", "purpose": "p"}
    error = pickle.loads(pickle.dumps(IndexLockedError(tmp_path, holder, 2.0)))
    assert error.holder == holder and str(error) == str(IndexLockedError(tmp_path, holder, 2.0))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_release_the_parents_claims(tmp_path):
    lock = WriterLock(tmp_path).acquire()
    pin = ReaderPin(tmp_path, 1, ["seg"])
    pid = os.fork()
    if pid == 0:  # the child: releasing must only close its copies
        try:
            lock.release()
            pin.release()
            del pin
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert read_holder(tmp_path)["pid"] == os.getpid()  # still locked, writer.json still there
    assert pin.path.exists() and pinned_names(tmp_path) == {"seg"}
    lock.release()
    pin.release()
    assert read_holder(tmp_path) is None and pinned_names(tmp_path) == set()


# ----- reader pins
def test_pinned_names_sees_a_pin_until_it_is_released(tmp_path):
    assert pinned_names(tmp_path) == set() and live_pins(tmp_path) == []  # no readers/ folder yet
    with ReaderPin(tmp_path, 3, ["seg-1", "seg-2"]) as pin:
        assert pin.version == 3 and pin.names == frozenset({"seg-1", "seg-2"})
        assert pinned_names(tmp_path) == {"seg-1", "seg-2"}
        [live] = live_pins(tmp_path)
        assert live["version"] == 3 and live["pid"] == os.getpid() and live["host"] == socket.gethostname()
        assert pin.path.parent == tmp_path / READERS and pin.path.exists()
    assert pinned_names(tmp_path) == set()
    assert not pin.path.exists()
    pin.release()  # idempotent


def test_a_pin_of_a_killed_reader_is_stale_and_removed(tmp_path):
    child, path = start(HOLD_PIN, tmp_path)
    assert pinned_names(tmp_path) == {"seg-a", "seg-b"}
    assert live_pins(tmp_path)[0]["pid"] == child.pid
    kill9(child)
    assert Path(path).exists()  # the file outlives its reader ...
    assert pinned_names(tmp_path) == set()  # ... but its lock did not, so it is stale
    assert not Path(path).exists()


def test_two_pins_in_one_process_are_both_live(tmp_path):
    first = ReaderPin(tmp_path, 1, ["a", "shared"])
    second = ReaderPin(tmp_path, 2, ["b", "shared"])
    assert pinned_names(tmp_path) == {"a", "b", "shared"}
    assert sorted(p["version"] for p in live_pins(tmp_path)) == [1, 2]
    first.release()
    assert pinned_names(tmp_path) == {"b", "shared"}
    del second  # dropping the object releases it
    assert pinned_names(tmp_path) == set() and list((tmp_path / READERS).iterdir()) == []


def test_unlocked_and_unreadable_pin_files(tmp_path):
    import fcntl

    readers = tmp_path / READERS
    readers.mkdir()
    (readers / "orphan.json").write_text('{"version": 1, "names": ["x"]')  # half-written, nobody holds it
    held = readers / "garbled.json"
    held.write_text("not json")
    with open(held) as f:  # a live holder whose file cannot be read: skipped, not deleted
        fcntl.flock(f, fcntl.LOCK_EX)
        assert pinned_names(tmp_path) == set()
        assert held.exists() and not (readers / "orphan.json").exists()
