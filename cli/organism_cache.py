"""An organism's cache entry (``organisms/<role>-<hash>/``): when it is complete, and how it is replaced whole.

The entry's path holds a complete organism or none, and a replacement leaves it the old one or the new one:

- a builder holds the entry's lock (``.<name>.lock`` beside it, :func:`activation_transfer.run_lock.folder_lock`),
  so a second process waits and then finds the organism the first one built, and whatever a builder finds of
  another's temporary folders was left by a killed one;
- the new organism is built in a hidden sibling folder (``.<name>.tmp-<pid>-<id>``, same file system), its files
  synced and ``organism.json`` written last (:func:`commit`);
- it then takes the entry's place by two renames: the entry to ``.<name>.old-<pid>``, the new folder to ``<name>``,
  and only then is the old one removed. A process killed between the renames leaves no ``<name>`` but a complete
  ``.old-*`` folder, which the next builder renames back (:func:`recover`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from activation_transfer.errors import one_line
from activation_transfer.io import atomic_write
from activation_transfer.run_lock import folder_lock

log = logging.getLogger(__name__)

MARKER = "organism.json"  # written last into the temporary folder, so an entry holding it was built completely
# What every entry holds besides the marker (export_model's save_pretrained output). Entries of versions that removed
# an old entry file by file (shutil.rmtree) could be left with the marker and only some of these.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def read_marker(folder: Path) -> dict:
    """The ``organism.json`` of the entry ``folder`` (its config, hash, source and training record)."""
    return json.loads((Path(folder) / MARKER).read_text())


def entry_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete organism (``"not in the cache"`` when it does not exist), or ``None``."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not in the cache"
    try:
        read_marker(folder)
    except FileNotFoundError:
        return f"no {MARKER}"
    except (OSError, ValueError) as err:
        return f"unreadable {MARKER} ({one_line(err)})"
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    return f"{MARKER} but no {', '.join(missing)}" if missing else None


def why_build(folder: Path, retrain: bool) -> str | None:
    """Why the entry ``folder`` must be built (missing, incomplete, or installed from the package while retraining
    is asked for), or ``None`` to use it as it is."""
    problem = entry_problem(folder)
    if problem is None and retrain and read_marker(folder).get("source", "").startswith("package:"):
        return "retraining the one installed from the package"
    return problem


def leftovers(folder: Path, kinds: tuple[str, ...] = ("old", "tmp")) -> list[Path]:
    """The temporary folders of the entry ``folder`` (a killed builder's, or a live one's while it holds the lock)."""
    return sorted(p for kind in kinds for p in folder.parent.glob(f".{glob.escape(folder.name)}.{kind}-*"))


@contextlib.contextmanager
def entry_lock(folder: Path) -> Iterator[None]:
    """Hold the lock of the entry ``folder`` for the block, after repairing what a killed builder left."""
    with folder_lock(folder.parent, f".{folder.name}.lock"):
        recover(folder)
        yield


def recover(folder: Path) -> None:
    """Undo a killed build or replacement of the entry ``folder``; call it under :func:`entry_lock`.

    A missing entry whose old version was moved aside by a killed replacement gets it back; every other temporary
    folder of the entry (a half-built organism, an old version half removed) is removed.
    """
    if not folder.exists():
        for old in reversed(leftovers(folder, ("old",))):
            if entry_problem(old) is None:
                log.warning("restoring the organism %s: a process replacing it was killed", folder)
                os.rename(old, folder)
                break
    for left in leftovers(folder):
        log.info("removing %s, left by a killed build of %s", left.name, folder.name)
        shutil.rmtree(left, ignore_errors=True)


@contextlib.contextmanager
def staging(folder: Path) -> Iterator[Path]:
    """A fresh temporary sibling of ``folder`` to build the organism in; removed unless :func:`commit` moved it."""
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def commit(tmp: Path, folder: Path, info: dict) -> None:
    """Mark the organism built in ``tmp`` complete and make it the entry ``folder``, replacing the one there.

    Args:
        tmp: The folder from :func:`staging`, holding the exported model and tokenizer.
        folder: The entry's path.
        info: The contents of its ``organism.json``.
    """
    # Synced before the marker vouches for them: a machine crash after the rename cannot leave the marker with
    # empty weights. The marker itself is written by the atomic writer (synced too).
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    atomic_write(tmp / MARKER, json.dumps(info, indent=2, sort_keys=True) + "\n")
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():
        os.rename(folder, old)  # renamed whole, never emptied in place: the old organism stays complete until removed
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
