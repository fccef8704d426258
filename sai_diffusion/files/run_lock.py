"""One training process per run folder: ``RUN/.lock`` names the process that holds it.

    with hold_run_folder(run_dir, resume=False) as lock:   # UserError if another holds it
        ...                                                # train; the lock is kept fresh

The lock file is created with O_CREAT | O_EXCL, which is atomic on local disks and on NFS v3+,
so two processes starting at once cannot both get it. It holds JSON: the holder's host, pid,
start time and command. While the run lives a daemon thread touches it every
``HEARTBEAT_S`` seconds; a lock is stale when its holder is gone: on this host, its pid is not
running any more (a SIGKILL, a crash, a reboot); on another host (a folder several machines
mount), it has not been touched for ``STALE_AFTER_S`` seconds. A stale lock is taken over, with
a note; a live one is refused, naming its holder and how to stop it. Under ``accelerate
launch`` only the main process (rank 0) takes the lock: the ranks of one run share it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats


@dataclass(frozen=True)
class Holder:
    """Who holds a run folder, as its lock file says."""

    host: str
    pid: int
    started: float
    command: str

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"process {self.pid} on {self.host}, since {since} ({self.command})"


def lock_path(run_dir: Path) -> Path:
    return Path(run_dir) / LOCK_NAME


def read_holder(run_dir: Path) -> Holder | None:
    """The lock's holder, or None when there is no lock (or it is unreadable: half-written by a
    process killed while creating it, which counts as stale)."""
    try:
        data = json.loads(lock_path(run_dir).read_text(encoding="utf-8"))
        return Holder(str(data["host"]), int(data["pid"]), float(data["started"]),
                      str(data.get("command", "")))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_stale(run_dir: Path, holder: Holder | None) -> bool:
    """The lock's holder is gone (module docstring)."""
    if holder is None:
        return True
    if holder.host == socket.gethostname():
        return not _alive(holder.pid)
    try:
        age = time.time() - lock_path(run_dir).stat().st_mtime
    except OSError:
        return True
    return age > STALE_AFTER_S


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def only_lock_in(run_dir: Path) -> bool:
    """The folder holds nothing but a stale lock (a run killed before writing anything)."""
    run_dir = Path(run_dir)
    names = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    return names == {LOCK_NAME} and is_stale(run_dir, read_holder(run_dir))


class RunLock:
    """A held lock: ``release()`` removes it (only if it is still ours)."""

    def __init__(self, run_dir: Path, holder: Holder) -> None:
        self.path, self.holder = lock_path(run_dir), holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):  # a full disk must not kill the run for this
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("pid") == self.holder.pid and data.get("host") == self.holder.host:
                self.path.unlink()


def acquire(run_dir: Path) -> RunLock:
    """Take ``run_dir``'s lock (creating the folder), taking over a stale one.

    Raises:
        UserError: another live process holds it, or the folder cannot be written.
    """
    run_dir = Path(run_dir)
    me = Holder(socket.gethostname(), os.getpid(), time.time(), _command())
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (run_dir, *run_dir.parents) if p.is_file()), run_dir)
        raise UserError(
            f"--output-dir {run_dir}: {blocker} is a file, not a folder; choose another "
            "--output-dir"
        ) from None
    for _ in range(3):  # a stale lock removed by us or another process: try again
        try:
            fd = os.open(lock_path(run_dir), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_holder(run_dir)
            if holder is not None and not is_stale(run_dir, holder):
                raise UserError(
                    f"{run_dir} is being trained by {holder.describe()}; one training process "
                    f"writes a run folder. Wait for it, stop it (kill {holder.pid} on "
                    f"{holder.host}), or give another --output-dir"
                ) from None
            print(f"note: taking over {lock_path(run_dir)} from "
                  f"{holder.describe() if holder else 'an unreadable lock'}, which is gone",
                  file=sys.stderr)  # fmt: skip
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path(run_dir))
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me.__dict__, f)
            f.flush()
            os.fsync(f.fileno())
        return RunLock(run_dir, me)
    raise UserError(f"could not take the lock {lock_path(run_dir)}; try again")


def _command() -> str:
    text = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python"
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def hold_run_folder(run_dir: Path, *, main_process: bool = True) -> Iterator[RunLock | None]:
    """Hold ``run_dir``'s lock for the block (the main process only; others yield None)."""
    if not main_process:
        yield None
        return
    lock = acquire(run_dir)
    try:
        yield lock
    finally:
        lock.release()
