"""The report's text renderings: markdown tables in the paper's layout, CSV and JSON.

Numbers are printed to 4 decimals, p-values to 3 significant digits (scientific below 0.001).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from activation_transfer.report.analysis import METRIC_ORDER
from activation_transfer.report.gap import GAP_HIGH, GAP_LOW
from activation_transfer.task.scoring import MAIN_METRIC

SUMMARY_COLUMNS = ("condition", "runs", "n", "metric", "mean", "sd", "ci_low", "ci_high", "per_run")
METRIC_LABELS = {
    "exact_match": "Exact match",
    "normalized_exact_match": "Normalized EM",
    "word_boundary_contains": "Word-boundary contains",
    "first_answer_span_match": "First-answer span",
    "legacy_contains": "Legacy contains",
}


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


def _runs_text(meta: Mapping) -> str:
    """What the report did about runs that may be one computation (empty when nothing): see ``load.RunCollapse``."""
    parts = [
        f"{cond}: seeds {', '.join(same)} are one translator's answers to a condition that ignores the seed, "
        f"counted once (run {kept})."
        for cond, merged in meta.get("collapsed_runs", {}).items()
        for kept, same in merged.items()
    ]
    text = ("One computation, one run: " + " ".join(parts)) if parts else ""
    warn = [
        f"{cond}: seeds {', '.join(same)} give identical answers but carry no translator identity; if one translator "
        "produced them they are one run, and the pooled statistics here are too narrow."
        for cond, twins in meta.get("unnamed_identical_runs", {}).items()
        for same in twins
    ]
    return "\n\n".join(t for t in (text, ("**Warning**: " + " ".join(warn)) if warn else "") if t)


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
        + (f"\n{_runs_text(meta)}\n" if _runs_text(meta) else "")
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
    if _runs_text(meta):
        out += [_runs_text(meta), ""]
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


def gap_markdown(rows: Sequence[Mapping], meta: Mapping) -> str:
    """The "Fraction of the gap recovered" section: one row per condition, its accuracy, fraction and 95% CI."""
    first = rows[0] if rows else {"low": GAP_LOW, "high": GAP_HIGH, "metric": MAIN_METRIC}
    low, high, metric = first["low"], first["high"], first["metric"]
    out = [
        "# Fraction of the gap recovered",
        "",
        f"(acc(condition) − acc({low})) / (acc({high}) − acc({low})): 0 is {low}, 1 is {high}. Accuracies are the "
        f"summary's ({metric}). {int(meta['confidence'] * 100)}% simple percentile bootstrap over questions, "
        f"{meta['resamples']} resamples (seed {meta['seed']}, one derived seed per condition): each resample draws "
        f"sample ids once for every run of the condition, {low} and {high}.",
        "",
        "| Condition | Runs | n | Accuracy | Fraction | 95% CI |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        ci = "n/a" if r["ci_low"] is None else f"[{_f(r['ci_low'], True)}, {_f(r['ci_high'], True)}]"
        out.append(
            f"| {r['condition']} | {r['runs']} | {r['n']} | {_f(r['acc_condition'])} | {_f(r['fraction'], True)} "
            f"| {ci} |"
        )
    if rows:
        out += ["", f"{low}: {_f(rows[0]['acc_low'])}; {high}: {_f(rows[0]['acc_high'])}."]
    notes = [f"{r['condition']}: {r['note']}." for r in rows if r.get("note")]
    notes += [
        f"{r['condition']}: {r['undefined_resamples']} resample(s) with {high} not above {low} left out of the CI."
        for r in rows
        if r.get("undefined_resamples")
    ]
    notes += [
        f"{r['condition']}: the CI uses the {r['n']} ids common to all runs ({r['dropped']} left out)."
        for r in rows
        if r.get("dropped")
    ]
    return "\n".join(out + ([""] + notes if notes else [])) + "\n"


def json_text(obj: Any) -> str:
    """Indented JSON with a final newline; NaN or infinity is an error (strict JSON readers reject them)."""
    return json.dumps(obj, indent=2, allow_nan=False) + "\n"


def csv_text(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    """CSV of ``rows`` with the header ``columns``; list and dict cells as JSON, keys outside ``columns`` dropped."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (json.dumps(v) if isinstance(v, list | dict) else v) for k, v in row.items()})
    return buf.getvalue()


def summary_rows(summary: Mapping) -> list[dict]:
    """One row per condition and metric (the rows of ``summary.csv``), metrics in table order."""
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
