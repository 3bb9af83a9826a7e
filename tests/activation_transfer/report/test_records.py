"""Per-sample records (report/records.py): scoring of a record, file order, torn lines; values written by hand."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from activation_transfer.report import records as rio


def _rec(sid: str, prediction: str = "Paris") -> dict:
    sample = SimpleNamespace(sample_id=sid, answer="Paris", hops=2)
    return rio.make_record(sample, "additive", 42, prediction, {"prompt_len": 7})


def test_a_record_scores_its_prediction_against_its_gold():
    sample = SimpleNamespace(sample_id="s1", answer="Japan", hops=3)
    rec = rio.make_record(sample, "replace", 123, "They are Japanese.", {"prompt_len": 5})
    assert list(rec) == list(rio.RECORD_FIELDS)
    assert (rec["gold"], rec["prediction"], rec["hops"], rec["seed"]) == ("Japan", "They are Japanese.", 3, 123)
    # "Japanese" holds "japan" as a substring but not as a word (PAPER.md, the metrics): scored the other way round
    # (the gold searched for the prediction) every containment metric would be False.
    assert rec["metrics"] == {
        "exact_match": False,
        "normalized_exact_match": False,
        "word_boundary_contains": False,
        "first_answer_span_match": False,
        "legacy_contains": True,
    }
    rec = rio.make_record(sample, "replace", 123, "Japan, in Asia", {})
    assert rec["metrics"]["word_boundary_contains"] and not rec["metrics"]["exact_match"]


def test_records_are_written_sorted_by_sample_id_and_read_back(tmp_path):
    path = rio.records_path(tmp_path, "additive", 42)
    assert path == tmp_path / "records" / "additive__seed42.jsonl"
    rio.write_records(path, [_rec("s3"), _rec("s1", "Rome"), _rec("s2")])
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["sample_id"] for line in lines] == ["s1", "s2", "s3"]
    assert [r["prediction"] for r in rio.read_records(path)] == ["Rome", "Paris", "Paris"]
    with pytest.raises(ValueError, match="duplicate sample ids"):
        rio.write_records(path, [_rec("s1"), _rec("s1")])


def test_only_a_torn_last_line_is_tolerated(tmp_path):
    good = [json.dumps(_rec(s)) for s in ("a", "b")]
    tail = tmp_path / "tail.jsonl"
    tail.write_text(good[0] + "\n" + good[1] + "\n" + good[0][:20], encoding="utf-8")
    assert [r["sample_id"] for r in rio.read_records(tail, tolerate_torn_tail=True)] == ["a", "b"]
    with pytest.raises(ValueError, match=r"tail.jsonl:3: not valid JSON"):
        rio.read_records(tail)
    middle = tmp_path / "middle.jsonl"
    middle.write_text(good[0] + "\n" + good[0][:20] + "\n" + good[1] + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"middle.jsonl:2: not valid JSON"):  # damage, not a crash mid-write
        rio.read_records(middle, tolerate_torn_tail=True)
