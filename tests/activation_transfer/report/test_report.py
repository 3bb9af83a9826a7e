"""report.py / report.run_report: paper reproduction, outputs, bad input."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from activation_transfer.report import ReportInputError, load_records, run_report
from activation_transfer.task.scoring import METRICS


def _load_cli():
    # Load report.py by path: the repository root is on sys.path under `python -m pytest` but not under `pytest`.
    spec = importlib.util.spec_from_file_location("report_cli", Path(__file__).resolve().parents[3] / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


main = _load_cli().main

EXPECTED_FILES = {
    "summary.json",
    "comparisons.json",
    "equivalence.json",
    "summary.md",
    "comparisons.md",
    "equivalence.md",
    "summary.csv",
    "comparisons.csv",
    "equivalence.csv",
    "accuracy.png",
    "accuracy.svg",
    "deltas.png",
    "deltas.svg",
}
COMPARISON_KEYS = {
    "condition",
    "baseline",
    "metric",
    "runs",
    "n_samples",
    "delta",
    "ci_low",
    "ci_high",
    "permutation_p",
    "permutations",
    "gained_per_run",
    "lost_per_run",
    "pooled_n_pairs",
    "pooled_ci_low",
    "pooled_ci_high",
    "pooled_mcnemar_p",
}
EQUIVALENCE_KEYS = {"condition", "baseline", "metric", "view", "delta", "ci90_low", "ci90_high", "margin", "p"}


def _records(condition: str, seed: int | None, correct: list[bool], start: int = 0, gold: str = "Paris") -> list[dict]:
    return [
        {
            "sample_id": f"s{start + i:04d}",
            "condition": condition,
            "seed": seed,
            "gold": gold,
            "prediction": f"I think {gold} is it." if ok else "No idea, really.",
            "hops": 2,
        }
        for i, ok in enumerate(correct)
    ]


def _synthetic(n: int = 60) -> list[dict]:
    rng = np.random.default_rng(0)
    base = rng.random(n) < 0.3
    recs = _records("no_inject", None, base.tolist())
    recs += _records("nl_relay", None, (rng.random(n) < 0.25).tolist())
    for seed in (1, 2, 3):
        flip = rng.random(n) < 0.1
        recs += _records("additive_with_a_long_condition_name", seed, (base ^ flip).tolist())
        recs += _records("replace", seed, (rng.random(n) < 0.02).tolist())
    return recs


def _write_jsonl(path: Path, recs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


# ------------------------------------------------------------------------------------------ paper reproduction


def test_reproduces_the_paper_figures(paper_results_dir: Path, tmp_path: Path) -> None:
    res = run_report([paper_results_dir], tmp_path / "out")
    cond = res.summary["conditions"]
    assert list(cond) == ["no_inject", "additive"]
    assert cond["no_inject"]["runs"] == 1 and cond["additive"]["runs"] == 3
    assert cond["no_inject"]["n"] == cond["additive"]["n"] == 396

    wb, leg = "word_boundary_contains", "legacy_contains"
    assert round(cond["no_inject"][wb]["mean"], 4) == 0.0884
    assert round(cond["no_inject"][leg]["mean"], 4) == 0.1035
    assert cond["no_inject"][wb]["sd"] is None
    assert cond["no_inject"][wb]["per_run"].keys() == {"deterministic"}
    add = cond["additive"]
    assert (round(add[wb]["mean"], 4), round(add[wb]["sd"], 4)) == (0.0926, 0.0073)
    assert (round(add[leg]["mean"], 4), round(add[leg]["sd"], 4)) == (0.1094, 0.0081)
    assert {k: round(v, 4) for k, v in add[wb]["per_run"].items()} == {"42": 0.0884, "123": 0.0884, "456": 0.1010}
    assert {k: round(v, 4) for k, v in add[leg]["per_run"].items()} == {"42": 0.1035, "123": 0.1061, "456": 0.1187}
    for m in ("exact_match", "normalized_exact_match"):
        assert add[m]["mean"] == 0.0 and cond["no_inject"][m]["mean"] == 0.0

    by = {(c["condition"], c["baseline"], c["metric"]): c for c in res.comparisons}
    c = by["additive", "no_inject", wb]
    # The paper's pairwise figures pool runs x questions: they are the pooled_* keys.
    assert c["runs"] == 3 and c["pooled_n_pairs"] == 1188 and c["n_samples"] == 396
    assert round(c["delta"], 4) == 0.0042
    assert (c["gained"], c["lost"]) == (16, 11)  # 5.3 / 3.7 per run
    assert (round(c["gained_per_run"], 1), round(c["lost_per_run"], 1)) == (5.3, 3.7)
    assert c["pooled_ci_low"] == pytest.approx(-0.0042, abs=0.002)
    assert c["pooled_ci_high"] == pytest.approx(0.0126, abs=0.002)
    # The primary CI resamples questions: wider than the pooled one, still around the same delta.
    assert c["ci_low"] < c["pooled_ci_low"] and c["ci_high"] > c["pooled_ci_high"]
    c = by["additive", "no_inject", leg]
    assert round(c["delta"], 4) == 0.0059
    assert (round(c["gained_per_run"], 1), round(c["lost_per_run"], 1)) == (6.3, 4.0)
    assert c["pooled_ci_low"] == pytest.approx(-0.0034, abs=0.002)
    assert c["pooled_ci_high"] == pytest.approx(0.0152, abs=0.002)

    eq = {(e["metric"], e["margin"]): e for e in res.equivalence if e["condition"] == "additive"}
    e5, e3 = eq[wb, 0.05], eq[wb, 0.03]
    assert e5["view"] == "clustered" and e5["n"] == 396
    assert round(e5["delta"], 4) == 0.0042
    assert (round(e5["ci90_low"], 4), round(e5["ci90_high"], 4)) == (-0.0053, 0.0137)
    assert e5["equivalent"] and e3["equivalent"]
    assert f"{e3['p']:.2e}" == "3.97e-06"
    # Published 1.11e-15 is 1 - Phi(z) in double precision (quantized to multiples of 2**-53 ~ 1.11e-16); the
    # survival function gives the accurate 1.09e-15. Both come from the same z.
    assert e5["p"] == pytest.approx(1.0926e-15, rel=1e-3)
    z = (0.05 - e5["delta"]) / e5["se"]
    assert f"{1 - stats.norm.cdf(z):.2e}" == "1.11e-15"


def test_paper_cli_writes_everything(paper_results_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "paper"
    assert main([str(paper_results_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| additive | 3 | 396 | 0.0926 ± 0.0073 | 0.1094 ± 0.0081 |" in printed
    assert str(out) in printed and "nl_relay" in printed  # the note that the absent default baseline was skipped
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    md = (out / "comparisons.md").read_text()
    # Main metric only (legacy contains' 6.3 / 4.0 is in comparisons.csv), the pooled pairs beside the questions.
    assert "| additive | 3 | 396 | +0.0042 |" in md and "5.3 / 3.7 | 1188 |" in md and "6.3 / 4.0" not in md


# ------------------------------------------------------------------------------------------------ outputs


def test_cli_on_a_folder_of_jsonl(tmp_path: Path, capsys) -> None:
    recs = _synthetic()
    for cond in dict.fromkeys(r["condition"] for r in recs):
        _write_jsonl(tmp_path / "results" / f"{cond}.jsonl", [r for r in recs if r["condition"] == cond])
    (tmp_path / "results" / "notes.txt").write_text("not a result file")  # ignored: not .jsonl/.json
    out = tmp_path / "out"
    rc = main([str(tmp_path / "results"), "--out", str(out), "--resamples", "500", "--margins", "0.1", "--seed", "3"])
    assert rc == 0
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES  # no temporary files left behind
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["conditions"]) == ["no_inject", "nl_relay", "additive_with_a_long_condition_name", "replace"]
    add = summary["conditions"]["additive_with_a_long_condition_name"]
    assert add["runs"] == 3 and add["n"] == 60 and set(add["word_boundary_contains"]["per_run"]) == {"1", "2", "3"}
    assert summary["meta"]["seed"] == 3 and summary["meta"]["resamples"] == 500

    comparisons = json.loads((out / "comparisons.json").read_text())
    # 3 non-baseline conditions vs no_inject, and 3 vs nl_relay (no_inject included), x 5 metrics.
    assert len(comparisons) == 6 * len(METRICS)
    assert all(COMPARISON_KEYS <= set(c) for c in comparisons)
    assert {c["metric"] for c in comparisons} == set(METRICS)
    assert len({c["bootstrap_seed"] for c in comparisons}) == len(comparisons)  # one derived seed per comparison
    equivalence = json.loads((out / "equivalence.json").read_text())
    assert len(equivalence) == 6 * len(METRICS) and {e["margin"] for e in equivalence} == {0.1}
    assert all(EQUIVALENCE_KEYS <= set(e) and e["view"] == "clustered" for e in equivalence)

    with open(out / "comparisons.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(comparisons) and COMPARISON_KEYS <= set(rows[0])
    assert float(rows[0]["delta"]) == pytest.approx(comparisons[0]["delta"])
    with open(out / "summary.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4 * len(METRICS)
    with open(out / "equivalence.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(equivalence)

    for png in ("accuracy.png", "deltas.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "| replace | 3 | 60 |" in (out / "summary.md").read_text()
    md = (out / "comparisons.md").read_text()
    assert "## vs nl_relay" in md and "legacy_contains" not in md
    assert "| ±0.1 |" in (out / "equivalence.md").read_text()


def test_report_is_deterministic_and_in_memory_equals_files(tmp_path: Path) -> None:
    recs = _synthetic()
    a = run_report(recs, tmp_path / "a", resamples=300)
    b = run_report([_write_jsonl(tmp_path / "all.jsonl", recs)], tmp_path / "b", resamples=300)
    assert a.comparisons == b.comparisons and a.equivalence == b.equivalence
    assert (tmp_path / "a" / "comparisons.json").read_bytes() == (tmp_path / "b" / "comparisons.json").read_bytes()
    c = run_report(recs, tmp_path / "c", resamples=300, seed=1)
    assert [x["ci_low"] for x in c.comparisons] != [x["ci_low"] for x in a.comparisons]
    assert set(a.files) >= {"accuracy_png", "deltas_png", "summary_json"} and all(p.exists() for p in a.files.values())
    assert "| Condition | Runs | n |" in a.markdown


def test_multi_run_baseline_pairs_by_seed(tmp_path: Path) -> None:
    recs = _records("base", 1, [True, False, False]) + _records("base", 2, [False, False, False])
    recs += _records("cond", 1, [True, True, False]) + _records("cond", 2, [False, False, True])
    res = run_report(recs, tmp_path, baselines=["base"], resamples=100)
    c = next(c for c in res.comparisons if c["metric"] == "word_boundary_contains")
    assert c["paired_runs"] == [["1", "1"], ["2", "2"]]
    assert (c["gained"], c["lost"]) == (2, 0)
    recs += _records("cond", 3, [True, True, True])
    with pytest.raises(ReportInputError, match="same seeds"):
        run_report(recs, tmp_path, baselines=["base"], resamples=100)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("field", ["gold", "prediction"])
def test_record_without_gold_or_prediction_names_file_and_line(tmp_path: Path, field: str) -> None:
    recs = _records("no_inject", None, [True, False, True])
    del recs[1][field]
    path = _write_jsonl(tmp_path / "r.jsonl", recs)
    with pytest.raises(ReportInputError, match=rf"r\.jsonl:2: record has no '{field}'"):
        load_records([path])


def test_empty_gold_and_bad_json_name_the_line(tmp_path: Path) -> None:
    recs = _records("no_inject", None, [True, True])
    recs[1]["gold"] = ""
    path = _write_jsonl(tmp_path / "r.jsonl", recs)
    with pytest.raises(ReportInputError, match=r"r\.jsonl:2: .*empty"):
        load_records([path])
    path.write_text(json.dumps(_records("x", None, [True])[0]) + "\n\n{not json\n")
    with pytest.raises(ReportInputError, match=r"r\.jsonl:3: invalid JSON"):
        load_records([path])


def test_cli_bad_input_exits_2_with_the_location(tmp_path: Path, capsys) -> None:
    recs = _records("no_inject", None, [True, False])
    del recs[0]["gold"]
    path = _write_jsonl(tmp_path / "r.jsonl", recs)
    with pytest.raises(SystemExit) as exc:
        main([str(path), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "r.jsonl:1: record has no 'gold'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.parametrize("margin", ["nan", "inf", "0", "-0.1", "5", "1"])  # 5: percent, not accuracy units
def test_cli_margin_not_finite_and_positive_exits_2_naming_margins(tmp_path: Path, capsys, margin: str) -> None:
    path = _write_jsonl(tmp_path / "r.jsonl", _records("no_inject", None, [True, False]))
    with pytest.raises(SystemExit) as exc:
        main([str(path), "--out", str(tmp_path / "out"), "--resamples", "50", "--margins", "0.05", margin])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("report.py: error: margins must be finite positive numbers") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_sample_ids_differ_from_baseline(tmp_path: Path) -> None:
    recs = _records("no_inject", None, [True, False, True, False])
    recs += _records("short", 7, [True, False, False], start=1)  # s0001..s0003: s0000 missing
    with pytest.raises(
        ReportInputError, match="differ in sample ids: 0 only in the condition .* 1 only in the baseline"
    ):
        run_report(recs, tmp_path / "x")
    res = run_report(recs, tmp_path / "y", intersect=True, resamples=100)
    c = next(c for c in res.comparisons if c["metric"] == "word_boundary_contains")
    assert (c["pooled_n_pairs"], c["dropped"], c["n_samples"]) == (3, 1, 3)
    assert any("dropped 1" in note for note in res.notes)
    assert "dropped 1" in " ".join(res.summary["meta"]["notes"])


def test_intersect_flag_on_the_cli(tmp_path: Path, capsys) -> None:
    recs = _records("no_inject", None, [True, False, True, False]) + _records("c", 1, [True, True], start=2)
    path = _write_jsonl(tmp_path / "r.jsonl", recs)
    with pytest.raises(SystemExit):
        main([str(path), "--out", str(tmp_path / "o")])
    assert "--intersect" in capsys.readouterr().err
    assert main([str(path), "--out", str(tmp_path / "o"), "--intersect", "--resamples", "50"]) == 0
    assert "dropped 2" in capsys.readouterr().out


def test_absent_baselines(tmp_path: Path) -> None:
    recs = _records("no_inject", None, [True, False]) + _records("c", 1, [True, True])
    with pytest.raises(ReportInputError, match=r"baseline\(s\) \['nl_relay'\] not in the input"):
        run_report(recs, tmp_path, baselines=["no_inject", "nl_relay"])
    # Default list: an absent nl_relay is skipped with a note...
    res = run_report(recs, tmp_path, resamples=50)
    assert res.summary["meta"]["baselines"] == ["no_inject"] and any("nl_relay" in n for n in res.notes)
    # ...but at least one default baseline must be there.
    with pytest.raises(ReportInputError, match="none of the default baselines"):
        run_report(_records("c", 1, [True, True]), tmp_path)


def test_only_a_baseline_still_reports(tmp_path: Path) -> None:
    res = run_report(_records("no_inject", None, [True, False, True]), tmp_path / "out", resamples=50)
    assert res.comparisons == [] and res.equivalence == []
    assert res.summary["conditions"]["no_inject"]["word_boundary_contains"]["mean"] == pytest.approx(2 / 3)
    assert {p.name for p in (tmp_path / "out").iterdir()} == EXPECTED_FILES


def test_empty_inputs(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ReportInputError, match="no per-sample records"):
        run_report([tmp_path / "empty.jsonl"], tmp_path / "o")
    with pytest.raises(ReportInputError, match="no per-sample records"):
        run_report([], tmp_path / "o")
    (tmp_path / "d").mkdir()
    with pytest.raises(ReportInputError, match="holds no .jsonl or .json files"):
        run_report([tmp_path / "d"], tmp_path / "o")
    with pytest.raises(ReportInputError, match="no such file"):
        run_report([tmp_path / "missing.jsonl"], tmp_path / "o")


def test_duplicates_and_mixed_runs_are_errors(tmp_path: Path) -> None:
    recs = _records("no_inject", None, [True, False])
    path = _write_jsonl(tmp_path / "r.jsonl", recs + recs[:1])
    with pytest.raises(ReportInputError, match=r"r\.jsonl:3: duplicate sample 's0000'.*first seen at .*r\.jsonl:1"):
        run_report([path], tmp_path / "o")
    with pytest.raises(ReportInputError, match="mixes a deterministic run"):
        run_report(recs + _records("no_inject", 5, [True, False]), tmp_path / "o")
    with pytest.raises(ReportInputError, match="'seed' must be an integer or null"):
        run_report(_records("no_inject", True, [True]), tmp_path / "o")  # type: ignore[arg-type]


def test_stored_metrics_that_disagree_are_noted(tmp_path: Path) -> None:
    recs = _records("no_inject", None, [True, False]) + _records("c", 1, [True, True])
    recs[0]["metrics"] = {"word_boundary_contains": False}
    res = run_report(recs, tmp_path, resamples=50)
    assert any("1 record(s) carried stored metrics" in n for n in res.notes)


def test_one_common_question_reports_without_tost(tmp_path: Path) -> None:
    # A one-question smoke evaluation: TOST needs a standard error (2+ questions), the rest of the report does not.
    recs = _records("no_inject", None, [True]) + _records("c", 1, [False])
    res = run_report(recs, tmp_path, resamples=20, permutations=20)
    assert res.equivalence == [] and any("c vs no_inject: 1 common sample: no equivalence" in n for n in res.notes)
    assert [c["delta"] for c in res.comparisons if c["metric"] == "word_boundary_contains"] == [-1.0]
