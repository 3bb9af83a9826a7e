"""Per-sample records -> the paper's tables, paired CIs, McNemar, TOST and plots (DESIGN.md "Report").

Glue around the pure functions of :mod:`scoring` and :mod:`statistics`. One entry point, :func:`run_report`, serves
both ``report.py`` and the evaluation module (which passes its in-memory records).

Inputs are per-sample records (DESIGN.md schema, one JSON object per line) in ``.jsonl``/``.json`` files or folders
of them, or the paper's locked result files (one JSON object with top-level ``condition``/``seed`` and a
``per_sample`` list). Records are re-scored from ``gold`` and ``prediction``; stored ``metrics`` are only checked.

Baselines: with ``baselines=None`` (the default) the report compares against ``no_inject`` and ``nl_relay``,
skipping whichever is absent (at least one must be present). Baselines named explicitly must all be present.

Pairing: a condition's runs are paired with a single-run (deterministic) baseline run by run; a multi-run baseline
is paired by equal seed (or each of its runs with a single-run condition). Paired runs must hold the same sample
ids; with ``intersect=True`` only the ids common to all paired runs are kept and the number dropped is reported.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_modules.components import statistics as st
from lightning_modules.components.io import atomic_write
from lightning_modules.components.scoring import MAIN_METRIC, METRICS, score

DEFAULT_BASELINES: tuple[str, ...] = ("no_inject", "nl_relay")
DETERMINISTIC = "deterministic"
# The clustered-view bootstrap 90% CI that accompanies TOST (PAPER.md 4.4 uses 10,000 resamples).
DEFAULT_TOST_RESAMPLES = 10_000
REPORT_SCHEMA = "activation-transfer.report.v1"

METRIC_LABELS = {
    "exact_match": "Exact match",
    "normalized_exact_match": "Normalized EM",
    "word_boundary_contains": "Word-boundary contains",
    "first_answer_span_match": "First-answer span",
    "legacy_contains": "Legacy contains",
}
# The paper's table order: main metric, then legacy contains (its comparison metric), then the strict ones.
_PAPER_ORDER = ("word_boundary_contains", "legacy_contains", "normalized_exact_match", "exact_match")
METRIC_ORDER: tuple[str, ...] = tuple(dict.fromkeys((MAIN_METRIC, *_PAPER_ORDER, *METRICS)))


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


@dataclass
class ReportResult:
    """What :func:`run_report` built and wrote.

    Attributes:
        summary: The content of ``summary.json``.
        comparisons: The content of ``comparisons.json``.
        equivalence: The content of ``equivalence.json``.
        files: Every written file by short name (``summary_json``, ``accuracy_png``, ...).
        markdown: The summary table (markdown) for printing.
        notes: Human-readable notes (dropped samples, skipped baselines, metric mismatches).
    """

    summary: dict
    comparisons: list[dict]
    equivalence: list[dict]
    files: dict[str, Path]
    markdown: str
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------- loading


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


# --------------------------------------------------------------------------------------------------------- analysis


def _sort_runs(runs: Iterable[str]) -> list[str]:
    return sorted(runs, key=lambda r: (0, int(r), r) if r.lstrip("-").isdigit() else (1, 0, r))


def build_summary(groups: Mapping, order: Sequence[str], resamples: int, seed: int) -> dict[str, dict]:
    """Per condition: runs, n, and per metric the run mean, sample SD, per-run values and a pooled 95% CI.

    Args:
        groups: Output of :func:`group_records`.
        order: Conditions in report order.
        resamples: Bootstrap resamples for the accuracy CI (pooled over runs' samples).
        seed: Base seed; each CI uses ``derive_seed(seed, "{condition}|accuracy|{metric}")``.
    """
    out: dict[str, dict] = {}
    for cond in order:
        runs = groups[cond]
        keys = _sort_runs(runs)
        sizes = {k: len(runs[k]) for k in keys}
        entry: dict[str, Any] = {"runs": len(keys), "n": min(sizes.values())}
        if len(set(sizes.values())) > 1:
            entry["n_per_run"] = sizes
        for m in METRICS:
            per_run = {k: float(np.mean([s[m] for s in runs[k].values()])) for k in keys}
            mean, sd = st.run_mean_sd(list(per_run.values()))
            pooled = np.array([s[m] for k in keys for s in runs[k].values()], dtype=np.float64)
            ci_seed = st.derive_seed(seed, f"{cond}|accuracy|{m}")
            lo, hi = st.bootstrap_mean_ci(pooled, resamples=resamples, confidence=0.95, seed=ci_seed)
            entry[m] = {
                "mean": mean,
                "sd": sd,
                "per_run": per_run,
                "ci_low": lo,
                "ci_high": hi,
                "bootstrap_seed": ci_seed,
            }
        out[cond] = entry
    return out


def _pair_runs(cond: str, cond_runs: Sequence[str], base: str, base_runs: Sequence[str]) -> list[tuple[str, str]]:
    if len(base_runs) == 1:
        return [(c, base_runs[0]) for c in cond_runs]
    if len(cond_runs) == 1:
        return [(cond_runs[0], b) for b in base_runs]
    if set(cond_runs) == set(base_runs):
        return [(r, r) for r in cond_runs]
    raise ReportInputError(
        f"cannot pair the runs of {cond!r} (seeds {list(cond_runs)}) with those of baseline {base!r} "
        f"(seeds {list(base_runs)}): a multi-run baseline needs the same seeds"
    )


def _align(
    groups: Mapping, cond: str, base: str, pairs: Sequence[tuple[str, str]], intersect: bool
) -> tuple[list[str], int]:
    """Sample ids shared by every paired run; without ``intersect`` any difference is an error."""
    id_sets = [set(groups[cond][c]) for c, _ in pairs] + [set(groups[base][b]) for _, b in pairs]
    common = set.intersection(*id_sets)
    if not intersect:
        for c, b in pairs:
            ci, bi = set(groups[cond][c]), set(groups[base][b])
            if ci != bi:
                only_c, only_b = sorted(ci - bi), sorted(bi - ci)
                raise ReportInputError(
                    f"condition {cond!r} run {c} and baseline {base!r} run {b} differ in sample ids: "
                    f"{len(only_c)} only in the condition {only_c[:3]}, {len(only_b)} only in the baseline "
                    f"{only_b[:3]}; pass --intersect (intersect=True) to compare the common ids"
                )
    if not common:
        raise ReportInputError(f"condition {cond!r} and baseline {base!r} share no sample ids")
    # Dropped = paired observations lost on either side, summed over the paired runs.
    dropped = sum(len(groups[cond][c]) - len(common) + len(groups[base][b]) - len(common) for c, b in pairs)
    return sorted(common), dropped


def _vectors(groups: Mapping, cond: str, run: str, ids: Sequence[str], metric: str) -> np.ndarray:
    samples = groups[cond][run]
    return np.fromiter((samples[i][metric] for i in ids), dtype=bool, count=len(ids))


def build_comparisons(
    groups: Mapping,
    order: Sequence[str],
    baselines: Sequence[str],
    resamples: int,
    margins: Sequence[float],
    seed: int,
    intersect: bool,
    tost_resamples: int = DEFAULT_TOST_RESAMPLES,
) -> tuple[list[dict], list[dict], list[str]]:
    """Paired comparisons (pooled bootstrap, gained/lost, McNemar) and clustered TOST for every pair.

    Args:
        groups: Output of :func:`group_records`.
        order: Conditions in report order.
        baselines: Baselines present in ``groups``.
        resamples: Bootstrap resamples of the pooled 95% CI.
        margins: TOST margins.
        seed: Base seed; comparison CIs use ``derive_seed(seed, "{condition}|{baseline}|{metric}")``.
        intersect: Keep only common sample ids instead of failing on a mismatch.
        tost_resamples: Resamples of the clustered bootstrap 90% CI reported next to TOST.

    Returns:
        ``(comparisons, equivalence, notes)``.
    """
    comparisons: list[dict] = []
    equivalence: list[dict] = []
    notes: list[str] = []
    for base in baselines:
        base_runs = _sort_runs(groups[base])
        for cond in order:
            if cond == base:
                continue
            pairs = _pair_runs(cond, _sort_runs(groups[cond]), base, base_runs)
            ids, dropped = _align(groups, cond, base, pairs, intersect)
            if dropped:
                notes.append(
                    f"{cond} vs {base}: --intersect dropped {dropped} unpaired sample observations "
                    f"({len(ids)} common samples x {len(pairs)} runs kept)"
                )
            for m in METRIC_ORDER:
                c_runs = [_vectors(groups, cond, c, ids, m) for c, _ in pairs]
                b_runs = [_vectors(groups, base, b, ids, m) for _, b in pairs]
                label = f"{cond}|{base}|{m}"
                cmp_ = st.compare_paired(c_runs, b_runs, resamples=resamples, seed=st.derive_seed(seed, label))
                comparisons.append(
                    {
                        "condition": cond,
                        "baseline": base,
                        "metric": m,
                        "runs": cmp_.runs,
                        "n_pairs": cmp_.n_pairs,
                        "delta": cmp_.delta,
                        "ci_low": cmp_.ci_low,
                        "ci_high": cmp_.ci_high,
                        "gained_per_run": cmp_.gained_per_run,
                        "lost_per_run": cmp_.lost_per_run,
                        "mcnemar_p": cmp_.mcnemar_p,
                        "gained": cmp_.gained,
                        "lost": cmp_.lost,
                        "n_samples": len(ids),
                        "dropped": dropped,
                        "paired_runs": [list(p) for p in pairs],
                        "confidence": cmp_.confidence,
                        "resamples": cmp_.resamples,
                        "bootstrap_seed": cmp_.bootstrap_seed,
                    }
                )
                clustered = st.clustered_deltas(c_runs, b_runs)
                degr = st.degradation_p(clustered)
                boot_seed = st.derive_seed(seed, label + "|clustered")
                blo, bhi = st.bootstrap_mean_ci(clustered, resamples=tost_resamples, confidence=0.90, seed=boot_seed)
                for margin in margins:
                    t = st.tost(clustered, margin)
                    equivalence.append(
                        {
                            "condition": cond,
                            "baseline": base,
                            "metric": m,
                            "view": "clustered",
                            "delta": t.delta,
                            "ci90_low": t.ci90_low,
                            "ci90_high": t.ci90_high,
                            "margin": t.margin,
                            "p": t.p,
                            "equivalent": t.equivalent,
                            "p_lower": t.p_lower,
                            "p_upper": t.p_upper,
                            "se": t.se,
                            "n": t.n,
                            "runs": len(pairs),
                            "degradation_p": degr,
                            "bootstrap_ci90_low": blo,
                            "bootstrap_ci90_high": bhi,
                            "bootstrap_resamples": tost_resamples,
                            "bootstrap_seed": boot_seed,
                        }
                    )
    return comparisons, equivalence, notes


# ------------------------------------------------------------------------------------------------------- formatting


def _f(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    # "+0.0000" would suggest a positive effect: print zero unsigned.
    if signed and round(x, 4) != 0:
        return f"{x:+.4f}"
    return f"{abs(x) if round(x, 4) == 0 else x:.4f}"


def _p(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.2e}"


def _per_run_fmt(v: float) -> str:
    return f"{v:.1f}"


def summary_markdown(summary: Mapping) -> str:
    """The paper's main table: condition, runs, n, then mean +/- sample SD of each metric (main metric first)."""
    head = ["Condition", "Runs", "n", *(METRIC_LABELS[m] for m in METRIC_ORDER)]
    lines = ["| " + " | ".join(head) + " |", "| --- | ---: | ---: |" + " ---: |" * len(METRIC_ORDER)]
    for cond, e in summary["conditions"].items():
        cells = [cond, str(e["runs"]), str(e["n"])]
        for m in METRIC_ORDER:
            v = e[m]
            cells.append(_f(v["mean"]) if v["sd"] is None else f"{_f(v['mean'])} ± {_f(v['sd'])}")
        lines.append("| " + " | ".join(cells) + " |")
    meta = summary["meta"]
    return (
        "\n".join(lines)
        + f"\n\nValues are mean ± sample SD over runs (single runs: the run's value). Main metric: {MAIN_METRIC}. "
        f"Scored from gold and prediction; seed {meta['seed']}.\n"
    )


def comparisons_markdown(comparisons: Sequence[Mapping], equivalence: Sequence[Mapping], meta: Mapping) -> str:
    """Paired-delta tables per baseline and metric (the paper's layout), then the clustered TOST tables."""
    out = [
        "# Paired comparisons",
        "",
        f"Δ = condition − baseline, per sample, matched by sample id; multi-run conditions pool their paired deltas "
        f"across runs. {int(meta['confidence'] * 100)}% simple percentile bootstrap, {meta['resamples']} resamples "
        f"(seed {meta['seed']}, one derived seed per comparison). McNemar: continuity-corrected chi-square.",
        "",
    ]
    for base in meta["baselines"]:
        for m in METRIC_ORDER:
            rows = [c for c in comparisons if c["baseline"] == base and c["metric"] == m]
            if not rows:
                continue
            out += [
                f"## vs {base}: {m}",
                "",
                "| Condition | Runs | Pairs | Δ | 95% CI | Mean gained / lost per run | McNemar p |",
                "| --- | ---: | ---: | ---: | --- | --- | ---: |",
            ]
            for c in rows:
                out.append(
                    f"| {c['condition']} | {c['runs']} | {c['n_pairs']} | {_f(c['delta'], True)} | "
                    f"[{_f(c['ci_low'], True)}, {_f(c['ci_high'], True)}] | "
                    f"{_per_run_fmt(c['gained_per_run'])} / {_per_run_fmt(c['lost_per_run'])} | {_p(c['mcnemar_p'])} |"
                )
            out.append("")
    margins = meta["margins"]
    out += [
        "# Equivalence (TOST) and degradation",
        "",
        "Clustered view: each sample's delta averaged over runs; normal approximation, 90% CI, α = 0.05 per "
        "one-sided test. Degradation p: one-sided test of Δ < 0.",
        "",
    ]
    for base in meta["baselines"]:
        for m in METRIC_ORDER:
            rows = [e for e in equivalence if e["baseline"] == base and e["metric"] == m]
            if not rows:
                continue
            head = ["Condition", "n", "Δ", "90% CI", *(f"TOST p (±{g:g})" for g in margins), "Degradation p"]
            out += [f"## vs {base}: {m}", "", "| " + " | ".join(head) + " |"]
            out.append("| --- | ---: | ---: | --- |" + " ---: |" * (len(margins) + 1))
            for cond in dict.fromkeys(e["condition"] for e in rows):
                by_margin = {e["margin"]: e for e in rows if e["condition"] == cond}
                e0 = next(iter(by_margin.values()))
                ps = [
                    _p(by_margin[g]["p"]) + (" (equiv.)" if by_margin[g]["equivalent"] else "")
                    for g in map(float, margins)
                ]
                out.append(
                    f"| {cond} | {e0['n']} | {_f(e0['delta'], True)} | "
                    f"[{_f(e0['ci90_low'], True)}, {_f(e0['ci90_high'], True)}] | "
                    + " | ".join(ps)
                    + f" | {_p(e0['degradation_p'])} |"
                )
            out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------------ files


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, allow_nan=False) + "\n"


def _csv(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (json.dumps(v) if isinstance(v, list | dict) else v) for k, v in row.items()})
    return buf.getvalue()


def _summary_rows(summary: Mapping) -> list[dict]:
    rows = []
    for cond, e in summary["conditions"].items():
        for m in METRIC_ORDER:
            v = e[m]
            rows.append(
                {
                    "condition": cond,
                    "runs": e["runs"],
                    "n": e["n"],
                    "metric": m,
                    "mean": v["mean"],
                    "sd": "" if v["sd"] is None else v["sd"],
                    "ci_low": v["ci_low"],
                    "ci_high": v["ci_high"],
                    "per_run": ";".join(f"{k}={x:.6g}" for k, x in v["per_run"].items()),
                }
            )
    return rows


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_accuracy(summary: Mapping, metric: str = MAIN_METRIC) -> bytes:
    """Horizontal point plot of accuracy per condition with pooled 95% bootstrap CIs and per-run dots (PNG bytes).

    Args:
        summary: The content of ``summary.json``.
        metric: Metric to plot.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: report runs on servers and in tests
    import matplotlib.pyplot as plt

    conds = list(summary["conditions"])
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(conds) + 1.4))
    runs_labelled = False  # label the per-run markers once in the legend
    for y, cond in enumerate(conds):
        v = summary["conditions"][cond][metric]
        mean = float(np.mean(list(v["per_run"].values())))
        ax.errorbar(
            mean,
            y,
            xerr=[[mean - v["ci_low"]], [v["ci_high"] - mean]],
            fmt="o",
            color="C0",
            ecolor="C0",
            capsize=3,
            markersize=6,
            label="mean, 95% CI (pooled bootstrap)" if y == 0 else None,
        )
        if len(v["per_run"]) > 1:
            ax.plot(
                list(v["per_run"].values()),
                [y] * len(v["per_run"]),
                "x",
                color="0.35",
                markersize=5,
                label=None if runs_labelled else "single run",
            )
            runs_labelled = True
        # The value printed beside the CI saves reading it off the axis.
        ax.annotate(
            f"{mean:.4f}", (v["ci_high"], y), xytext=(6, 0), textcoords="offset points", va="center", fontsize=8
        )
    ax.set_yticks(range(len(conds)))
    ax.set_yticklabels([f"{c} (runs={summary['conditions'][c]['runs']})" for c in conds])
    ax.set_ylim(len(conds) - 0.4, -0.6)  # top-down in report order, half a row of air at both ends
    ax.set_xlim(0, max(summary["conditions"][c][metric]["ci_high"] for c in conds) * 1.15 + 1e-3)
    ax.set_xlabel(f"{METRIC_LABELS[metric]} accuracy")
    ax.set_title(f"Accuracy per condition ({metric})")
    ax.grid(axis="x", alpha=0.3)
    # Legend below the axes so it never covers a condition's row.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.6 / (len(conds) + 2)), ncol=2, fontsize=8)
    return _png(fig)


def plot_forest(comparisons: Sequence[Mapping], baselines: Sequence[str], metric: str = MAIN_METRIC) -> bytes:
    """Forest plot of pooled paired deltas with 95% CIs, one panel per baseline, zero line (PNG bytes).

    Args:
        comparisons: The content of ``comparisons.json``.
        baselines: Baselines (one panel each).
        metric: Metric to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [b for b in baselines if any(c["baseline"] == b and c["metric"] == metric for c in comparisons)]
    conds = list(dict.fromkeys(c["condition"] for c in comparisons if c["metric"] == metric))
    width = 5.0 * max(1, len(panels)) + 1.5
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(width, 0.45 * len(conds) + 1.6), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, base in zip(axes, panels):
        rows = {c["condition"]: c for c in comparisons if c["baseline"] == base and c["metric"] == metric}
        for y, cond in enumerate(conds):
            c = rows.get(cond)
            if c is None:
                continue
            excludes_zero = c["ci_low"] > 0 or c["ci_high"] < 0
            color = "C3" if excludes_zero else "C0"
            ax.errorbar(
                c["delta"],
                y,
                xerr=[[c["delta"] - c["ci_low"]], [c["ci_high"] - c["delta"]]],
                fmt="s",
                color=color,
                ecolor=color,
                capsize=3,
                markersize=5,
            )
            ax.annotate(
                f"{c['delta']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]",
                (c["delta"], y),
                xytext=(0, 7),
                textcoords="offset points",
                ha="center",
                fontsize=7,
                color=color,
                # A translucent box keeps the numbers legible where they cross the zero line or grid.
                bbox={"fc": "white", "ec": "none", "alpha": 0.75, "pad": 0.5},
            )
        ax.axvline(0.0, color="k", lw=1, ls="--")
        ax.set_title(f"vs {base}")
        ax.set_xlabel(f"Δ {METRIC_LABELS[metric]} (paired, 95% CI)")
        ax.grid(axis="x", alpha=0.3)
    if panels:
        axes[0].set_yticks(range(len(conds)))
        axes[0].set_yticklabels(conds)
        axes[0].set_ylim(len(conds) - 0.4, -0.7)  # shared y: top-down in report order, room for the labels
    else:
        # Only baselines in the input: say so instead of drawing a blank frame.
        axes[0].text(
            0.5, 0.5, "no conditions to compare with a baseline", ha="center", va="center", transform=axes[0].transAxes
        )
        axes[0].set_axis_off()
    fig.suptitle("Paired deltas against each baseline (red: CI excludes 0)", fontsize=10)
    if panels:  # an empty figure has no room to lay out (tight_layout would warn)
        fig.tight_layout()
    return _png(fig)


# ------------------------------------------------------------------------------------------------------ entry point


def _resolve_baselines(groups: Mapping, baselines: Sequence[str] | None, notes: list[str]) -> list[str]:
    present = list(groups)
    if baselines is None:
        chosen = [b for b in DEFAULT_BASELINES if b in groups]
        skipped = [b for b in DEFAULT_BASELINES if b not in groups]
        if not chosen:
            raise ReportInputError(
                f"none of the default baselines {list(DEFAULT_BASELINES)} is in the input (conditions: {present}); "
                "name one with --baseline"
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


def run_report(
    inputs: Sequence[str | Path] | Sequence[Mapping],
    out_dir: str | Path,
    baselines: Sequence[str] | None = None,
    resamples: int = st.DEFAULT_RESAMPLES,
    margins: Sequence[float] = st.DEFAULT_MARGINS,
    seed: int = 0,
    intersect: bool = False,
    tost_resamples: int = DEFAULT_TOST_RESAMPLES,
) -> ReportResult:
    """Build every table, test and plot from per-sample records and write them into ``out_dir``.

    Args:
        inputs: JSONL files, the paper's JSON result files, folders of them, or already-loaded record dicts
            (DESIGN.md schema; the evaluation module passes its in-memory records).
        out_dir: Output folder (created). Files are written atomically (temporary file, then ``os.replace``).
        baselines: Baselines to compare against. ``None``: ``no_inject`` and ``nl_relay``, skipping an absent one
            (a note says so; at least one must be present). An explicit list must be fully present.
        resamples: Bootstrap resamples for the 95% CIs (accuracy and paired deltas).
        margins: TOST equivalence margins (accuracy units, each > 0).
        seed: Base seed; each CI derives its own seed from it and a label, recorded next to the CI.
        intersect: Compare only the sample ids common to a condition and its baseline, reporting how many were
            dropped, instead of failing when they differ.
        tost_resamples: Resamples of the clustered bootstrap 90% CI reported next to TOST.

    Returns:
        A :class:`ReportResult`.

    Raises:
        ReportInputError: Bad or empty input, absent baseline, mismatching sample ids without ``intersect``.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    margins = [float(g) for g in margins]
    if not margins or any(g <= 0 for g in margins):
        raise ValueError(f"margins must be positive numbers, got {margins}")
    counters: dict[str, int] = {}
    records = load_records(list(inputs), counters)
    groups = group_records(records)
    notes: list[str] = []
    if counters.get("metric_mismatch"):
        notes.append(f"{counters['metric_mismatch']} record(s) carried stored metrics that differ from re-scoring")
    chosen = _resolve_baselines(groups, baselines, notes)
    order = chosen + [c for c in groups if c not in chosen]

    meta = {
        "schema": REPORT_SCHEMA,
        "seed": seed,
        "resamples": resamples,
        "confidence": 0.95,
        "margins": margins,
        "tost_alpha": 0.05,
        "tost_resamples": tost_resamples,
        "baselines": chosen,
        "intersect": intersect,
        "metrics": list(METRICS),
        "main_metric": MAIN_METRIC,
        "n_records": len(records),
        "inputs": [str(i) for i in inputs if not isinstance(i, Mapping)],
    }
    summary = {"conditions": build_summary(groups, order, resamples, seed), "meta": meta}
    comparisons, equivalence, cmp_notes = build_comparisons(
        groups, order, chosen, resamples, margins, seed, intersect, tost_resamples
    )
    notes += cmp_notes
    meta["notes"] = notes

    out = Path(out_dir)
    md_summary = summary_markdown(summary)
    md_comparisons = comparisons_markdown(comparisons, equivalence, meta)
    cmp_cols = list(comparisons[0]) if comparisons else ["condition", "baseline", "metric"]
    eq_cols = list(equivalence[0]) if equivalence else ["condition", "baseline", "metric"]
    sum_cols = ["condition", "runs", "n", "metric", "mean", "sd", "ci_low", "ci_high", "per_run"]
    files = {
        "summary_json": atomic_write(out / "summary.json", _json(summary)),
        "comparisons_json": atomic_write(out / "comparisons.json", _json(comparisons)),
        "equivalence_json": atomic_write(out / "equivalence.json", _json(equivalence)),
        "summary_md": atomic_write(out / "summary.md", "# Summary\n\n" + md_summary),
        "comparisons_md": atomic_write(out / "comparisons.md", md_comparisons),
        "summary_csv": atomic_write(out / "summary.csv", _csv(_summary_rows(summary), sum_cols)),
        "comparisons_csv": atomic_write(out / "comparisons.csv", _csv(comparisons, cmp_cols)),
        "equivalence_csv": atomic_write(out / "equivalence.csv", _csv(equivalence, eq_cols)),
        "accuracy_png": atomic_write(out / "accuracy.png", plot_accuracy(summary)),
        "deltas_png": atomic_write(out / "deltas.png", plot_forest(comparisons, chosen)),
    }
    return ReportResult(summary, comparisons, equivalence, files, md_summary, notes)


def log_report_to_wandb(result: ReportResult, experiment: Any, prefix: str = "report/") -> dict[str, Any]:
    """Log a report's tables (``wandb.Table``) and plots (``wandb.Image``) to a W&B run.

    Args:
        result: What :func:`run_report` returned.
        experiment: A ``wandb`` run (``WandbLogger.experiment``); anything with ``log(dict)``.
        prefix: Key prefix for the logged items.

    Returns:
        The dict passed to ``experiment.log``.
    """
    import wandb  # optional at import time: the report itself works without W&B

    def table(rows: Sequence[Mapping]) -> Any:
        cols = list(rows[0]) if rows else ["empty"]
        data = [[json.dumps(r[c]) if isinstance(r[c], list | dict) else r[c] for c in cols] for r in rows]
        return wandb.Table(columns=cols, data=data)

    payload = {
        f"{prefix}summary": table(_summary_rows(result.summary)),
        f"{prefix}comparisons": table(result.comparisons),
        f"{prefix}equivalence": table(result.equivalence),
        f"{prefix}accuracy": wandb.Image(str(result.files["accuracy_png"])),
        f"{prefix}deltas": wandb.Image(str(result.files["deltas_png"])),
    }
    experiment.log(payload)
    return payload
