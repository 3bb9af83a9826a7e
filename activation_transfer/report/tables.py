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
from activation_transfer.report.tost import FEW_DIFFER
from activation_transfer.task.scoring import MAIN_METRIC

SUMMARY_COLUMNS = (
    "condition",
    "runs",
    "n",
    "metric",
    "mean",
    "sd",
    "ci_low",
    "ci_high",
    "ci_unit",
    "pooled_ci_low",
    "pooled_ci_high",
    "per_run",
    "bytes_per_question",
)
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
    if p < 1e-300:  # a normal tail underflows to 0.0 (or zero spread gives it exactly); never print "p = 0"
        return "< 1e-300"
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
    """The paper's main table: condition, runs, n, then mean +/- sample SD of each metric (main metric first); with
    records that say what crossed from the sender (split, KV), its bytes per question after n."""
    sent = any("bytes_per_question" in e for e in summary["conditions"].values())
    head = ["Condition", "Runs", "n", *(["Bytes/question"] if sent else []), *(METRIC_LABELS[m] for m in METRIC_ORDER)]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for cond, e in summary["conditions"].items():
        cells = [cond, str(e["runs"]), str(e["n"])]
        if sent:
            cells.append(f"{e['bytes_per_question']:.0f}" if "bytes_per_question" in e else "n/a")
        for m in METRIC_ORDER:
            v = e[m]
            cells.append(_f(v["mean"]) if v["sd"] is None else f"{_f(v['mean'])} ± {_f(v['sd'])}")
        lines.append("| " + " | ".join(cells) + " |")
    meta = summary["meta"]
    cost = "Bytes/question: what crossed from the sender (relay text, slot vectors or KV entries at their dtype). "
    return (
        "\n".join(lines)
        + f"\n\nValues are mean ± sample SD over runs (single runs: the run's value). Main metric: {MAIN_METRIC}. "
        + (cost if sent else "")
        + f"Scored from gold and prediction; seed {meta['seed']}.\n"
        + (f"\n{_runs_text(meta)}\n" if _runs_text(meta) else "")
    )


def _perm_p(c: Mapping) -> str:
    """A permutation p; at its floor ``1 / (P + 1)`` (no draw reached the observed delta) it is an upper bound."""
    floor = 1.0 / (c["permutations"] + 1)
    return f"≤ {_p(floor)}" if c["permutation_p"] <= floor else _p(c["permutation_p"])


def comparisons_markdown(comparisons: Sequence[Mapping], meta: Mapping, metric: str = MAIN_METRIC) -> str:
    """Paired-delta tables per baseline, main metric only (every metric is in ``comparisons.csv``/``.json``).

    Primary columns treat questions as the independent units (clustered CI, sign-flip p); the paper's pooled CI and
    McNemar p (runs x questions as independent pairs) follow, labelled pooled.
    """
    resamples, perms = meta["resamples"], meta.get("permutations", "?")
    out = [
        "# Paired comparisons",
        "",
        f"Δ = condition − baseline on {metric}, per question, matched by sample id (multi-run conditions: mean over "
        f"runs). **95% CI**: percentile bootstrap over questions, each draw keeping all runs of a question "
        f"({resamples} resamples). **p**: paired sign-flip permutation test on per-question mean deltas "
        f"({perms} permutations). Seed {meta['seed']}, one derived seed per comparison. Gained / lost: samples per "
        "run. **Pooled** (the paper's section 4.4): runs × questions pooled as independent pairs, 95% percentile "
        "bootstrap and continuity-corrected McNemar; kept for comparison with the paper, narrower than the data "
        "support when a condition has several runs. Other metrics: comparisons.csv / comparisons.json.",
        "",
    ]
    if _runs_text(meta):
        out += [_runs_text(meta), ""]
    for base in meta["baselines"]:
        rows = [c for c in comparisons if c["baseline"] == base and c["metric"] == metric]
        if not rows:
            continue
        out += [
            f"## vs {base}",
            "",
            "| Condition | Runs | Questions | Δ | 95% CI (questions) | p (sign-flip) | Gained / lost per run | "
            "Pooled pairs | Pooled 95% CI | Pooled McNemar p |",
            "| --- | ---: | ---: | ---: | --- | ---: | --- | ---: | --- | ---: |",
        ]
        for c in rows:
            out.append(
                f"| {c['condition']} | {c['runs']} | {c['n_samples']} | {_f(c['delta'], True)} | "
                f"[{_f(c['ci_low'], True)}, {_f(c['ci_high'], True)}] | {_perm_p(c)} | "
                f"{_per_run_fmt(c['gained_per_run'])} / {_per_run_fmt(c['lost_per_run'])} | {c['pooled_n_pairs']} | "
                f"[{_f(c['pooled_ci_low'], True)}, {_f(c['pooled_ci_high'], True)}] | {_p(c['pooled_mcnemar_p'])} |"
            )
        out.append("")
    return "\n".join(out)


def verdict(e: Mapping) -> str:
    """The TOST verdict of one equivalence row, in words; marked when so few questions differ that the normal
    approximation is rough (``tost.FEW_DIFFER``)."""
    words = "equivalent" if e["equivalent"] else "not shown equivalent"
    n_differ = e.get("n_differ")  # absent from equivalence.json written before it was recorded
    if n_differ is not None and 0 < n_differ < FEW_DIFFER:
        words += f" (approximate: {'1 question differs' if n_differ == 1 else f'{n_differ} questions differ'})"
    return words


def equivalence_markdown(equivalence: Sequence[Mapping], meta: Mapping, metric: str = MAIN_METRIC) -> str:
    """TOST per comparison and margin (main metric; every metric is in ``equivalence.csv``/``.json``)."""
    out = [
        "# Equivalence (TOST) and degradation",
        "",
        f"{metric}. Clustered view: each question's delta averaged over runs; two one-sided tests with a normal "
        f"approximation, 90% CI, α = {meta.get('tost_alpha', 0.05)} per one-sided test; equivalent when the 90% CI "
        "lies inside (−margin, +margin). When every delta is the same, the exact bound for deltas in [−1, 1] replaces "
        f"the approximation; a verdict is marked approximate when 1 to {FEW_DIFFER - 1} questions differ. Degradation "
        "p: one-sided test of Δ < 0. The margins were chosen after the paper's frozen rerun (not preregistered).",
        "",
    ]
    for base in meta["baselines"]:
        rows = [e for e in equivalence if e["baseline"] == base and e["metric"] == metric]
        if not rows:
            continue
        out += [
            f"## vs {base}",
            "",
            "| Condition | n | Δ | 90% CI | Margin | TOST p | Verdict | Degradation p |",
            "| --- | ---: | ---: | --- | ---: | ---: | --- | ---: |",
        ]
        for e in rows:
            out.append(
                f"| {e['condition']} | {e['n']} | {_f(e['delta'], True)} | "
                f"[{_f(e['ci90_low'], True)}, {_f(e['ci90_high'], True)}] | ±{e['margin']:g} | {_p(e['p'])} | "
                f"{verdict(e)} | {_p(e['degradation_p'])} |"
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
        f"sample ids once for every run of the condition, {low} and {high}. The CI is conditional on the condition's "
        "runs (its translators): each run's own fraction and their sample SD show how far another translator could "
        "move it.",
        "",
        "| Condition | Runs | n | Accuracy | Fraction | 95% CI | Per run (seed: fraction) | SD over runs |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for r in rows:
        ci = "n/a" if r["ci_low"] is None else f"[{_f(r['ci_low'], True)}, {_f(r['ci_high'], True)}]"
        per_run = ", ".join(f"{k}: {_f(v, True)}" for k, v in r.get("per_run", {}).items()) or "n/a"
        out.append(
            f"| {r['condition']} | {r['runs']} | {r['n']} | {_f(r['acc_condition'])} | {_f(r['fraction'], True)} "
            f"| {ci} | {per_run} | {_f(r.get('per_run_sd'))} |"
        )
    if rows:
        out += ["", f"{low}: {_f(rows[0]['acc_low'])}; {high}: {_f(rows[0]['acc_high'])}."]
    notes = [f"{r['condition']}: {r['note']}." for r in rows if r.get("note")]
    notes += [
        f"{r['condition']}: {r['undefined_resamples']} resample(s) with {high} not above {low}, ranked at the "
        "fraction's infinite ends (beyond the CI's percentiles)."
        for r in rows
        if r.get("undefined_resamples") and r["ci_low"] is not None
    ]
    notes += [
        f"{r['condition']}: the fraction, its accuracy and its CI use the {r['n']} ids common to all runs "
        f"({r['dropped']} left out)."
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
                    "ci_unit": v["ci_unit"],
                    "pooled_ci_low": v["pooled_ci_low"],
                    "pooled_ci_high": v["pooled_ci_high"],
                    "per_run": ";".join(f"{k}={x:.6g}" for k, x in v["per_run"].items()),
                    "bytes_per_question": e.get("bytes_per_question", ""),
                }
            )
    return rows
