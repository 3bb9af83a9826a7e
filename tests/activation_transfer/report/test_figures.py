"""Figures and tables a paper could use (issue 18 item 8): vector files, reference lines, margins, the gap figure,
the sweep, and markdown tables that match their JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from test_gap import GAP_FILES
from test_report import EXPECTED_FILES, _records, _synthetic

from activation_transfer.report import plot_layer_sweep, run_report
from activation_transfer.report.tables import verdict
from activation_transfer.task.scoring import MAIN_METRIC


def _svg_text(path: Path) -> str:
    """The text of an SVG's <text> elements (svg.fonttype none keeps labels as text)."""
    svg = path.read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    return " ".join(re.findall(r"<text[^>]*>([^<]*)</text>", svg))


def _split_records(n: int = 40) -> list[dict]:
    rng = np.random.default_rng(5)
    low = rng.random(n) < 0.2
    high = low | (rng.random(n) < 0.7)
    recs = _records("receiver_alone", None, low.tolist()) + _records("skyline", None, high.tolist())
    for seed in (42, 123, 456):
        recs += _records("slots_functional", seed, np.where(high & ~low, rng.random(n) < 0.5, low).tolist())
    return recs


def test_every_png_has_an_svg_with_the_baseline_line_and_the_margin_bands(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = run_report(_synthetic(), out, resamples=100, margins=[0.05, 0.03])
    names = {p.name for p in out.iterdir()}
    assert names == EXPECTED_FILES
    assert {n[:-4] for n in names if n.endswith(".png")} == {n[:-4] for n in names if n.endswith(".svg")}
    # No honest chance level for free-form answers: the baseline's accuracy is the reference line, labelled so.
    base = res.summary["conditions"]["no_inject"][MAIN_METRIC]["mean"]
    accuracy = _svg_text(out / "accuracy.svg")
    assert f"baseline: no_inject ({base:.4f}); no chance level defined" in accuracy
    assert "95% CI (bootstrap over questions)" in accuracy
    deltas = _svg_text(out / "deltas.svg")
    assert "TOST margin ±0.05" in deltas and "TOST margin ±0.03" in deltas
    assert "95% CI over questions" in deltas
    # The same figure gives the same bytes (no date, fixed ids).
    again = run_report(_synthetic(), tmp_path / "again", resamples=100, margins=[0.05, 0.03])
    assert (out / "deltas.svg").read_bytes() == (tmp_path / "again" / "deltas.svg").read_bytes()
    assert again.files["deltas_svg"].exists() and again.files["accuracy_svg"].exists()


def test_the_gap_figure_shows_the_ends_the_ci_and_each_run(tmp_path: Path) -> None:
    res = run_report(_split_records(), tmp_path, resamples=200)
    assert GAP_FILES <= {p.name for p in tmp_path.iterdir()}
    (row,) = [r for r in res.gap_recovered if r["condition"] == "slots_functional"]
    text = _svg_text(tmp_path / "gap_recovered.svg")
    for label in ("0 = receiver_alone", "1 = skyline", "one run (translator / seed)", "bootstrap over questions"):
        assert label in text, label
    assert f"{row['fraction']:+.3f}" in text and "slots_functional (runs=3)" in text
    assert "baseline: receiver_alone" in _svg_text(tmp_path / "accuracy.svg")


def test_gap_rows_carry_each_runs_own_fraction(tmp_path: Path) -> None:
    res = run_report(_split_records(), tmp_path, resamples=200)
    (row,) = [r for r in res.gap_recovered if r["condition"] == "slots_functional"]
    acc = res.summary["conditions"]
    low, high = acc["receiver_alone"][MAIN_METRIC]["mean"], acc["skyline"][MAIN_METRIC]["mean"]
    runs = acc["slots_functional"][MAIN_METRIC]["per_run"]
    assert row["per_run"] == pytest.approx({k: (v - low) / (high - low) for k, v in runs.items()})
    assert row["per_run_sd"] == pytest.approx(float(np.std(list(row["per_run"].values()), ddof=1)))
    assert np.mean(list(row["per_run"].values())) == pytest.approx(row["fraction"])
    md = (tmp_path / "gap_recovered.md").read_text()
    cells = ", ".join(f"{k}: {v:+.4f}" for k, v in row["per_run"].items())
    assert f"| {cells} | {row['per_run_sd']:.4f} |" in md


def _md_rows(md: str) -> list[list[str]]:
    """Body rows of the markdown tables (header and separator rows left out)."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]
    return [r for r in rows if r[0] not in ("Condition", "---")]


@pytest.mark.parametrize(
    ("n_differ", "words"),
    [
        (None, "equivalent"),  # equivalence.json written before n_differ was recorded
        (0, "equivalent"),  # no variation: the exact bound, not the approximation
        (1, "equivalent (approximate: 1 question differs)"),
        (9, "equivalent (approximate: 9 questions differ)"),
        (10, "equivalent"),
    ],
)
def test_verdict_marks_few_differing_questions(n_differ, words) -> None:
    row = {"equivalent": True} if n_differ is None else {"equivalent": True, "n_differ": n_differ}
    assert verdict(row) == words


def test_few_differing_questions_are_marked_in_equivalence_md(tmp_path: Path) -> None:
    # One question of 40 differs (+1): the normal approximation gives a narrow CI; the verdict says it is rough.
    rows = _records("no_inject", None, [False] * 40) + _records("additive", 1, [True] + [False] * 39)
    run_report(rows, tmp_path, resamples=20, tost_resamples=20, permutations=20, margins=[0.1], baselines=["no_inject"])
    (e,) = [e for e in json.loads((tmp_path / "equivalence.json").read_text()) if e["metric"] == MAIN_METRIC]
    assert e["n_differ"] == 1 and e["equivalent"]
    assert "| equivalent (approximate: 1 question differs) |" in (tmp_path / "equivalence.md").read_text()


def test_equivalence_md_rows_match_the_tost_json(tmp_path: Path) -> None:
    res = run_report(_synthetic(), tmp_path, resamples=100, margins=[0.05, 0.1])
    rows = _md_rows((tmp_path / "equivalence.md").read_text())
    saved = json.loads((tmp_path / "equivalence.json").read_text())
    main = [e for e in saved if e["metric"] == MAIN_METRIC]
    assert len(rows) == len(main) == 2 * 6 and saved == res.equivalence
    for cells, e in zip(rows, main):
        assert cells[0] == e["condition"] and int(cells[1]) == e["n"]
        assert float(cells[2]) == pytest.approx(e["delta"], abs=5e-5)
        low, high = (float(x) for x in cells[3].strip("[]").split(","))
        assert (low, high) == pytest.approx((e["ci90_low"], e["ci90_high"]), abs=5e-5)
        assert cells[4] == f"±{e['margin']:g}" and float(cells[5]) == pytest.approx(e["p"], rel=5e-3, abs=1e-300)
        assert (
            cells[6]
            == verdict(e)
            == (
                "equivalent"
                if e["ci90_low"] > -e["margin"] and e["ci90_high"] < e["margin"]
                else "not shown equivalent"
            )
        )


def test_comparisons_md_holds_the_main_metric_only(tmp_path: Path) -> None:
    res = run_report(_synthetic(), tmp_path, resamples=100)
    md = (tmp_path / "comparisons.md").read_text()
    rows = _md_rows(md)
    main = [c for c in res.comparisons if c["metric"] == MAIN_METRIC]
    assert len(rows) == len(main) and len(res.comparisons) > len(main)
    for cells, c in zip(rows, main):
        assert cells[0] == c["condition"] and int(cells[2]) == c["n_samples"] and int(cells[7]) == c["pooled_n_pairs"]
        low, high = (float(x) for x in cells[4].strip("[]").split(","))
        assert (low, high) == pytest.approx((c["ci_low"], c["ci_high"]), abs=5e-5)
    assert "Pooled 95% CI" in md and "sign-flip" in md


def test_layer_sweep_figure_has_cis_and_names_the_chosen_block(tmp_path: Path) -> None:
    rows = [
        {"layer": k, "receiver_alone": 0.1, "skyline": 0.7, "slots_self": s, "slots_zero": 0.08}
        | {"ci": {"slots_self": [s - 0.05, s + 0.05], "slots_zero": [0.05, 0.11], "receiver_alone": [0.07, 0.13]}}
        for k, s in enumerate((0.3, 0.45, 0.2))
    ]
    files = plot_layer_sweep(rows, chosen=1)
    assert files["png"].startswith(b"\x89PNG")
    (tmp_path / "sweep.svg").write_bytes(files["svg"])
    text = _svg_text(tmp_path / "sweep.svg")
    for label in ("chosen block: 1", "slots_self, 95% CI", "slots_zero, 95% CI", "receiver_alone 95% CI", "skyline"):
        assert label in text, label


def test_plotted_numbers_print_a_zero_as_the_tables_do(tmp_path: Path) -> None:
    # A CI bound (or delta, or fraction) of exactly 0 reads "+0.0000" in a figure but "0.0000" in the table: the
    # sign would suggest a positive effect.
    recs = _records("no_inject", None, [False] * 50) + _records("c", 1, [True] + [False] * 49)
    recs += _records("same", None, [False] * 50)
    run_report(recs, tmp_path / "p", resamples=200, permutations=20)
    text = _svg_text(tmp_path / "p" / "deltas.svg")
    assert "+0.0200 [0.0000, +0.0600]" in text and "0.0000 [0.0000, 0.0000]" in text and "+0.0000" not in text
    split = _records("receiver_alone", None, [False] * 10) + _records("skyline", None, [True] * 10)
    run_report(split + _records("slots_zero", None, [False] * 10), tmp_path / "s", resamples=50, permutations=20)
    gap = _svg_text(tmp_path / "s" / "gap_recovered.svg")
    assert "0.0000" in gap.split() and "+0.000" not in gap  # slots_zero recovers none of the gap: fraction 0
