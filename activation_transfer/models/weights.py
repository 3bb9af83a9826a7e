"""The content digest of a local model folder: what identifies its weights when a name (a path) does not.

A folder keeps its name when its weights are replaced (a new export, a retrained organism), so caches keyed on the
name would silently serve the old model's results.
"""

from __future__ import annotations

import json
from pathlib import Path

from activation_transfer.errors import UsageError
from activation_transfer.io import cache_root, fingerprint, sha256_file, write_json


def _files(folder: Path) -> list[Path]:
    # Hidden entries are tool state (.cache/huggingface of hub downloads, .lock files), not model content.
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(folder).parts)
    )


def folder_sha256(folder: str | Path, cache_dir: str | None = None) -> str:
    """SHA-256 identifying the content of a model folder (relative file names and their bytes).

    The digest covers every regular, non-hidden file of the folder (weights, config, tokenizer: all of what the model
    computes depends on them). Hashing a 1 GB model takes seconds, so each file's SHA-256 is remembered in the
    project cache by (path, size, mtime) and recomputed only when those change.

    Args:
        folder: The model folder.
        cache_dir: Project cache root holding the per-file digests (default: ``cache_root()``).
    """
    folder = Path(folder).resolve()
    memo_path = cache_root(cache_dir) / "weights_sha256" / f"{fingerprint(str(folder))[:20]}.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):  # absent or unreadable: recompute everything
        memo = {}
    entries = {}
    for path in _files(folder):
        st, rel = path.stat(), path.relative_to(folder).as_posix()
        old = memo.get(rel)
        if isinstance(old, dict) and (old.get("size"), old.get("mtime_ns")) == (st.st_size, st.st_mtime_ns):
            digest = old["sha256"]
        else:
            digest = sha256_file(path)
        entries[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    if not entries:
        raise UsageError(f"model folder {folder} holds no files")
    if entries != memo:
        write_json(memo_path, entries)
    return fingerprint({rel: e["sha256"] for rel, e in entries.items()})
