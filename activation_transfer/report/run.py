"""The report's one entry point, :func:`run_report`: records in, every table, test and plot written to a folder.

It serves both ``report.py`` and the evaluation module (which passes its in-memory records), so the two write the
same report from the same records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from activation_transfer.errors import UsageError
from activation_transfer.io import atomic_write
from activation_transfer.report.analysis import (
    DEFAULT_TOST_RESAMPLES,
    build_comparisons,
    build_summary,
    bytes_per_question,
    condition_accuracy,
)
from activation_transfer.report.clustered import CI_METHOD, DEFAULT_PERMUTATIONS, P_METHOD
from activation_transfer.report.gap import GAP_COLUMNS, GAP_HIGH, GAP_LOW, gap_recovered
from activation_transfer.report.load import (
    ReportInputError,
    RunCollapse,
    collapse_repeated_runs,
    group_records,
    load_records,
)
from activation_transfer.report.plots import plot_accuracy, plot_forest
from activation_transfer.report.protocol import input_protocol, mixed_configurations, unfinished_runs
from activation_transfer.report.split_plots import plot_gap
from activation_transfer.report.stats import DEFAULT_RESAMPLES
from activation_transfer.report.tables import (
    SUMMARY_COLUMNS,
    comparisons_markdown,
    csv_text,
    equivalence_markdown,
    gap_markdown,
    json_text,
    summary_markdown,
    summary_rows,
)
from activation_transfer.report.tost import DEFAULT_MARGINS
from activation_transfer.task.scoring import MAIN_METRIC, METRICS

DEFAULT_BASELINES: tuple[str, ...] = ("no_inject", "nl_relay")
# The split-context protocol's floor and ceiling (also ``SplitProtocol.baselines``; injection/ imports torch).
SPLIT_BASELINES: tuple[str, ...] = (GAP_LOW, GAP_HIGH)
REPORT_SCHEMA = "activation-transfer.report.v1"


@dataclass
class ReportResult:
    """What :func:`run_report` built and wrote.

    Attributes:
        summary: The content of ``summary.json``.
        comparisons: The content of ``comparisons.json``.
        equivalence: The content of ``equivalence.json``.
        files: Every written file by short name (``summary_json``, ``accuracy_png``, ...).
        markdown: The summary table (markdown) for printing.
        comparisons_markdown: The main metric's comparisons (``comparisons.md``) for printing.
        notes: Human-readable notes (dropped samples, skipped baselines, metric mismatches).
        gap_recovered: The content of ``gap_recovered.json`` (``gap.gap_recovered`` rows); empty, and the file not
            written, unless both ``receiver_alone`` and ``skyline`` are in the input.
    """

    summary: dict
    comparisons: list[dict]
    equivalence: list[dict]
    files: dict[str, Path]
    markdown: str
    notes: list[str] = field(default_factory=list)
    gap_recovered: list[dict] = field(default_factory=list)
    comparisons_markdown: str = ""


def _default_baselines(groups: Mapping, protocol: str | None) -> tuple[str, ...]:
    """The recorded protocol's baselines; for records that carry no protocol (loose files, records in memory), the
    split protocol's when its records are in and the paper's ``no_inject`` is not.

    ``nl_relay`` cannot tell the protocols apart (both evaluate it), ``no_inject`` and the split floor/ceiling can.
    """
    if protocol is not None:
        return DEFAULT_BASELINES if protocol == "paper" else SPLIT_BASELINES  # split and kv: floor and ceiling
    if "no_inject" not in groups and any(b in groups for b in SPLIT_BASELINES):
        return SPLIT_BASELINES
    return DEFAULT_BASELINES


def _resolve_baselines(
    groups: Mapping, baselines: Sequence[str] | None, notes: list[str], protocol: str | None = None
) -> list[str]:
    present = list(groups)
    if baselines is None:
        defaults = _default_baselines(groups, protocol)
        chosen = [b for b in defaults if b in groups]
        skipped = [b for b in defaults if b not in groups]
        if not chosen:
            raise ReportInputError(
                f"none of the default baselines {list(DEFAULT_BASELINES)} (split records: {list(SPLIT_BASELINES)}) "
                f"is in the input (conditions: {present}); name one with --baseline"
            )
        if skipped:
            notes.append(f"default baseline(s) {skipped} absent from the input: skipped")
        return chosen
    if isinstance(baselines, str):
        baselines = [baselines]
    missing = [b for b in baselines if b not in groups]
    if missing:
        raise ReportInputError(f"baseline(s) {missing} not in the input (conditions: {present})")
    if not baselines:
        raise ReportInputError("no baselines given")
    return list(dict.fromkeys(baselines))


def accuracy_summary(records: Sequence[Mapping], resamples: int = 1000, seed: int = 0) -> dict:
    """The ``conditions`` part of ``summary.json`` for records that get no report (e.g. no baseline among them).

    What :func:`plots.accuracy_figure` reads; conditions in first-appearance order.

    Args:
        records: Per-sample record dicts; none at all gives no conditions.
        resamples: Bootstrap resamples of the pooled 95% CIs.
        seed: Base seed of the CIs.
    """
    if not records:
        return {"conditions": {}}
    loaded = load_records(list(records))
    runs = collapse_repeated_runs(group_records(loaded), loaded)
    return {"conditions": build_summary(runs.groups, list(runs.groups), resamples, seed, runs.collapsed)}


def _collapse_notes(runs: RunCollapse) -> list[str]:
    notes = [
        f"{cond}: runs {', '.join(same)} are one computation (one translator checkpoint, a condition that ignores the "
        f"seed, identical answers): counted once, as run {kept}"
        for cond, merged in runs.collapsed.items()
        for kept, same in merged.items()
    ]
    # Older records say nothing about their translator: identical runs may be one computation written per seed, or
    # translators that happen to agree. Only the evaluation knew: the numbers stay as they are, the reader is warned.
    notes += [
        f"WARNING {cond}: runs {', '.join(same)} give identical answers on every sample but their records carry no "
        "translator identity; if one translator checkpoint produced them, they are one run and the pooled CIs and "
        "McNemar p here are too narrow (re-evaluate to record translator identities, or report one of the runs)"
        for cond, twins in runs.unnamed_twins.items()
        for same in twins
    ]
    return notes


def checked_resamples(resamples: int, option: str = "resamples") -> int:
    """``resamples`` if it is >= 1, else one line naming ``option``. An evaluation checks its
    ``model.report_resamples`` when it is built: its report runs after every condition is computed, where a bad
    count was a traceback at the end."""
    if resamples < 1:
        raise UsageError(f"{option} must be >= 1, got {resamples}")
    return resamples


def run_report(
    inputs: Sequence[str | Path] | Sequence[Mapping],
    out_dir: str | Path,
    baselines: Sequence[str] | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    margins: Sequence[float] = DEFAULT_MARGINS,
    seed: int = 0,
    intersect: bool = False,
    tost_resamples: int = DEFAULT_TOST_RESAMPLES,
    permutations: int = DEFAULT_PERMUTATIONS,
    protocol: str | None = None,
) -> ReportResult:
    """Build every table, test and plot from per-sample records and write them into ``out_dir``.

    Args:
        inputs: JSONL files, the paper's JSON result files, folders of them, or already-loaded record dicts
            (``activation_transfer.report.records.RECORD_FIELDS``; the evaluation module passes its in-memory records).
        out_dir: Output folder (created). Files are written atomically (temporary file, then ``os.replace``).
        baselines: Baselines to compare against. ``None``: the protocol's (paper: ``no_inject`` and ``nl_relay``;
            split: ``receiver_alone`` and ``skyline``), skipping an absent one (a note says so; at least one must be
            present), as the evaluation module does (each protocol's ``baselines``). The protocol is the one the run
            folders recorded (``protocol.input_protocol``); records without one (loose files, in memory) are split
            records when ``receiver_alone`` or ``skyline`` is present and ``no_inject`` is not. An explicit list must
            be fully present.
        resamples: Bootstrap resamples for the 95% CIs (accuracy and paired deltas).
        margins: TOST equivalence margins (accuracy units, each in (0, 1): 0.05 is 5 points).
        seed: Base seed; each CI derives its own seed from it and a label, recorded next to the CI.
        intersect: Compare only the sample ids common to a condition and its baseline, reporting how many were
            dropped, instead of failing when they differ (a strict-matched subset is compared on its samples anyway).
        tost_resamples: Resamples of the clustered bootstrap 90% CI reported next to TOST.
        permutations: Random sign assignments of each comparison's sign-flip permutation test.
        protocol: The protocol of in-memory records (the evaluation module knows it); ``None``: read from the input
            run folders.

    Returns:
        A :class:`ReportResult`.

    Raises:
        ReportInputError: Bad or empty input, run folders of different protocols, absent baseline, mismatching
            sample ids without ``intersect``, an ``out_dir`` that is a file or cannot be created.

    With both ``receiver_alone`` and ``skyline`` in the input (whatever the baselines), every other condition also
    gets the fraction of the gap between them that it recovers (main metric, same ``resamples`` and ``seed``),
    written to ``gap_recovered.json``, ``.csv`` and ``.md``; without them the report writes exactly the paper
    protocol's files.

    Runs of one computation (one translator's answers to a condition that ignores the seed, written once per seed)
    count as one run: see ``load.collapse_repeated_runs``; ``summary.json``'s ``meta.collapsed_runs`` lists them.
    """
    checked_resamples(resamples)
    margins = [float(g) for g in margins]
    # NaN fails every comparison, so `g <= 0` lets it through to a late JSON "Out of range float" error; inf is no
    # margin at all. Both are refused here, before any work. Deltas lie in [-1, 1]: a margin of 1 or more calls every
    # comparison equivalent (`--margins 5 3` meant as percent did), so it is refused too.
    if not margins or not all(math.isfinite(g) and 0 < g < 1 for g in margins):
        raise ValueError(
            f"margins must be finite positive numbers below 1 (accuracy units: 0.05 is 5 points), got {margins}"
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReportInputError(f"--out {out} is a file, not a folder: name a folder (it is created if absent)")
    if permutations < 1:
        raise ValueError(f"permutations must be >= 1, got {permutations}")
    recorded = input_protocol(inputs)
    if protocol is not None and recorded not in (None, protocol):
        raise ReportInputError(f"protocol {protocol!r} given, but the input run folders recorded {recorded!r}")
    protocol = protocol or recorded
    counters: dict[str, Any] = {}
    records = load_records(list(inputs), counters)
    runs = collapse_repeated_runs(group_records(records), records)
    groups, collapsed = runs.groups, runs.collapsed
    notes: list[str] = []
    if counters.get("skipped_files"):
        names = ", ".join(Path(f).name for f in counters["skipped_files"])
        notes.append(f"skipped {len(counters['skipped_files'])} JSON file(s) that hold no records: {names}")
    if counters.get("metric_mismatch"):
        notes.append(f"{counters['metric_mismatch']} record(s) carried stored metrics that differ from re-scoring")
    notes += _collapse_notes(runs)
    if (mixed := mixed_configurations(inputs)) is not None:
        notes.append(mixed)
    notes += unfinished_runs(inputs)
    chosen = _resolve_baselines(groups, baselines, notes, protocol)
    order = chosen + [c for c in groups if c not in chosen]

    meta = {
        "schema": REPORT_SCHEMA,
        "seed": seed,
        "resamples": resamples,
        "confidence": 0.95,
        "margins": margins,
        "tost_alpha": 0.05,
        "tost_resamples": tost_resamples,
        "permutations": permutations,
        "ci_method": CI_METHOD,
        "p_method": P_METHOD,
        "protocol": protocol,
        "baselines": chosen,
        "intersect": intersect,
        "metrics": list(METRICS),
        "main_metric": MAIN_METRIC,
        "n_records": len(records),
        "inputs": [str(i) for i in inputs if not isinstance(i, Mapping)],
        "collapsed_runs": collapsed,
        "unnamed_identical_runs": runs.unnamed_twins,
    }
    summary = {"conditions": build_summary(groups, order, resamples, seed, collapsed), "meta": meta}
    for cond, sent in bytes_per_question(records).items():
        summary["conditions"][cond]["bytes_per_question"] = sent
    comparisons, equivalence, cmp_notes = build_comparisons(
        groups, order, chosen, resamples, margins, seed, intersect, tost_resamples, collapsed, permutations
    )
    notes += cmp_notes
    with_gap = GAP_LOW in groups and GAP_HIGH in groups
    gap_rows = gap_recovered(groups, resamples=resamples, seed=seed) if with_gap else []
    notes += _gap_notes(gap_rows)
    meta["notes"] = notes

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportInputError(f"--out {out}: cannot create the folder ({err.strerror or err})") from err
    md_summary = summary_markdown(summary)
    md_comparisons = comparisons_markdown(comparisons, meta)
    cmp_cols = list(comparisons[0]) if comparisons else ["condition", "baseline", "metric"]
    eq_cols = list(equivalence[0]) if equivalence else ["condition", "baseline", "metric"]
    texts = {
        "summary.json": json_text(summary),
        "comparisons.json": json_text(comparisons),
        "equivalence.json": json_text(equivalence),
        "summary.md": "# Summary\n\n" + md_summary,
        "comparisons.md": md_comparisons,
        "equivalence.md": equivalence_markdown(equivalence, meta),
        "summary.csv": csv_text(summary_rows(summary), SUMMARY_COLUMNS),
        "comparisons.csv": csv_text(comparisons, cmp_cols),
        "equivalence.csv": csv_text(equivalence, eq_cols),
    }
    figures = {"accuracy": plot_accuracy(summary), "deltas": plot_forest(comparisons, chosen, margins=margins)}
    if with_gap:
        # Files of their own: comparisons.json keeps its schema, and paper-protocol reports their file set.
        texts["gap_recovered.json"] = json_text(gap_rows)
        texts["gap_recovered.csv"] = csv_text(gap_rows, GAP_COLUMNS)
        texts["gap_recovered.md"] = gap_markdown(gap_rows, meta)
        figures["gap_recovered"] = plot_gap(gap_rows)
    for stem, data in figures.items():
        texts |= {f"{stem}.{fmt}": blob for fmt, blob in data.items()}
    # Short names as before: "summary_json", "accuracy_png", "accuracy_svg", ...
    files = {name.replace(".", "_"): atomic_write(out / name, data) for name, data in texts.items()}
    # The one optional file set: a report without the gap written where one with it was (an evaluation rewrites its
    # report/ on every rerun, for that invocation's conditions) would leave the earlier report's gap numbers and plot
    # beside this summary. Only the names this function writes are removed.
    for ext in ("json", "csv", "md", "png", "svg"):
        if f"gap_recovered.{ext}" not in texts:
            (out / f"gap_recovered.{ext}").unlink(missing_ok=True)
    return ReportResult(summary, comparisons, equivalence, files, md_summary, notes, gap_rows, md_comparisons)


def _gap_notes(rows: Sequence[Mapping]) -> list[str]:
    """Notes for gap rows whose CI leaves samples or resamples out, or that have no fraction."""
    notes = [f"gap recovered, {r['condition']}: {r['note']}" for r in rows if r.get("note")]
    notes += [
        f"gap recovered, {r['condition']}: {r['undefined_resamples']} of {r['resamples']} resamples had "
        f"{r['high']} not above {r['low']}; they are ranked at the infinity of their numerator's sign, not left out"
        for r in rows
        if r.get("undefined_resamples")
    ]
    notes += [
        f"gap recovered, {r['condition']}: the CI uses the {r['n']} sample ids common to every run of it, "
        f"{r['low']} and {r['high']} ({r['dropped']} left out)"
        for r in rows
        if r.get("dropped")
    ]
    return notes


def logged_metrics(records: Sequence[Mapping], stage: str = "eval") -> dict[str, float]:
    """``<stage>/<metric>/condition=<name>``: the report's per-condition accuracy, for a logger.

    The same numbers as the summary (mean over runs of each run's accuracy, one translator's repeated seed-free runs
    counted once), so what W&B shows equals what ``summary.json`` says.
    """
    if not records:
        return {}
    loaded = load_records(list(records))
    accuracy = condition_accuracy(collapse_repeated_runs(group_records(loaded), loaded).groups)
    return {f"{stage}/{m}/condition={c}": acc[m]["mean"] for c, acc in accuracy.items() for m in METRICS}
