"""Which evaluation protocol produced the report's inputs, read from each run folder (never guessed from conditions).

An evaluation run folder records it: ``meta.json`` holds ``protocol`` for a non-paper protocol (the paper protocol adds
nothing, so older folders keep their fingerprint), and ``config.yaml`` holds ``model.protocol`` for every run. Records
given as loose files or in memory carry no protocol: ``None``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from activation_transfer.report.load import ReportInputError

PAPER = "paper"


def run_folder(path: Path) -> Path | None:
    """The evaluation run folder an input belongs to (the folder itself, its ``records/``, or a file in it)."""
    # fingerprint.json too: it is written before any record, while meta.json and config.yaml come only once the first
    # invocation finishes, so a folder whose first invocation was killed after writing some records is a run folder.
    markers = ("fingerprint.json", "meta.json", "config.yaml")
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / "records").is_dir() and any((candidate / f).is_file() for f in markers):
            if candidate == path or path.is_relative_to(candidate / "records"):
                return candidate
    return None


def _from_config(path: Path) -> str | None:
    import yaml  # a dependency of the project's configs; imported only when a run folder lacks it in meta.json

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ReportInputError(f"{path}: cannot read the run's config ({err})") from err
    model = config.get("model") if isinstance(config, Mapping) else None
    proto = model.get("protocol") if isinstance(model, Mapping) else None
    if isinstance(proto, Mapping):  # a class_path/init_args form would name it here
        proto = proto.get("name")
    return proto if isinstance(proto, str) else None


def folder_protocol(run: Path) -> str | None:
    """The protocol a run folder recorded: ``meta.json``'s ``protocol``, else ``config.yaml``'s ``model.protocol``,
    else ``paper`` when the module wrote ``meta.json`` (it names only non-paper protocols there), else ``None``."""
    meta_path = run / "meta.json"
    meta = None
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ReportInputError(f"{meta_path}: cannot read the run's metadata ({err})") from err
        if isinstance(meta, Mapping) and isinstance(meta.get("protocol"), str):
            return meta["protocol"]
    if (run / "config.yaml").is_file():
        proto = _from_config(run / "config.yaml")
        if proto is not None:
            return proto
    return PAPER if isinstance(meta, Mapping) else None


def input_protocol(inputs: Iterable) -> str | None:
    """The one protocol of the inputs' run folders, ``None`` when none records one.

    Raises:
        ReportInputError: Run folders of different protocols (one line naming each folder and its protocol): their
            conditions and baselines differ, so one report of both would compare across protocols.
    """
    found: dict[str, str] = {}
    for item in inputs:
        if isinstance(item, Mapping):
            continue
        run = run_folder(Path(item))
        if run is not None and (proto := folder_protocol(run)) is not None:
            found.setdefault(str(run), proto)
    kinds = sorted(set(found.values()))
    if len(kinds) > 1:
        listed = "; ".join(f"{folder}: {proto}" for folder, proto in found.items())
        raise ReportInputError(
            f"the inputs mix evaluation protocols ({listed}); report each protocol separately (one report.py call "
            "per protocol)"
        )
    return kinds[0] if kinds else None


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _fingerprint(run: Path) -> tuple[str, dict] | None:
    """A run folder's fingerprint and identity (``fingerprint.json``; older folders: ``meta.json``'s fingerprint)."""
    for name in ("fingerprint.json", "meta.json"):
        try:
            data = json.loads((run / name).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, Mapping) and isinstance(data.get("fingerprint"), str):
            identity = data.get("identity")
            return data["fingerprint"], dict(identity) if isinstance(identity, Mapping) else {}
    return None


def mixed_configurations(inputs: Iterable) -> str | None:
    """A warning when the inputs come from run folders of different configurations (fingerprints), else ``None``.

    A run folder holds one configuration (models, translators, samples, decoding, numerics; not the condition and seed
    lists), so records from two folders with different fingerprints were computed differently: a report of both
    compares across experiments. Not refused (the same baseline evaluated again after a library update is such a
    case), but said.
    """
    found: dict[str, tuple[str, dict]] = {}
    for item in inputs:
        if isinstance(item, Mapping):
            continue
        run = run_folder(Path(item))
        if run is not None and (fp := _fingerprint(run)) is not None:
            found.setdefault(str(run), fp)
    if len({fp for fp, _ in found.values()}) < 2:
        return None
    identities = [identity for _, identity in found.values()]
    keys = sorted(k for k in set().union(*identities) if len({_canonical(i.get(k)) for i in identities}) > 1)
    listed = "; ".join(f"{folder}: {fp[:12]}" for folder, (fp, _) in found.items())
    differ = f" (they differ in {', '.join(keys)})" if keys else ""
    return (
        f"WARNING the inputs come from run folders of different configurations ({listed}){differ}: their records "
        "were computed with other models, translators, samples or settings, so comparisons across folders are not "
        "within one experiment"
    )


def unfinished_runs(inputs: Iterable) -> list[str]:
    """Notes naming, per input run folder, the runs begun but not finished (``partial/<key>/`` without
    ``records/<key>.jsonl``): the report reads finished runs only, so a condition would show fewer runs unsaid."""
    runs: dict[Path, None] = {}
    for item in inputs:
        if not isinstance(item, Mapping) and (run := run_folder(Path(item))) is not None:
            runs[run] = None
    notes = []
    for run in runs:
        partial = run / "partial"
        keys = sorted(p.name for p in partial.iterdir() if p.is_dir()) if partial.is_dir() else []
        keys = [k for k in keys if not (run / "records" / f"{k}.jsonl").is_file()]
        if keys:
            notes.append(
                f"run folder {run}: unfinished run(s) {', '.join(keys)} (partial/, no records file) are not in this "
                "report; rerun the evaluation to finish them"
            )
    return notes
