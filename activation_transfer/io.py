"""File helpers shared by every layer: one atomic write, one SHA-256, canonical JSON, and the cache folder.

A file written here either exists complete or not at all (temporary file in the same folder, ``fsync``, then
``os.replace``), which is what lets interrupted runs resume by checking for a file. Files get mode 0644 (minus the
umask), like any file a user writes: ``mkstemp`` alone would leave them 0600.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_root(cache_dir: str | None = None) -> Path:
    """The project's cache folder: ``cache_dir`` if given, else ``$ACTIVATION_TRANSFER_CACHE``, else
    ``$XDG_CACHE_HOME/activation-transfer`` (``~/.cache/activation-transfer``).

    A leading ``~`` is the home folder, as in ``data.store_dir``: YAML and ``--data.cache_dir=~/c`` pass it unexpanded,
    and a literal ``./~`` folder would be another cache for every working folder."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("ACTIVATION_TRANSFER_CACHE"):
        return Path(os.environ["ACTIVATION_TRANSFER_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "activation-transfer"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; once the block has written it, it is synced and renamed into place.

    For writers that want a file name (``safetensors.save_file``, ``shutil.copyfile``). On an error the temporary
    file is removed and ``path`` is untouched. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically; parent folders are created.

    Readers see the old file or the new one, never half of one; a crash leaves at most a hidden temporary file.
    """
    with atomic_output(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def canonical_json(obj) -> str:
    """Sorted, compact JSON: equal objects give equal strings (the input of :func:`fingerprint`)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(obj) -> str:
    """SHA-256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def write_json(path: str | Path, obj) -> Path:
    """Atomically write ``obj`` as indented, sorted JSON (NaN and infinities are refused: they are not JSON)."""
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
