"""The documented report commands work on the project's own output (issue item 8).

``python report.py <run folder>/records --out R`` and ``python report.py <run folder> --out R``: the strict-matched
control holds fewer samples by design, a run folder also holds meta.json, config.yaml and report/, and bad input is
one line with exit status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from test_report import EXPECTED_FILES, main  # report.py's main, loaded by path

from activation_transfer.report import ReportInputError, run_report

STRICT = "shuffled_translation_strict_matched"


def _recs(condition: str, seed: int | None, ids, correct=None) -> list[dict]:
    return [
        {
            "sample_id": sid,
            "condition": condition,
            "seed": seed,
            "gold": "Paris",
            "hops": 2,
            "prediction": "Paris." if (correct is None or correct[k]) and k % 3 else "Rome.",
            "metrics": {},
            "diagnostics": {"prompt_len": 9},
        }
        for k, sid in enumerate(ids)
    ]


def _run_folder(tmp_path: Path) -> Path:
    """An evaluation run folder as the module writes it (activation_transfer.report.records layout)."""
    run = tmp_path / "runs" / "eval-0123456789ab"
    ids = [f"mh_{i:03d}" for i in range(12)]
    files = {"no_inject__deterministic": _recs("no_inject", None, ids)}
    files["nl_relay__deterministic"] = _recs("nl_relay", None, ids, [i % 2 == 0 for i in range(12)])
    for seed in (42, 123):
        files[f"shuffled_translation__seed{seed}"] = _recs("shuffled_translation", seed, ids)
        files[f"{STRICT}__seed{seed}"] = _recs(STRICT, seed, ids[2:])  # two samples alone in their length bucket
    for stem, recs in files.items():
        path = run / "records" / f"{stem}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run / "meta.json").write_text(json.dumps({"fingerprint": "x", "conditions": ["no_inject"]}, indent=2))
    (run / "config.yaml").write_text("model:\n  seeds: [42, 123]\n")
    run_report([run / "records"], run / "report", resamples=20, intersect=True)  # what the module writes
    return run


@pytest.mark.parametrize("sub", ["records", "."])
def test_report_on_a_run_folder_and_its_records(tmp_path: Path, capsys, sub: str) -> None:
    run = _run_folder(tmp_path)
    out = tmp_path / "R"
    assert main([str(run / sub), "--out", str(out), "--resamples", "50"]) == 0
    printed = capsys.readouterr().out
    assert f"{STRICT} vs no_inject: a strict-matched subset by design: dropped 4" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["conditions"][STRICT]["n"] == 10 and summary["conditions"]["no_inject"]["n"] == 12
    assert summary["meta"]["n_records"] == 2 * 12 + 2 * 12 + 2 * 10  # meta.json and report/ were not read
    strict = next(
        c
        for c in json.loads((out / "comparisons.json").read_text())
        if c["condition"] == STRICT and c["baseline"] == "no_inject"
    )
    assert (strict["n_samples"], strict["pooled_n_pairs"], strict["dropped"]) == (10, 20, 4)
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES


def test_json_files_that_hold_no_records_are_skipped_in_a_folder_but_refused_by_name(tmp_path: Path) -> None:
    run = _run_folder(tmp_path)
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in (run / "records").iterdir():
        (flat / f.name).write_text(f.read_text())
    for f in ("meta.json",):
        (flat / f).write_text((run / f).read_text())
    (flat / "comparisons.json").write_text((run / "report" / "comparisons.json").read_text())
    res = run_report([flat], tmp_path / "o", resamples=20)
    assert any("skipped 2 JSON file(s) that hold no records: comparisons.json, meta.json" in n for n in res.notes)
    with pytest.raises(ReportInputError, match=r"meta\.json: not per-sample records"):
        run_report([flat / "meta.json"], tmp_path / "o2")


def test_strict_subset_without_intersect_but_other_mismatches_still_refused(tmp_path: Path) -> None:
    ids = [f"s{i}" for i in range(6)]
    recs = _recs("no_inject", None, ids) + _recs(STRICT, 42, ids[1:])
    res = run_report(recs, tmp_path / "a", resamples=20)
    assert next(c for c in res.comparisons if c["condition"] == STRICT)["n_samples"] == 5
    with pytest.raises(ReportInputError, match="differ in sample ids"):  # a sample the baseline lacks
        run_report(recs + _recs(STRICT, 42, ["extra"]), tmp_path / "b")
    with pytest.raises(ReportInputError, match="pass --intersect"):  # any other condition: as before
        run_report(_recs("no_inject", None, ids) + _recs("shuffled_translation", 42, ids[1:]), tmp_path / "c")


def test_out_pointing_to_a_file_is_one_error_line(tmp_path: Path, capsys) -> None:
    run = tmp_path / "r.jsonl"
    run.write_text("".join(json.dumps(r) + "\n" for r in _recs("no_inject", None, ["a", "b"])))
    target = tmp_path / "report.txt"
    target.write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        main([str(run), "--out", str(target)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"report.py: error: --out {target} is a file, not a folder: name a folder (it is created if absent)"
    ]
    assert target.read_text() == "keep me"
    with pytest.raises(SystemExit) as exc:  # a folder under a file cannot be created
        main([str(run), "--out", str(target / "sub"), "--resamples", "20"])
    assert exc.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(ReportInputError, match="no such file"):
        main([str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--debug"])


def test_report_files_are_world_readable(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        res = run_report(_recs("no_inject", None, ["a", "b"]), tmp_path / "out", resamples=20)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in res.files.values()}
    assert set(modes) == EXPECTED_FILES and set(modes.values()) == {0o644}, modes


def test_the_console_prints_the_question_clustered_comparisons(tmp_path: Path, capsys) -> None:
    run = _run_folder(tmp_path)
    out = tmp_path / "R"
    assert main([str(run), "--out", str(out), "--resamples", "50", "--permutations", "99"]) == 0
    printed = capsys.readouterr().out
    row = next(
        c
        for c in json.loads((out / "comparisons.json").read_text())
        if (c["condition"], c["baseline"], c["metric"]) == ("nl_relay", "no_inject", "word_boundary_contains")
    )
    assert row["permutations"] == 99
    assert "| Condition | Runs | Questions | Δ | 95% CI (questions) | p (sign-flip) |" in printed
    assert f"| nl_relay | 1 | 12 | {row['delta']:+.4f} | [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}] |" in printed
