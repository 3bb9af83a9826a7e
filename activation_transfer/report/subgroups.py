"""Accuracy per subgroup of questions (hops, candidates) and the counterfactual rates, from a run's records.

Most generated questions reduce to naming the one entity of the answer's type in the context; ``candidates`` (how
many the context names, recorded by the split protocol) says which questions do not. A counterfactual record (its
context states another answer, ``diagnostics.gold_original`` the old one) shows whether an answer follows the
context or what a model learnt. CIs resample questions with all their runs (seeds) together.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from activation_transfer.report.clustered import question_means_ci
from activation_transfer.task.scoring import MAIN_METRIC, word_boundary_contains

SUBGROUP_FIELDS = ("hops", "candidates")


def read_records(run_dirs: Iterable[str | Path]) -> list[dict]:
    """Every record of the finished runs of the given run folders (``records/*.jsonl``)."""
    out = []
    for run_dir in run_dirs:
        for path in sorted(Path(run_dir, "records").glob("*.jsonl")):
            # "\n" only, as written: str.splitlines also breaks at a U+2028 or U+0085 inside a prediction
            text = path.read_text(encoding="utf-8")
            out += [json.loads(line) for line in text.split("\n") if line.strip()]
    return out


def field_of(record: dict, field: str):
    """A record's top-level field, else its diagnostics' (``candidates``, ``gold_original``); None if absent."""
    if record.get(field) is not None:
        return record[field]
    return (record.get("diagnostics") or {}).get(field)


def _rate_row(by_question: dict[str, list[float]], resamples: int, seed: int) -> dict:
    per_question = [float(np.mean(v)) for _, v in sorted(by_question.items())]
    low, high = question_means_ci(per_question, resamples, seed=seed)
    runs = max(len(v) for v in by_question.values())
    return {"rate": float(np.mean(per_question)), "ci_low": low, "ci_high": high, "n": len(per_question), "runs": runs}


def subgroup_rows(
    records: Sequence[dict], field: str, metric: str = MAIN_METRIC, resamples: int = 2000, seed: int = 0
) -> list[dict]:
    """Accuracy per condition and value of ``field`` (``hops``, ``candidates``, or ``all``: one group of every
    record), records without it left out.

    Returns:
        Rows ``{condition, field, value, accuracy, ci_low, ci_high, n (questions), runs}``, by condition (in first
        appearance) then value.
    """
    groups: dict[tuple[str, object], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        value = "all" if field == "all" else field_of(r, field)
        if value is not None:
            groups[(r["condition"], value)][r["sample_id"]].append(float(bool(r["metrics"][metric])))
    order = {c: i for i, c in enumerate(dict.fromkeys(r["condition"] for r in records))}
    rows = []
    for cond, value in sorted(groups, key=lambda k: (order[k[0]], k[1])):
        row = _rate_row(groups[(cond, value)], resamples, seed)
        rows.append({"condition": cond, "field": field, "value": value, "accuracy": row.pop("rate"), **row})
    return rows


def counterfactual_rows(records: Sequence[dict], resamples: int = 2000, seed: int = 0) -> list[dict]:
    """Per condition, over counterfactual records: how often the answer names the substituted entity (follows the
    new context) and how often the original one (keeps the old answer), word-boundary contains, with CIs."""
    follows: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    keeps: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        old = field_of(r, "gold_original")
        if old is None:
            continue
        follows[r["condition"]][r["sample_id"]].append(float(word_boundary_contains(r["prediction"], r["gold"])))
        keeps[r["condition"]][r["sample_id"]].append(float(word_boundary_contains(r["prediction"], old)))
    rows = []
    for cond in follows:
        f, k = _rate_row(follows[cond], resamples, seed), _rate_row(keeps[cond], resamples, seed)
        rows.append(
            {
                "condition": cond,
                "follows": f["rate"],
                "follows_ci": [f["ci_low"], f["ci_high"]],
                "keeps_old": k["rate"],
                "keeps_old_ci": [k["ci_low"], k["ci_high"]],
                "n": f["n"],
                "runs": f["runs"],
            }
        )
    return rows


def subgroup_markdown(rows: Sequence[dict]) -> str:
    """A subgroup table: one line per condition, one column per value of the field."""
    if not rows:
        return "(no records carry this field)"
    field = rows[0]["field"]
    values = sorted({r["value"] for r in rows})
    cells = {(r["condition"], r["value"]): r for r in rows}
    names = ["accuracy [95% CI] (n)"] if values == ["all"] else [f"{field}={v} (n)" for v in values]
    head = f"| condition | {' | '.join(names)} |\n|---|" + "---|" * len(values)
    lines = [head]
    for cond in dict.fromkeys(r["condition"] for r in rows):
        parts = []
        for v in values:
            c = cells.get((cond, v))
            parts.append("" if c is None else f"{c['accuracy']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}] ({c['n']})")
        lines.append(f"| {cond} | {' | '.join(parts)} |")
    return "\n".join(lines)


def counterfactual_markdown(rows: Sequence[dict]) -> str:
    """The counterfactual rates as a table."""
    lines = ["| condition | follows new context [95% CI] | keeps old answer [95% CI] | n |", "|---|---|---|---|"]
    for r in rows:
        f, k = r["follows_ci"], r["keeps_old_ci"]
        lines.append(
            f"| {r['condition']} | {r['follows']:.3f} [{f[0]:.3f}, {f[1]:.3f}] | "
            f"{r['keeps_old']:.3f} [{k[0]:.3f}, {k[1]:.3f}] | {r['n']} |"
        )
    return "\n".join(lines)


__all__ = [
    "SUBGROUP_FIELDS",
    "counterfactual_markdown",
    "counterfactual_rows",
    "field_of",
    "read_records",
    "subgroup_markdown",
    "subgroup_rows",
]
