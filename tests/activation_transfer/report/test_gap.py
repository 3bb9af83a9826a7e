"""report.gap: the fraction of the receiver_alone -> skyline gap recovered, and its question-clustered bootstrap CI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from test_report import EXPECTED_FILES, _records, _write_jsonl, main  # report.py's main, loaded by path

from activation_transfer.report import ReportResult, condition_accuracy, gap_recovered, run_report
from activation_transfer.report import gap as gap_module
from activation_transfer.report.run import _gap_notes
from activation_transfer.report.stats import derive_seed
from activation_transfer.task.scoring import MAIN_METRIC, METRICS

LOW, HIGH = "receiver_alone", "skyline"
GAP_FILES = {f"gap_recovered.{ext}" for ext in ("json", "csv", "md", "png", "svg")}


def _run(correct, ids=None) -> dict[str, dict[str, bool]]:
    """One run: ``{sample_id: {metric: bool}}`` with every metric equal to the given correctness."""
    ids = ids if ids is not None else [f"q{i:04d}" for i in range(len(correct))]
    return {sid: dict.fromkeys(METRICS, bool(ok)) for sid, ok in zip(ids, correct)}


def _groups(low, high, **conds) -> dict:
    """Groups with a deterministic floor and ceiling; each condition is a list of runs (seeds 42, 123, 456)."""
    out = {LOW: {"deterministic": _run(low)}, HIGH: {"deterministic": _run(high)}}
    for name, runs in conds.items():
        out[name] = {str(seed): _run(r) for seed, r in zip((42, 123, 456), runs)}
    return out


def _random(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A floor near 0.3, a ceiling near 0.7 (never below the floor on a question), and a condition near 0.5."""
    rng = np.random.default_rng(seed)
    low = rng.random(n) < 0.3
    high = low | (rng.random(n) < 0.57)
    cond = np.where(high & ~low, rng.random(n) < 0.5, low)
    return low, high, cond


def _width(row: dict) -> float:
    return row["ci_high"] - row["ci_low"]


# ------------------------------------------------------------------------------------------------ point and CI


def test_point_estimate_is_exact_and_agrees_with_the_summary() -> None:
    low = [True, False, False, False] * 25  # 0.25
    high = [True, True, True, False] * 25  # 0.75
    runs = [[True, True, False, False] * 25, [True, True, True, False] * 25]  # 0.5 and 0.75: mean 0.625
    groups = _groups(low, high, c=runs)
    (row,) = gap_recovered(groups, resamples=500, seed=7)
    assert row["fraction"] == (0.625 - 0.25) / 0.5 == 0.75
    acc = condition_accuracy(groups)
    assert (row["acc_condition"], row["acc_low"], row["acc_high"]) == tuple(
        acc[c][MAIN_METRIC]["mean"] for c in ("c", LOW, HIGH)
    )
    assert row["bootstrap_seed"] == derive_seed(7, f"c|gap|{LOW}|{HIGH}|{MAIN_METRIC}")
    assert (row["condition"], row["metric"], row["low"], row["high"]) == ("c", MAIN_METRIC, LOW, HIGH)
    assert (row["runs"], row["n"], row["resamples"], row["confidence"]) == (2, 100, 500, 0.95)
    assert set(row) == set(gap_module.GAP_COLUMNS) - {"dropped", "undefined_resamples", "note"}
    assert row["ci_low"] <= row["fraction"] <= row["ci_high"]


def test_identical_to_skyline_is_one_and_to_receiver_alone_zero() -> None:
    low, high, _ = _random(80)
    groups = _groups(low, high, like_sky=[high] * 3, like_alone=[low], sky_and_alone=[high, low])
    rows = {r["condition"]: r for r in gap_recovered(groups, resamples=1000)}
    assert list(rows) == ["like_sky", "like_alone", "sky_and_alone"]  # groups order, floor and ceiling left out
    # The point reads the summary's run means, which can be an ulp off for identical runs (mean of three equal
    # floats); the CI is computed in integer counts, so it is exact.
    assert rows["like_sky"]["fraction"] == pytest.approx(1.0, abs=1e-12)
    assert rows["like_sky"]["ci_low"] == rows["like_sky"]["ci_high"] == 1.0
    assert (rows["like_alone"]["fraction"], rows["like_alone"]["ci_low"], rows["like_alone"]["ci_high"]) == (0, 0, 0)
    # One run as the ceiling, one as the floor: exactly half in every resample, because both runs are resampled on
    # the same questions (runs resampled apart would scatter around 0.5).
    half = rows["sky_and_alone"]
    assert half["fraction"] == pytest.approx(0.5) and half["ci_low"] == half["ci_high"] == pytest.approx(0.5)


def test_ci_contains_the_point_and_narrows_as_n_grows() -> None:
    widths = []
    for n in (100, 1600):
        low, high, cond = _random(n, seed=n)
        (row,) = gap_recovered(_groups(low, high, c=[cond]), resamples=1000)
        assert row["ci_low"] < row["fraction"] < row["ci_high"]
        widths.append(_width(row))
    assert widths[1] < widths[0] / 2  # 16x the questions: about a quarter of the width


def test_same_seed_same_rows_and_chunking_changes_nothing(monkeypatch) -> None:
    low, high, cond = _random(60)
    groups = _groups(low, high, c=[cond, high, low])
    a = gap_recovered(groups, resamples=700, seed=3)
    assert a == gap_recovered(groups, resamples=700, seed=3)
    assert (a[0]["ci_low"], a[0]["ci_high"]) != tuple(
        gap_recovered(groups, resamples=700, seed=4)[0][k] for k in ("ci_low", "ci_high")
    )
    # Index matrices drawn 4 resamples at a time continue the same random stream as one 700 x 60 matrix.
    monkeypatch.setattr(gap_module, "_CHUNK_ENTRIES", 4 * 60)
    assert gap_recovered(groups, resamples=700, seed=3) == a


def test_resampling_is_paired_by_question() -> None:
    # The condition is the ceiling except on 4 of 400 questions: the three accuracies move together from one
    # resample to the next, so the fraction hardly moves; resampled apart, each accuracy's own noise (SD ~0.023
    # on a gap of ~0.4) would spread it widely.
    n, resamples = 400, 2000
    low, high, _ = _random(n, seed=1)
    cond = high.copy()
    cond[np.flatnonzero(high & ~low)[:4]] = False
    (row,) = gap_recovered(_groups(low, high, c=[cond]), resamples=resamples, seed=0)

    rng = np.random.default_rng(0)
    means = [x.astype(float)[rng.integers(0, n, size=(resamples, n))].mean(axis=1) for x in (cond, low, high)]
    unpaired = np.sort((means[0] - means[1]) / (means[2] - means[1]))
    bound = unpaired[int(0.975 * (resamples - 1))] - unpaired[int(0.025 * (resamples - 1))]
    assert bound > 0.15  # the unpaired bootstrap is wide here...
    assert _width(row) < bound / 5  # ...the paired one is not
    # Paired, the fraction is 1 - (questions lost) / (gap questions) in every resample: never above 1.
    assert 0.9 < row["ci_low"] <= row["fraction"] <= row["ci_high"] <= 1.0


def test_ci_is_the_percentile_of_the_fraction_over_resampled_questions() -> None:
    # A second implementation, from the definition (gap_recovered's docstring): each resample draws question ids
    # with replacement (one matrix from default_rng(bootstrap_seed), shared by every run of the condition, the floor
    # and the ceiling), computes each run's accuracy there in floats, averages the condition's runs, and takes
    # (acc_c - acc_low) / (acc_high - acc_low); the CI reads the sorted fractions at int(q * (B - 1)) and
    # int((1 - q) * (B - 1)), q = 0.025.
    n, resamples = 60, 400
    low, high, cond = _random(n, seed=5)
    cond2 = np.where(np.arange(n) % 2 == 0, high, cond)
    (row,) = gap_recovered(_groups(low, high, c=[cond, cond2]), resamples=resamples, seed=9)
    idx = np.random.default_rng(row["bootstrap_seed"]).integers(0, n, size=(resamples, n))
    acc = {k: v.astype(float)[idx].mean(axis=1) for k, v in dict(low=low, high=high, c1=cond, c2=cond2).items()}
    gap = acc["high"] - acc["low"]
    assert (gap > 0).all()  # no undefined resample in this fixture
    fractions = np.sort(((acc["c1"] + acc["c2"]) / 2 - acc["low"]) / gap)
    lo_i, hi_i = int(0.025 * (resamples - 1)), int(0.975 * (resamples - 1))
    # Not a degenerate fixture: the neighbours of both percentile indices hold other values.
    assert fractions[lo_i - 1] < fractions[lo_i] < fractions[lo_i + 1]
    assert fractions[hi_i - 1] < fractions[hi_i] < fractions[hi_i + 1]
    assert row["ci_low"] == pytest.approx(fractions[lo_i], rel=1e-12)
    assert row["ci_high"] == pytest.approx(fractions[hi_i], rel=1e-12)


# ------------------------------------------------------------------------------------------------ edge cases


def test_absent_floor_or_ceiling_gives_no_rows() -> None:
    groups = _groups([True, False], [True, True], c=[[True, False]])
    assert gap_recovered({k: v for k, v in groups.items() if k != HIGH}) == []
    assert gap_recovered({k: v for k, v in groups.items() if k != LOW}) == []
    assert gap_recovered(groups, low="no_inject") == []


def test_gap_of_zero_or_less_has_no_fraction() -> None:
    for low, high in (([True, False, True], [True, False, True]), ([True, True, False], [True, False, False])):
        (row,) = gap_recovered(_groups(low, high, c=[[True, True, True]]), resamples=50)
        assert row["fraction"] is None and row["ci_low"] is None and row["ci_high"] is None
        assert "undefined" in row["note"] and "undefined_resamples" not in row


def test_resamples_without_a_gap_make_the_ci_unbounded_when_a_percentile_lands_on_one() -> None:
    # The ceiling beats the floor on one question of 20: about (19/20)^20 = 36% of resamples miss it, so the gap's
    # own CI contains 0 and the fraction's interval has no finite end (Fieller): no CI, a note says why.
    low = [False] * 10 + [True] * 10
    high = [True] + [False] * 9 + [True] * 10
    (row,) = gap_recovered(_groups(low, high, c=[high]), resamples=1000)
    assert 200 < row["undefined_resamples"] < 500 and row["fraction"] == 1.0
    assert row["ci_low"] is None and row["ci_high"] is None and "unbounded" in row["note"]
    # On 4 questions of 20: about (16/20)^20 = 1.2% of resamples miss them all, fewer than the 2.5% beyond each
    # percentile, so the CI is finite (every other resample gives exactly 1) and the undefined ones are counted.
    high = [True] * 4 + [False] * 6 + [True] * 10
    (row,) = gap_recovered(_groups(low, high, c=[high]), resamples=1000)
    assert 0 < row["undefined_resamples"] < 25 and "note" not in row
    assert row["fraction"] == row["ci_low"] == row["ci_high"] == 1.0
    # The report's note says what happened to them: ranked, not left out (as it used to say).
    (note,) = _gap_notes([{**row, "condition": "c", "low": "low", "high": "high"}])
    assert note.endswith(
        "had high not above low; they are ranked at the infinity of their numerator's sign, not left out"
    )


def test_an_undefined_resample_ranks_on_its_numerators_side() -> None:
    # Condition below the floor wherever the ceiling is not above it: undefined resamples rank at -inf, so the
    # lower end is the one that goes unbounded, and the same data with the condition above gives +inf.
    low = [False] * 10 + [True] * 10
    high = [True] + [False] * 9 + [True] * 10
    cond = [True] + [False] * 10 + [True] * 9  # right where the ceiling gains, wrong on one the floor gets
    ranks = gap_module._bootstrap(_groups(low, high, c=[cond]), "c", LOW, HIGH, sorted(_run(low)), MAIN_METRIC, 1000, 3)
    assert ranks[0] is None and ranks[2] > 200


def test_ids_not_common_to_every_run_are_left_out_of_the_fraction_and_its_ci() -> None:
    low, high, cond = _random(50)
    groups = _groups(low, high, c=[cond, cond])
    del groups["c"]["123"]["q0003"]  # one run of the condition misses a question
    (row,) = gap_recovered(groups, resamples=200)
    assert (row["n"], row["dropped"]) == (49, 1)
    common = {
        c: {r: {i: v for i, v in s.items() if i != "q0003"} for r, s in runs.items()} for c, runs in groups.items()
    }
    acc = {c: a[MAIN_METRIC]["mean"] for c, a in condition_accuracy(common).items()}
    assert row["fraction"] == (acc["c"] - acc[LOW]) / (acc[HIGH] - acc[LOW])
    assert (row["acc_condition"], row["acc_low"], row["acc_high"]) == (acc["c"], acc[LOW], acc[HIGH])


def test_a_floor_measured_on_other_questions_does_not_unpair_the_fraction() -> None:
    # The floor is right only on the 10 ids the condition lacks: on every sample the floor reads 0.1, but on the
    # common ids 0 (ceiling 45/90, condition 22/90). Read unpaired (0.321), the fraction fell outside its own CI
    # (and the plot's error bar went negative).
    n = 100
    low = [i < 10 for i in range(n)]
    high = [i < 10 or i % 2 == 0 for i in range(n)]
    cond = [i % 4 == 0 for i in range(n)]
    groups = _groups(low, high, c=[cond])
    groups["c"]["42"] = {k: v for k, v in groups["c"]["42"].items() if int(k[1:]) >= 10}
    (row,) = gap_recovered(groups, resamples=2000)
    assert row["acc_low"] == 0.0 and row["dropped"] == 10
    assert row["fraction"] == pytest.approx(22 / 45) and row["ci_low"] <= row["fraction"] <= row["ci_high"]


def test_bad_arguments() -> None:
    groups = _groups([False, True], [True, True], c=[[True, True]])
    with pytest.raises(ValueError, match="unknown metric"):
        gap_recovered(groups, metric="accuracy")
    with pytest.raises(ValueError, match="both"):
        gap_recovered(groups, low=HIGH)
    with pytest.raises(ValueError, match="resamples"):
        gap_recovered(groups, resamples=0)


# ------------------------------------------------------------------------------------------------ in the report


def _split_records(n: int = 40) -> list[dict]:
    low, high, cond = _random(n, seed=2)
    recs = _records(LOW, None, low.tolist()) + _records(HIGH, None, high.tolist())
    recs += _records("nl_relay", None, cond.tolist())  # split runs evaluate nl_relay too
    recs += _records("slots_self", None, high.tolist())
    for k, seed in enumerate((42, 123, 456)):  # three different runs: the ceiling on a third of the questions each
        recs += _records("slots_translated", seed, np.where(np.arange(n) % 3 == k, high, cond).tolist())
    return recs


def test_report_on_split_records_compares_with_receiver_alone_and_skyline(tmp_path: Path, capsys) -> None:
    path = _write_jsonl(tmp_path / "split.jsonl", _split_records())
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out), "--resamples", "300", "--margins", "0.1"]) == 0
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES | GAP_FILES
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["baselines"] == [LOW, HIGH]
    comparisons = json.loads((out / "comparisons.json").read_text())
    assert {c["baseline"] for c in comparisons} == {LOW, HIGH}

    rows = json.loads((out / "gap_recovered.json").read_text())
    assert [r["condition"] for r in rows] == ["nl_relay", "slots_self", "slots_translated"]
    by = {r["condition"]: r for r in rows}
    assert by["slots_self"]["fraction"] == by["slots_self"]["ci_low"] == 1.0 and by["slots_translated"]["runs"] == 3
    for r in rows:  # the summary's accuracies, exactly
        assert r["acc_condition"] == summary["conditions"][r["condition"]][MAIN_METRIC]["mean"]
        assert r["acc_low"] == summary["conditions"][LOW][MAIN_METRIC]["mean"]
    with open(out / "gap_recovered.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["condition"] for t in table] == [r["condition"] for r in rows]
    assert float(table[2]["fraction"]) == pytest.approx(rows[2]["fraction"]) and table[0]["dropped"] == ""
    md = (out / "gap_recovered.md").read_text()
    assert md.startswith("# Fraction of the gap recovered") and "| slots_self | 1 | 40 |" in md


def test_run_report_returns_the_gap_rows_and_keeps_its_positional_fields(tmp_path: Path) -> None:
    recs = _split_records()
    res = run_report(recs, tmp_path / "a", resamples=200)
    assert res.gap_recovered == json.loads((tmp_path / "a" / "gap_recovered.json").read_text())
    assert {"gap_recovered_json", "gap_recovered_csv", "gap_recovered_md"} <= set(res.files)
    # Whatever the baselines: the gap needs only the floor and the ceiling in the input.
    assert run_report(recs, tmp_path / "b", resamples=200, baselines=["nl_relay"]).gap_recovered == res.gap_recovered
    legacy = ReportResult(res.summary, res.comparisons, res.equivalence, res.files, res.markdown, res.notes)
    assert legacy.gap_recovered == []
    # Paper records: no gap files, no gap rows.
    paper = _records("no_inject", None, [True, False, True]) + _records("c", 1, [True, True, True])
    res = run_report(paper, tmp_path / "p", resamples=50)
    assert res.gap_recovered == [] and {p.name for p in (tmp_path / "p").iterdir()} == EXPECTED_FILES


def test_default_baselines_with_only_one_split_baseline(tmp_path: Path) -> None:
    recs = [r for r in _split_records() if r["condition"] != HIGH]
    res = run_report(recs, tmp_path, resamples=50)
    assert res.summary["meta"]["baselines"] == [LOW] and any(HIGH in n and "skipped" in n for n in res.notes)
    assert res.gap_recovered == [] and not (tmp_path / "gap_recovered.json").exists()


def test_a_report_without_the_gap_removes_an_earlier_reports_gap_files(tmp_path: Path) -> None:
    # An evaluation rewrites <run folder>/report on every rerun, for the conditions of that invocation (the condition
    # list is not part of the run folder's identity): the gap files of an earlier run with skyline would stay beside
    # a summary without it, numbers of another report.
    recs, out = _split_records(), tmp_path / "report"
    run_report(recs, out, resamples=50)
    assert GAP_FILES <= {p.name for p in out.iterdir()}
    res = run_report([r for r in recs if r["condition"] != HIGH], out, resamples=50)
    assert res.gap_recovered == [] and {p.name for p in out.iterdir()} == EXPECTED_FILES
