"""The report package: torch-free, one definition of per-condition accuracy, its plot reused by the W&B callback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from activation_transfer.report import (
    accuracy_figure,
    accuracy_summary,
    build_summary,
    condition_accuracy,
    group_records,
    load_records,
    run_report,
)
from activation_transfer.task.scoring import METRICS

ROOT = Path(__file__).resolve().parents[3]


def _recs(condition: str, seed: int | None, correct: list[bool]) -> list[dict]:
    return [
        {
            "sample_id": f"s{i}",
            "condition": condition,
            "seed": seed,
            "gold": "Paris",
            "prediction": "Paris." if ok else "Rome.",
        }
        for i, ok in enumerate(correct)
    ]


def test_the_report_runs_without_importing_torch(tmp_path: Path) -> None:
    # A fresh interpreter: this test session has long imported torch through other tests.
    records = _recs("no_inject", None, [True, False, True]) + _recs("additive", 1, [True, True, False])
    code = (
        "import json, sys\n"
        "from activation_transfer.report import run_report\n"
        "run_report(json.loads(sys.argv[1]), sys.argv[2], resamples=50)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'pytorch_lightning') if m in sys.modules)\n"
        "print('heavy:', heavy)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(records), str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "heavy: []"
    assert (tmp_path / "out" / "accuracy.png").exists()


def test_condition_accuracy_is_the_mean_of_run_accuracies_and_feeds_the_summary() -> None:
    recs = _recs("no_inject", None, [True, False, False, False])
    recs += _recs("c", 10, [True, True, True, False]) + _recs("c", 2, [True, False, False, False])
    groups = group_records(load_records(recs))
    acc = condition_accuracy(groups)
    assert list(acc) == ["no_inject", "c"] and set(acc["c"]) == set(METRICS)
    wb = acc["c"]["word_boundary_contains"]
    assert wb["per_run"] == {"2": 0.25, "10": 0.75}  # seeds in numeric order
    assert wb["mean"] == 0.5
    assert acc["no_inject"]["exact_match"] == {"mean": 0.0, "per_run": {"deterministic": 0.0}}
    summary = build_summary(groups, ["no_inject", "c"], resamples=20, seed=0)
    for cond in acc:
        for m in METRICS:
            assert summary[cond][m]["mean"] == acc[cond][m]["mean"]
            assert summary[cond][m]["per_run"] == acc[cond][m]["per_run"]


def _labels(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_yticklabels()]


def test_accuracy_plot_of_the_callback_is_the_reports(tmp_path: Path) -> None:
    from callbacks.eval_logging import accuracy_plot

    results = {
        "no_inject__deterministic": _recs("no_inject", None, [True, False]),
        "c__seed1": _recs("c", 1, [True, True]),
        "c__seed2": _recs("c", 2, [False, True]),
    }
    fig = accuracy_plot(results)
    assert _labels(fig) == ["no_inject (runs=1)", "c (runs=2)"]
    plt.close(fig)
    # With a report, its summary (CIs included) is what is drawn.
    report = run_report([r for rs in results.values() for r in rs], tmp_path, resamples=50)
    fig = accuracy_plot(results, report)
    assert _labels(fig) == _labels(accuracy_figure(report.summary))
    plt.close("all")
    # A strict run that kept no sample: a figure that says so, not an exception.
    fig = accuracy_plot({"c__seed1": []})
    assert "no records to plot" in [t.get_text() for t in fig.axes[0].texts]
    plt.close(fig)


def test_accuracy_summary_of_no_records_is_empty() -> None:
    assert accuracy_summary([]) == {"conditions": {}}
    with pytest.raises(ValueError, match="no 'gold'"):
        accuracy_summary([{"sample_id": "s", "condition": "c", "prediction": "x"}])
