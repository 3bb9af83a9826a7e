"""``records_to_dataframe``: a run folder's records as one long table; a clear error without pandas."""

from __future__ import annotations

import sys

import pytest

from activation_transfer.report import records as rio
from activation_transfer.report.frame import record_rows, records_to_dataframe
from activation_transfer.task.scoring import METRICS


def _run_folder(tmp_path):
    def rec(sid, condition, seed, prediction):
        return {
            "sample_id": sid,
            "condition": condition,
            "seed": seed,
            "gold": "Paris",
            "prediction": prediction,
            "hops": 2,
            "metrics": {m: prediction == "Paris" for m in METRICS},
            "diagnostics": {"receiver_norm_mean": 3.5, "donor_id": None},
        }

    rio.write_records(
        rio.records_path(tmp_path, "no_inject", None),
        [rec("a", "no_inject", None, "Paris"), rec("b", "no_inject", None, "Rome")],
    )
    rio.write_records(rio.records_path(tmp_path, "additive", 42), [rec("a", "additive", 42, "Rome")])
    return tmp_path


def test_rows_are_one_per_sample_condition_and_seed(tmp_path):
    rows = record_rows(_run_folder(tmp_path))
    assert [(r["condition"], r["seed"], r["sample_id"]) for r in rows] == [
        ("additive", 42, "a"),
        ("no_inject", None, "a"),
        ("no_inject", None, "b"),
    ]
    assert list(rows[0])[:6] == ["sample_id", "condition", "seed", "gold", "prediction", "hops"]
    assert rows[1]["word_boundary_contains"] is True and rows[2]["exact_match"] is False
    assert rows[0]["diag/receiver_norm_mean"] == 3.5 and "diag/donor_id" in rows[0]
    assert record_rows(tmp_path / "records") == rows  # the records folder itself works too
    with pytest.raises(FileNotFoundError, match="not an evaluation run folder"):
        record_rows(tmp_path / "empty")


def test_a_clear_error_without_pandas(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "pandas", None)  # what an absent package looks like to `import`
        with pytest.raises(ImportError, match="pip install pandas"):
            records_to_dataframe(_run_folder(tmp_path))


def test_dataframe(tmp_path):
    pytest.importorskip("pandas", reason="pandas is optional (not a dependency of the project)")
    frame = records_to_dataframe(_run_folder(tmp_path))
    assert len(frame) == 3 and str(frame["seed"].dtype) == "Int64"
    assert frame.groupby("condition")["word_boundary_contains"].mean().to_dict() == {"additive": 0.0, "no_inject": 0.5}
