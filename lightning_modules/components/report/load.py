"""Per-sample records in, re-scored :class:`Record` objects out, grouped by condition and run.

Inputs are per-sample records (the fields of ``components.records.RECORD_FIELDS``, one JSON object per line) in
``.jsonl``/``.json`` files or folders of them, or the paper's locked result files (one JSON object with top-level
``condition``/``seed`` and a ``per_sample`` list). Records are re-scored from ``gold`` and ``prediction``; stored
``metrics`` are only checked.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_modules.components.scoring import score

DETERMINISTIC = "deterministic"


class ReportInputError(ValueError):
    """Bad report input: the message names the file and line (or record index) at fault."""


@dataclass
class Record:
    """One scored per-sample record.

    Attributes:
        sample_id: Sample id (pairs records across conditions).
        condition: Condition name.
        run: Seed as a string, or ``"deterministic"`` for a null seed.
        scores: ``{metric: bool}`` re-scored from gold and prediction.
        where: ``"file:line"`` (or ``"<records>[i]"``) for error messages.
    """

    sample_id: str
    condition: str
    run: str
    scores: dict[str, bool]
    where: str


def _run_key(seed: Any, where: str) -> str:
    if seed is None:
        return DETERMINISTIC
    if isinstance(seed, bool) or not isinstance(seed, int | str) or (isinstance(seed, str) and not seed.strip()):
        raise ReportInputError(f"{where}: 'seed' must be an integer or null, got {seed!r}")
    return str(seed)


def _parse_record(obj: Any, where: str, notes: dict[str, int]) -> Record:
    if not isinstance(obj, Mapping):
        raise ReportInputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("sample_id", "condition", "gold", "prediction"):
        if key not in obj or obj[key] is None:
            raise ReportInputError(f"{where}: record has no {key!r}")
    for key in ("sample_id", "condition", "gold", "prediction"):
        if not isinstance(obj[key], str):
            raise ReportInputError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
    if not obj["condition"]:
        raise ReportInputError(f"{where}: 'condition' is empty")
    try:
        scores = score(obj["prediction"], obj["gold"])
    except ValueError as err:
        raise ReportInputError(f"{where}: {err}") from err
    stored = obj.get("metrics")
    if isinstance(stored, Mapping) and any(k in stored and bool(stored[k]) != v for k, v in scores.items()):
        notes["metric_mismatch"] = notes.get("metric_mismatch", 0) + 1
    return Record(str(obj["sample_id"]), obj["condition"], _run_key(obj.get("seed"), where), scores, where)


def _load_file(path: Path, notes: dict[str, int]) -> list[Record]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ReportInputError(f"{path}: cannot read: {err}") from err
    # The paper's locked result files are a single JSON object with a per_sample list; anything else is JSONL.
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, Mapping) and "per_sample" in whole:
        per_sample = whole["per_sample"]
        if not isinstance(per_sample, list):
            raise ReportInputError(f"{path}: 'per_sample' must be a list")
        if "condition" not in whole:
            raise ReportInputError(f"{path}: paper result file has no top-level 'condition'")
        seed = None if whole.get("deterministic") else whole.get("seed")
        out = []
        for i, rec in enumerate(per_sample):
            where = f"{path}: per_sample[{i}]"
            if not isinstance(rec, Mapping):
                raise ReportInputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            out.append(_parse_record({**rec, "condition": whole["condition"], "seed": seed}, where, notes))
        return out
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ReportInputError(f"{where}: invalid JSON ({err.msg})") from err
        out.append(_parse_record(obj, where, notes))
    return out


def _expand(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".jsonl", ".json"))
        if not files:
            raise ReportInputError(f"{path}: folder holds no .jsonl or .json files")
        return files
    if path.is_file():
        return [path]
    raise ReportInputError(f"{path}: no such file or folder")


def load_records(inputs: Iterable[str | Path | Mapping], notes: dict[str, int] | None = None) -> list[Record]:
    """Load and re-score records from files, folders, or already-loaded record dicts.

    Args:
        inputs: Paths (JSONL files, paper JSON files, folders of either) and/or record dicts; not mixed with a
            single string (pass a list).
        notes: Optional counter dict; ``metric_mismatch`` counts records whose stored ``metrics`` disagree with
            re-scoring.

    Returns:
        Records in input order.

    Raises:
        ReportInputError: Missing fields, empty gold, bad JSON, duplicates, or no records at all.
    """
    if isinstance(inputs, str | Path | Mapping):
        raise TypeError("load_records expects a list of paths or record dicts")
    notes = {} if notes is None else notes
    records: list[Record] = []
    for i, item in enumerate(inputs):
        if isinstance(item, Mapping):
            records.append(_parse_record(item, f"<records>[{i}]", notes))
        else:
            for f in _expand(Path(item)):
                records.extend(_load_file(f, notes))
    if not records:
        raise ReportInputError("no per-sample records in the input" + (f": {list(map(str, inputs))}" if inputs else ""))
    return records


def group_records(records: Sequence[Record]) -> dict[str, dict[str, dict[str, dict[str, bool]]]]:
    """``{condition: {run: {sample_id: scores}}}`` in first-appearance order.

    Args:
        records: Loaded records.

    Raises:
        ReportInputError: A duplicate (condition, run, sample_id), or a condition that mixes deterministic and
            seeded runs.
    """
    groups: dict[str, dict[str, dict[str, dict[str, bool]]]] = {}
    first_seen: dict[tuple[str, str, str], str] = {}
    for r in records:
        key = (r.condition, r.run, r.sample_id)
        if key in first_seen:
            raise ReportInputError(
                f"{r.where}: duplicate sample {r.sample_id!r} for condition {r.condition!r} run {r.run} "
                f"(first seen at {first_seen[key]})"
            )
        first_seen[key] = r.where
        groups.setdefault(r.condition, {}).setdefault(r.run, {})[r.sample_id] = r.scores
    for cond, runs in groups.items():
        if DETERMINISTIC in runs and len(runs) > 1:
            raise ReportInputError(
                f"condition {cond!r} mixes a deterministic run (seed null) with seeded runs "
                f"{sorted(set(runs) - {DETERMINISTIC})}"
            )
    return groups
