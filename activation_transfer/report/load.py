"""Per-sample records in, re-scored :class:`Record` objects out, grouped by condition and run.

Records are re-scored from ``gold`` and ``prediction`` (stored ``metrics`` are only checked), and the runs of one
computation written once per seed count once (:func:`collapse_repeated_runs`), so no result rests on a stored score
or on pseudo-replicated seeds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from activation_transfer.task.scoring import score

DETERMINISTIC = "deterministic"
# A JSON object with any of these keys is meant as a record (and fails loudly when it is a bad one).
_RECORD_KEYS = {"sample_id", "condition", "gold", "prediction"}


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
        prediction: The decoded answer.
        translator: ``diagnostics.translator_sha256``: the checksum of the translator behind the answer, if named.
        seeded: ``diagnostics.seeded``: whether the run seed changes the answer (with a fixed translator), if said.
        bytes_sent: ``diagnostics.bytes_sent``: what crossed from the sender for this answer (split and KV
            protocols), if said.
    """

    sample_id: str
    condition: str
    run: str
    scores: dict[str, bool]
    where: str
    prediction: str = ""
    translator: str | None = None
    seeded: bool | None = None
    bytes_sent: float | None = None

    @property
    def same_for_every_seed(self) -> str | None:
        """The translator checksum when the record says its answer does not depend on the seed, else None."""
        return self.translator if self.seeded is False else None


def sort_runs(runs: Iterable[str]) -> list[str]:
    """Run keys in seed order (numerically), ``"deterministic"`` and other names last."""
    return sorted(runs, key=lambda r: (0, int(r), r) if r.lstrip("-").isdigit() else (1, 0, r))


def _run_key(seed: Any, where: str) -> str:
    if seed is None:
        return DETERMINISTIC
    if isinstance(seed, bool) or not isinstance(seed, int | str) or (isinstance(seed, str) and not seed.strip()):
        raise ReportInputError(f"{where}: 'seed' must be an integer or null, got {seed!r}")
    return str(seed)


def _translator_identity(obj: Mapping, where: str) -> tuple[str | None, bool | None]:
    diag = obj.get("diagnostics")
    if not isinstance(diag, Mapping):
        return None, None
    sha, seeded = diag.get("translator_sha256"), diag.get("seeded")
    if sha is not None and (not isinstance(sha, str) or not sha):
        raise ReportInputError(f"{where}: 'diagnostics.translator_sha256' must be a non-empty string, got {sha!r}")
    if seeded is not None and not isinstance(seeded, bool):
        raise ReportInputError(f"{where}: 'diagnostics.seeded' must be true, false or absent, got {seeded!r}")
    return sha, seeded


def _parse_record(obj: Any, where: str, notes: dict[str, Any]) -> Record:
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
    run = _run_key(obj.get("seed"), where)
    translator, seeded = _translator_identity(obj, where)
    sent = (obj.get("diagnostics") or {}).get("bytes_sent") if isinstance(obj.get("diagnostics"), Mapping) else None
    # inf (JSON's Infinity) passes `>= 0` and would end as a non-JSON summary.json: refused here, naming the record.
    if sent is not None and (isinstance(sent, bool) or not isinstance(sent, int | float) or not 0 <= sent < math.inf):
        raise ReportInputError(f"{where}: 'diagnostics.bytes_sent' must be a number >= 0 or absent, got {sent!r}")
    return Record(
        str(obj["sample_id"]), obj["condition"], run, scores, where, obj["prediction"], translator, seeded, sent
    )


def _load_file(path: Path, notes: dict[str, Any], in_folder: bool = False) -> list[Record]:
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
    # A JSON document that is no record (meta.json, a report's summary.json or comparisons.json).
    if whole is not None and not (isinstance(whole, Mapping) and _RECORD_KEYS & set(whole)):
        if in_folder:
            notes.setdefault("skipped_files", []).append(str(path))
            return []
        raise ReportInputError(
            f"{path}: not per-sample records (a JSON document with neither 'per_sample' nor 'sample_id'); "
            "pass record files (JSONL) or their folder"
        )
    out = []
    # "\n" only, as JSONL is written: str.splitlines would also break at a U+2028, U+2029 or U+0085 inside a string
    # (json.dumps with ensure_ascii=False leaves them as they are), making a valid record file unreadable.
    for lineno, line in enumerate(text.split("\n"), start=1):
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
    if (
        path / "records"
    ).is_dir():  # an evaluation run folder (activation_transfer.report.records): read its records only
        path = path / "records"
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".jsonl", ".json"))
        if not files:
            raise ReportInputError(f"{path}: folder holds no .jsonl or .json files")
        return files
    if path.is_file():
        return [path]
    raise ReportInputError(f"{path}: no such file or folder")


def load_records(inputs: Iterable[str | Path | Mapping], notes: dict[str, Any] | None = None) -> list[Record]:
    """Load and re-score records from files, folders, or already-loaded record dicts.

    Files hold per-sample records (the fields of ``report.records.RECORD_FIELDS``, one JSON object per line) as
    ``.jsonl``/``.json``, or are the paper's locked result files (one JSON object with top-level ``condition``/``seed``
    and a ``per_sample`` list). A folder holding a ``records/`` folder is an evaluation run folder: its ``records/``
    are read. JSON documents in a folder that are not records (``meta.json``, a report's tables) are skipped and
    counted. Records are re-scored from ``gold`` and ``prediction``; stored ``metrics`` are only checked.

    Args:
        inputs: Paths (JSONL files, paper JSON files, folders of either, evaluation run folders) and/or record dicts;
            not mixed with a single string (pass a list).
        notes: Optional dict filled with what the caller should report: ``metric_mismatch`` counts records whose
            stored ``metrics`` disagree with re-scoring, ``skipped_files`` lists JSON files of a folder that hold no
            records.

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
            path = Path(item)
            for f in _expand(path):
                records.extend(_load_file(f, notes, in_folder=f != path))
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


@dataclass
class RunCollapse:
    """What :func:`collapse_repeated_runs` found.

    Attributes:
        groups: ``{condition: {run: {sample_id: scores}}}`` with each computation once.
        collapsed: ``{condition: {kept run: [every run it stands for]}}``, for the conditions where runs were merged.
        unnamed_twins: ``{condition: [[runs]]}``: runs with identical answers whose records say neither which
            translator nor whether the seed matters (files written before records carried it); they stay separate
            runs, and the report warns.
    """

    groups: dict[str, dict[str, dict[str, dict[str, bool]]]]
    collapsed: dict[str, dict[str, list[str]]]
    unnamed_twins: dict[str, list[list[str]]]


def collapse_repeated_runs(
    groups: Mapping[str, Mapping[str, Mapping[str, Mapping[str, bool]]]], records: Sequence[Record]
) -> RunCollapse:
    """Count runs of a condition that are one computation once: one run, not one per seed.

    Why: with one translator checkpoint, a translator condition that ignores the seed (``additive``, ``replace``,
    ``scale_corrected``, ``best_alpha``) gives the same answers for every seed, and the evaluation writes them once
    per seed; its records say so (``diagnostics.translator_sha256`` and ``diagnostics.seeded: false``). Records
    without that identity (older files, the paper's locked outputs) keep one run per seed.

    Runs are one computation when every record of each says it does not depend on the seed and names the same
    translator (``Record.same_for_every_seed``), and the runs hold the same samples with the same predictions (a
    translator alone does not fix the answers: other settings could differ). The lowest seed stands for them. Runs
    from different translators, seeded conditions (random vectors, shuffling) and records without a translator
    identity stay separate runs.

    Args:
        groups: Output of :func:`group_records`.
        records: The records ``groups`` was built from.
    """
    identity: dict[tuple[str, str], set[str | None]] = {}
    named: dict[tuple[str, str], bool] = {}
    answers: dict[tuple[str, str], dict[str, str]] = {}
    for r in records:
        identity.setdefault((r.condition, r.run), set()).add(r.same_for_every_seed)
        described = r.translator is not None or r.seeded is not None
        named[r.condition, r.run] = named.get((r.condition, r.run), False) or described
        answers.setdefault((r.condition, r.run), {})[r.sample_id] = r.prediction
    result = RunCollapse({}, {}, {})
    for cond, runs in groups.items():
        kept: dict[tuple, list[str]] = {}
        unnamed: dict[tuple, list[str]] = {}
        for run in sort_runs(runs):
            ident = identity.get((cond, run), {None})
            shared = next(iter(ident)) if len(ident) == 1 else None
            same_answers = tuple(sorted(answers[cond, run].items()))
            kept.setdefault((shared, same_answers) if shared is not None else (run,), []).append(run)
            if not named[cond, run]:
                unnamed.setdefault(same_answers, []).append(run)
        result.groups[cond] = {same[0]: dict(runs[same[0]]) for same in kept.values()}
        merged = {same[0]: same for same in kept.values() if len(same) > 1}
        if merged:
            result.collapsed[cond] = merged
        twins = [same for same in unnamed.values() if len(same) > 1]
        if twins:
            result.unnamed_twins[cond] = twins
    return result
