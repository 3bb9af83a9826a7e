"""The report's bytes per question: the mean of the records' ``diagnostics.bytes_sent`` per condition, beside
accuracy in summary.json, summary.md and summary.csv; absent from a report whose records carry none."""

from __future__ import annotations

import csv

import pytest

from activation_transfer.report import ReportInputError, run_report


def _records(sent: dict[str, list[float | None]]) -> list[dict]:
    out = []
    for cond, values in sent.items():
        for i, b in enumerate(values):
            diag = {} if b is None else {"bytes_sent": b}
            gold, pred = "Peru", "Peru" if i % 2 else "Chile"
            out.append(
                {"sample_id": f"q{i}", "condition": cond, "seed": None, "gold": gold, "prediction": pred}
                | {"diagnostics": diag}
            )
    return out


def test_bytes_per_question_stand_beside_accuracy(tmp_path) -> None:
    sent = {"receiver_alone": [0, 0, 0, 0], "skyline": [0, 0, 0, 0], "slots_zero": [512, 768, 1024, 256]}
    result = run_report(_records(sent), tmp_path, resamples=20, tost_resamples=20, permutations=20)
    conditions = result.summary["conditions"]
    assert conditions["slots_zero"]["bytes_per_question"] == 640.0 and conditions["skyline"]["bytes_per_question"] == 0
    assert "| Condition | Runs | n | Bytes/question |" in result.markdown
    assert "| slots_zero | 1 | 4 | 640 |" in result.markdown
    with open(tmp_path / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {float(r["bytes_per_question"]) for r in rows if r["condition"] == "slots_zero"} == {640.0}


def test_records_without_bytes_give_the_table_as_before(tmp_path) -> None:
    records = _records({"receiver_alone": [None] * 4, "skyline": [None] * 4, "slots_zero": [None, 8, None, 8]})
    result = run_report(records, tmp_path, resamples=20, tost_resamples=20, permutations=20)
    assert "bytes_per_question" not in result.summary["conditions"]["skyline"]
    assert result.summary["conditions"]["slots_zero"]["bytes_per_question"] == 8.0  # over the records that say
    assert "| skyline | 1 | 4 | n/a |" in result.markdown
    none = run_report(_records({"receiver_alone": [None] * 4, "skyline": [None] * 4}), tmp_path / "none", resamples=20)
    assert "Bytes/question" not in none.markdown and "| Condition | Runs | n | " in none.markdown


@pytest.mark.parametrize("bad", [-1, "12", True, float("inf")])
def test_a_bad_bytes_sent_is_refused(tmp_path, bad) -> None:
    records = _records({"receiver_alone": [0, 0], "skyline": [0, bad]})
    with pytest.raises(ReportInputError, match="'diagnostics.bytes_sent' must be a number >= 0 or absent"):
        run_report(records, tmp_path, resamples=20)
