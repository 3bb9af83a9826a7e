"""Evaluation outputs on disk: the run folder, per-sample record files, partial shards and run metadata.

Finished files are written whole through a temporary file and ``os.replace``: a file either exists complete or not at
all, which is what lets a re-run skip it. A folder holds the results of one configuration only (:func:`bind_run_dir`).
The run folder's layout is in docs/NOTES.md, "Module notes".
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path

from activation_transfer.io import atomic_write, canonical_json, write_json
from activation_transfer.task.scoring import score

RECORD_FIELDS = ("sample_id", "condition", "seed", "gold", "prediction", "hops", "metrics", "diagnostics")


def make_record(sample, condition: str, seed: int | None, prediction: str, diagnostics: dict) -> dict:
    """One sample's record (the fields of ``RECORD_FIELDS``, in order), scored against its gold answer.

    Args:
        sample: The QA sample (``sample_id``, ``answer``, ``hops``).
        condition: The condition name.
        seed: The run seed (None for a deterministic condition).
        prediction: The receiver's decoded answer.
        diagnostics: Norms and condition-specific extras (``donor_id``, ``relay``).
    """
    return {
        "sample_id": sample.sample_id,
        "condition": condition,
        "seed": seed,
        "gold": sample.answer,
        "prediction": prediction,
        "hops": sample.hops,
        "metrics": score(prediction, sample.answer),
        "diagnostics": diagnostics,
    }


def run_key(condition: str, seed: int | None) -> str:
    """``<condition>__seed<seed>`` or ``<condition>__deterministic``."""
    return f"{condition}__deterministic" if seed is None else f"{condition}__seed{seed}"


def records_path(run_dir: str | Path, condition: str, seed: int | None) -> Path:
    return Path(run_dir) / "records" / f"{run_key(condition, seed)}.jsonl"


def partial_dir(run_dir: str | Path, condition: str, seed: int | None) -> Path:
    return Path(run_dir) / "partial" / run_key(condition, seed)


def default_run_name(config_fingerprint: str) -> str:
    return f"eval-{config_fingerprint[:12]}"


def _record_line(record: dict) -> str:
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
    except ValueError as err:  # bare NaN would make the file invalid JSON and score as a wrong answer
        raise ValueError(
            f"record of sample {record.get('sample_id')!r}, condition {record.get('condition')!r} holds a NaN or "
            f"infinity ({err}); a non-finite value means the run is broken, it is not written"
        ) from err


def records_text(records: Iterable[dict]) -> str:
    """JSON lines of ``records``; NaN and infinities are refused (they are not JSON)."""
    return "".join(_record_line(r) for r in records)


def write_records(path: str | Path, records: Sequence[dict]) -> Path:
    """Write one finished condition x seed atomically, one JSON object per line, sorted by sample id."""
    ordered = sorted(records, key=lambda r: r["sample_id"])
    ids = [r["sample_id"] for r in ordered]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate sample ids in the records to write")
    return atomic_write(path, records_text(ordered))


def read_records(path: str | Path, tolerate_torn_tail: bool = False) -> list[dict]:
    """Read a records file; every line must be a JSON object with the fixed record fields.

    Args:
        path: The JSONL file.
        tolerate_torn_tail: Drop an unparsable *last* line (a partial shard cut by a crash mid-write).

    Raises:
        ValueError: Naming the file and line of a malformed record.
    """
    path = Path(path)
    # Split the bytes on "\n" only, as written: records are written with ensure_ascii=False, and str.splitlines would
    # also break a line inside a string holding U+2028, U+2029 or U+0085 (which json.dumps leaves as they are), and a
    # crash can tear the last line inside a multi-byte character, which must not make the whole file undecodable.
    lines = path.read_bytes().split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    out = []
    for i, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
            if not line.strip():
                continue
            rec = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            if tolerate_torn_tail and i == len(lines):
                break
            why = f"not UTF-8 ({err.reason})" if isinstance(err, UnicodeDecodeError) else f"not valid JSON ({err.msg})"
            raise ValueError(f"{path}:{i}: {why}") from err
        missing = [f for f in RECORD_FIELDS if f not in rec] if isinstance(rec, dict) else list(RECORD_FIELDS)
        if missing:
            raise ValueError(f"{path}:{i}: record lacks field(s) {', '.join(missing)}")
        out.append(rec)
    return out


def append_partial(run_dir: str | Path, condition: str, seed: int | None, rank: int, records: Sequence[dict]) -> None:
    """Append one batch of records of an unfinished run to this rank's shard (one write, flushed and synced)."""
    if not records:
        return
    folder = partial_dir(run_dir, condition, seed)
    folder.mkdir(parents=True, exist_ok=True)
    text = records_text(records)  # before touching the shard: a bad record leaves it as it was
    shard = folder / f"rank{rank}.jsonl"
    if shard.exists():
        cut_torn_tail(shard)
    with open(shard, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _line_start(f, end: int) -> int:
    """Offset where the line that ends at byte ``end`` (its newline, if any, is byte ``end - 1``) begins."""
    pos = end - 1
    while pos > 0:
        lo = max(0, pos - (1 << 16))
        f.seek(lo)
        i = f.read(pos - lo).rfind(b"\n")
        if i >= 0:
            return lo + i + 1
        pos = lo
    return 0


def _complete(line: bytes) -> bool:
    if not line.endswith(b"\n"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def cut_torn_tail(shard: str | Path) -> None:
    """Truncate a shard to its last complete line (ends in a newline and parses), reading from the end only.

    A crash, a full disk or a power loss mid-append leaves a torn last line; appending after it would glue the next
    record onto it and make the shard unreadable on every later resume.
    """
    with open(shard, "rb+") as f:
        end = keep = f.seek(0, os.SEEK_END)
        while keep:
            start = _line_start(f, keep)
            f.seek(start)
            if _complete(f.read(keep - start)):
                break
            keep = start
        if keep != end:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())


def read_partial(run_dir: str | Path, condition: str, seed: int | None) -> dict[str, dict]:
    """Records of an unfinished run from every rank's shard (any earlier world size), keyed by sample id."""
    folder = partial_dir(run_dir, condition, seed)
    out: dict[str, dict] = {}
    for shard in sorted(folder.glob("rank*.jsonl")) if folder.is_dir() else []:
        for rec in read_records(shard, tolerate_torn_tail=True):
            out.setdefault(rec["sample_id"], rec)
    return out


def remove_partial(run_dir: str | Path, condition: str, seed: int | None) -> None:
    """Delete a finished run's shards, and ``partial/`` itself once empty (shards of other runs stay)."""
    folder = partial_dir(run_dir, condition, seed)
    if folder.is_dir():
        for shard in folder.glob("*"):
            shard.unlink()
        folder.rmdir()
    try:
        folder.parent.rmdir()
    except OSError:
        pass


def finished_keys(run_dir: str | Path) -> set[str]:
    """Run keys (``<condition>__seed<seed>``) whose records file exists in the run folder."""
    return {p.stem for p in (Path(run_dir) / "records").glob("*.jsonl")}


FINGERPRINT_FILE = "fingerprint.json"


def _differences(old: dict, new: dict) -> str:
    def short(v) -> str:
        text = "absent" if v is None else canonical_json(v)
        return text if len(text) <= 60 else text[:57] + "..."

    keys = [k for k in sorted(set(old) | set(new)) if canonical_json(old.get(k)) != canonical_json(new.get(k))]
    return "; ".join(f"{k}: {short(old.get(k))} there, {short(new.get(k))} now" for k in keys)


def bind_run_dir(run_dir: str | Path, identity: dict, fingerprint: str, write: bool = True) -> None:
    """Bind the run folder to one configuration before anything is written into it (``fingerprint.json``).

    Args:
        run_dir: The run folder.
        identity: Everything that determines the answers; ``fingerprint`` is its hash.
        fingerprint: The run's fingerprint.
        write: Write ``fingerprint.json`` when it is absent (global rank zero only).

    Raises:
        ValueError: The folder is bound to another fingerprint, or holds results but no ``fingerprint.json``
            (an older version's folder): its records cannot be told apart from this configuration's.
    """
    run_dir = Path(run_dir)
    path = run_dir / FINGERPRINT_FILE
    fix = "choose another --model.run_name or --trainer.default_root_dir"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("fingerprint") != fingerprint:
            raise ValueError(
                f"run folder {run_dir} holds results of another configuration ({path}: "
                f"{str(old.get('fingerprint'))[:12]}, this run: {fingerprint[:12]}; differs in "
                f"{_differences(old.get('identity') or {}, identity)}); {fix}"
            )
        return
    if any((run_dir / name).exists() for name in ("records", "partial", "meta.json")):
        raise ValueError(
            f"run folder {run_dir} holds results but no {FINGERPRINT_FILE} (an older version's folder): "
            f"which configuration computed them is unknown; {fix}"
        )
    if write:
        write_json(path, {"fingerprint": fingerprint, "identity": identity})


def _merged(old, new):
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **{k: _merged(old.get(k), v) for k, v in new.items()}}
    return new


def append_invocation(run_dir: str | Path, summary: dict, invocation: dict) -> Path:
    """Update ``meta.json``: ``summary`` merged into the earlier one, ``invocation`` appended to ``invocations``.

    The merge keeps what an earlier invocation recorded and this one did not recompute (e.g. the shuffle
    diagnostics of a seed whose records already existed).
    """
    path = Path(run_dir) / "meta.json"
    old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    history = list(old.pop("invocations", []))
    return write_json(path, {**_merged(old, summary), "invocations": [*history, invocation]})


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "tokenizers", "pytorch-lightning", "jsonargparse", "torchmetrics", "wandb"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def device_info(device) -> dict:
    import torch

    info = {"device": str(device), "platform": platform.platform(), "torch_threads": torch.get_num_threads()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
