"""Accuracy per subgroup and the counterfactual rates (report/subgroups.py) against a direct computation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from activation_transfer.report.clustered import question_means_ci
from activation_transfer.report.subgroups import (
    counterfactual_markdown,
    counterfactual_rows,
    read_records,
    subgroup_markdown,
    subgroup_rows,
)

# (sample id, hops, candidates, correct per seed 42/123) of one condition; a second condition is deterministic.
FIXTURE = [
    ("q1", 2, 1, (1, 1)),
    ("q2", 2, 2, (1, 0)),
    ("q3", 3, 2, (0, 0)),
    ("q4", 3, 1, (1, 1)),
    ("q5", 4, 2, (0, 1)),
    ("q6", 4, None, (1, 1)),  # an untyped answer: no candidates
]


def _records() -> list[dict]:
    out = []
    for sid, hops, cand, correct in FIXTURE:
        diag = {} if cand is None else {"candidates": cand}
        for seed, ok in zip((42, 123), correct):
            out.append(
                {
                    "sample_id": sid,
                    "condition": "slots_functional",
                    "seed": seed,
                    "hops": hops,
                    "gold": "x",
                    "prediction": "x" if ok else "y",
                    "metrics": {"word_boundary_contains": bool(ok)},
                    "diagnostics": diag,
                }
            )
        out.append(
            {
                "sample_id": sid,
                "condition": "skyline",
                "seed": None,
                "hops": hops,
                "gold": "x",
                "prediction": "x",
                "metrics": {"word_boundary_contains": True},
                "diagnostics": diag,
            }
        )
    return out


def test_subgroup_accuracy_equals_a_direct_computation() -> None:
    rows = subgroup_rows(_records(), "candidates", resamples=400, seed=3)
    by = {(r["condition"], r["value"]): r for r in rows}
    assert set(by) == {("slots_functional", 1), ("slots_functional", 2), ("skyline", 1), ("skyline", 2)}
    two = by[("slots_functional", 2)]  # q2 (1, 0), q3 (0, 0), q5 (0, 1)
    assert two["accuracy"] == pytest.approx(np.mean([0.5, 0.0, 0.5])) and two["n"] == 3 and two["runs"] == 2
    assert (two["ci_low"], two["ci_high"]) == question_means_ci([0.5, 0.0, 0.5], 400, seed=3)
    assert by[("slots_functional", 1)]["accuracy"] == 1.0 and by[("skyline", 2)]["accuracy"] == 1.0
    hops = {(r["condition"], r["value"]): r["accuracy"] for r in subgroup_rows(_records(), "hops", resamples=50)}
    assert hops[("slots_functional", 2)] == 0.75 and hops[("slots_functional", 3)] == 0.5
    assert hops[("slots_functional", 4)] == 0.75
    overall = subgroup_rows(_records(), "all", resamples=50)
    assert overall[0]["value"] == "all" and overall[0]["accuracy"] == pytest.approx(8 / 12) and overall[0]["n"] == 6
    table = subgroup_markdown(rows)
    assert "| slots_functional | 1.000" in table and "candidates=2 (n)" in table


def test_the_clustered_ci_resamples_questions() -> None:
    # Direct: the same draws by hand.
    values = [0.0, 0.5, 1.0, 1.0]
    rng = np.random.default_rng(9)
    means = np.sort(np.asarray(values)[rng.integers(0, 4, size=(300, 4))].mean(axis=1))
    assert question_means_ci(values, 300, seed=9) == (float(means[int(0.025 * 299)]), float(means[int(0.975 * 299)]))
    with pytest.raises(ValueError, match="no questions"):
        question_means_ci([])


def test_counterfactual_rates_follow_the_new_gold_or_keep_the_old(tmp_path) -> None:
    recs = [
        {
            "sample_id": "a",
            "condition": "skyline",
            "seed": None,
            "gold": "Peru",
            "prediction": "Peru",
            "metrics": {},
            "diagnostics": {"gold_original": "Japan"},
        },
        {
            "sample_id": "b",
            "condition": "skyline",
            "seed": None,
            "gold": "Oslo",
            "prediction": "It is Lima",
            "metrics": {},
            "diagnostics": {"gold_original": "Lima"},
        },
        {
            "sample_id": "c",
            "condition": "skyline",
            "seed": None,
            "gold": "Asia",
            "prediction": "Europe",
            "metrics": {},
            "diagnostics": {"gold_original": "Africa"},
        },
        {
            "sample_id": "d",
            "condition": "skyline",
            "seed": None,
            "gold": "Asia",
            "prediction": "Asia",
            "metrics": {},
            "diagnostics": {},
        },  # not counterfactual: left out
    ]
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "skyline.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (row,) = counterfactual_rows(read_records([tmp_path]), resamples=50)
    assert row["condition"] == "skyline" and row["n"] == 3
    assert row["follows"] == pytest.approx(1 / 3) and row["keeps_old"] == pytest.approx(1 / 3)
    assert "| skyline | 0.333" in counterfactual_markdown([row])
