"""Exclusive locks on folders, ``fcntl.flock`` on a lock file there; the kernel releases one when its process ends,
however it ends.

:class:`RunFolderLock` refuses a second process: two on one evaluation's run folder would both compute every pending
run (the records stay correct, the work is doubled); its ``<folder>/.lock`` holds the holder's pid.
:func:`folder_lock` makes a second process wait instead, for work the first one finishes for both (an activation
store's extraction, building an organism's cache entry).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from activation_transfer.errors import UsageError

log = logging.getLogger(__name__)

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


@contextlib.contextmanager
def folder_lock(folder: str | Path, name: str = LOCK_NAME) -> Iterator[None]:
    """Hold ``<folder>/<name>`` exclusively for the block, waiting while another process holds it.

    Args:
        folder: The folder the lock guards (created if missing).
        name: The lock file's name, for several locks in one folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "a") as f:  # "a": never truncate (no write, no mtime change)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # say why nothing happens: the holder may take minutes
            log.info("waiting for %s, held by another process", f.name)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
