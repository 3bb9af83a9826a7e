"""An exclusive lock on an evaluation's run folder: two processes on one folder would both compute every pending
run (the records stay correct, the work is doubled). ``fcntl.flock`` on ``<folder>/.lock``, which holds the
holder's pid; the kernel releases it when the process ends, however it ends.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from activation_transfer.errors import UsageError

LOCK_NAME = ".lock"
# Locks this process holds, by path: evaluations in one process run one after another, so a lock still held here
# belongs to an earlier evaluation that crashed before releasing it (Lightning calls no teardown on an exception).
_HELD: dict[str, int] = {}


class RunFolderLock:
    """Hold ``<folder>/.lock`` from :meth:`acquire` to :meth:`release` (raises :class:`UsageError` if held)."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> RunFolderLock:
        stale = _HELD.pop(str(self.path.resolve()), None)
        if stale is not None:
            os.close(stale)  # closing the descriptor releases the flock
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(
                f"run folder {self.path.parent} is in use by process {holder} (lock {self.path}); wait for it to "
                "finish or pick another --model.run_name"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = _HELD[str(self.path.resolve())] = fd
        return self

    def release(self) -> None:
        if self.fd is not None and _HELD.get(str(self.path.resolve())) == self.fd:
            del _HELD[str(self.path.resolve())]
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
        self.fd = None
