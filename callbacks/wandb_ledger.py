"""What a run folder's W&B run already holds, so a rerun of the evaluation logs only what is new.

An evaluation keeps one W&B run per run folder (:class:`callbacks.wandb_artifacts.RunFolderWandbLogger`), so a
rerun resumes it; without a record of what that run got, a rerun whose results were all reused logged everything
again: its metrics, tables and plots as new history steps and a new version of the ``eval_results`` artifact (only
``meta.json``'s list of invocations differing). ``<run folder>/wandb_logged.json`` keeps, per W&B run
(``<project>/<run id>``), a digest of every item logged (a metric's value, a table's rows, an image's bytes, an
artifact's content) and the next W&B step. It is rewritten atomically after each item is logged, so an evaluation
killed while logging resumes with what it had not logged yet.

The step matters offline: W&B cannot ask the server where a resumed run stopped (its run record says resumed False,
starting_step 0) and counts from 0 again; the logger then logs at the recorded step, so the resumed session's history
continues after the earlier one's instead of repeating its steps.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Callable, Mapping
from pathlib import Path

from activation_transfer.io import fingerprint, sha256_file, write_json

LEDGER_FILE = "wandb_logged.json"
# Keys Lightning adds to every logged row: they say when, not what, so a row of nothing else is not logged.
BOOKKEEPING = frozenset({"epoch", "trainer/global_step"})


def value_digest(value) -> str | None:
    """A digest of a logged value: a number's value, a table's columns and rows, an image's (or images') bytes.

    None for anything else (it is logged every time, as before).
    """
    if isinstance(value, numbers.Number):
        return repr(float(value))
    if isinstance(value, list | tuple):
        parts = [value_digest(v) for v in value]
        return None if not parts or None in parts else fingerprint(parts)
    if hasattr(value, "columns") and hasattr(value, "data"):  # wandb.Table
        return fingerprint([list(value.columns), value.data])
    return getattr(value, "_sha256", None)  # a wandb media object (Image): the digest of its file


def folder_digest(folder: str | Path, folders: tuple[str, ...], files: tuple[str, ...] = ()) -> str:
    """A digest of the files under ``folder/<folders>`` and of ``folder/<files>`` (their relative paths and bytes).

    ``meta.json`` counts without its ``invocations``: every rerun appends one, which is no new result.
    """
    root, digests = Path(folder), {}
    for name in folders:
        for path in sorted(p for p in (root / name).rglob("*") if p.is_file()):
            digests[path.relative_to(root).as_posix()] = sha256_file(path)
    for name in files:
        path = root / name
        if name == "meta.json" and path.is_file():
            digests[name] = fingerprint({k: v for k, v in json.loads(path.read_text()).items() if k != "invocations"})
        elif path.is_file():
            digests[name] = sha256_file(path)
    return fingerprint(digests)


class RunLedger:
    """What one W&B run holds (``items``: key -> digest) and its next step, read from and kept in ``folder``.

    A ledger without a folder (a logger that is no run folder's) holds nothing and records nothing.

    Args:
        folder: The run folder (None: nothing is recorded).
        run_key: ``<project>/<run id>``: a new run (its id file deleted) holds nothing of an earlier one.
    """

    def __init__(self, folder: str | Path | None = None, run_key: str | None = None) -> None:
        self.path = Path(folder) / LEDGER_FILE if folder is not None else None
        self.run_key = run_key
        entry = (_read(self.path).get(run_key) or {}) if self.path is not None else {}
        self.items: dict[str, str] = dict(entry.get("items") or {})
        self.step = int(entry.get("step") or 0)
        self.logged: list[str] = []  # this session's
        self.held: list[str] = []

    def new(self, digests: Mapping[str, str | None]) -> dict[str, str | None]:
        """The entries of ``digests`` the run does not hold; the others are counted as held (this session)."""
        out = {}
        for key, digest in digests.items():
            if digest is not None and self.items.get(key) == digest:
                self.held.append(key)
            else:
                out[key] = digest
        return out

    def record(self, digests: Mapping[str, str | None], step: int | None = None) -> None:
        """Note ``digests`` as logged (and ``step`` as the run's next step), atomically in the folder."""
        self.logged += list(digests)
        self.items.update({k: v for k, v in digests.items() if v is not None})
        self.step = max(self.step, step or 0)
        if self.path is None:
            return
        entries = _read(self.path)
        entries[self.run_key] = {"items": dict(sorted(self.items.items())), "step": self.step}
        write_json(self.path, entries)  # atomic: a torn file would make a rerun log everything again

    def once(self, key: str, digest: str | None, log: Callable[[], object]) -> bool:
        """Call ``log`` unless the run holds ``key`` with ``digest``; returns whether it logged."""
        if not self.new({key: digest}):
            return False
        log()
        self.record({key: digest})
        return True

    def summary(self) -> str | None:
        """One line for a rerun that found items already logged (None when nothing was held)."""
        if not self.held:
            return None
        run_id = str(self.run_key).rpartition("/")[2]
        if not self.logged:
            return f"W&B run {run_id} already holds these results; nothing logged again"
        return (
            f"W&B run {run_id} already held {len(set(self.held))} of the logged items; logged only the "
            f"{len(set(self.logged))} new or changed ones"
        )


def ledger_of(logger) -> RunLedger:
    """The logger's ledger (a :class:`RunFolderWandbLogger`'s, once its run started), else one that holds nothing."""
    return getattr(logger, "ledger", None) or RunLedger()


def _read(path: Path) -> dict:
    """The ledger file's runs; a missing or unreadable file holds nothing (the items are then logged again)."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return entries if isinstance(entries, dict) else {}
