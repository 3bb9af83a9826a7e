"""report.clustered: questions, not runs x questions, are the units of the primary CI and p-value (issue 19 item 1)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from test_report import _records

from activation_transfer.report import question_bootstrap_ci, run_report, sign_flip_p
from activation_transfer.report.stats import derive_seed
from activation_transfer.task.scoring import MAIN_METRIC


def _fixture(n: int = 50, runs: int = 3, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Runs that share a per-question tendency (as translators answering the same questions do)."""
    rng = np.random.default_rng(seed)
    base = rng.random(n) < 0.3
    easy = rng.random(n) < 0.5
    conds = [np.where(easy, rng.random(n) < 0.8, rng.random(n) < 0.2) for _ in range(runs)]
    return conds, base


def _direct_question_bootstrap(conds, base, resamples: int, seed: int, confidence: float = 0.95):
    """Written apart from the library: draw question ids, take every run's paired deltas at them, pool, average."""
    n = base.size
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    deltas = [c.astype(int) - base.astype(int) for c in conds]
    means = sorted(float(np.concatenate([d[row] for d in deltas]).mean()) for row in idx)
    q = (1 - confidence) / 2
    return means[int(q * (resamples - 1))], means[int((1 - q) * (resamples - 1))]


def test_clustered_ci_equals_a_direct_question_level_bootstrap() -> None:
    conds, base = _fixture()
    for resamples, confidence in ((2000, 0.95), (999, 0.90)):
        got = question_bootstrap_ci(conds, [base] * 3, resamples=resamples, confidence=confidence, seed=11)
        want = _direct_question_bootstrap(conds, base, resamples, 11, confidence)
        assert got == pytest.approx(want, abs=1e-12)


def test_the_report_uses_the_clustered_ci_and_keeps_the_pooled_one(tmp_path: Path) -> None:
    conds, base = _fixture()
    recs = _records("no_inject", None, base.tolist())
    for seed, c in zip((1, 2, 3), conds):
        recs += _records("c", seed, c.tolist())
    res = run_report(recs, tmp_path, resamples=1000, seed=4)
    (row,) = [r for r in res.comparisons if r["metric"] == MAIN_METRIC]
    assert row["bootstrap_seed"] == derive_seed(4, f"c|no_inject|{MAIN_METRIC}|questions")
    want = _direct_question_bootstrap(conds, base, 1000, row["bootstrap_seed"])
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(want, abs=1e-12)
    assert (row["n_samples"], row["pooled_n_pairs"], row["runs"]) == (50, 150, 3)
    assert row["permutations"] == res.summary["meta"]["permutations"] == 10_000
    # Correlated runs: pooling them as 150 independent pairs gives a narrower interval than the questions support.
    assert row["ci_high"] - row["ci_low"] > row["pooled_ci_high"] - row["pooled_ci_low"]


def test_identical_seeds_give_the_clustered_figures_of_one_run(tmp_path: Path) -> None:
    conds, base = _fixture()
    one = _records("no_inject", None, base.tolist()) + _records("c", 1, conds[0].tolist())
    three = _records("no_inject", None, base.tolist())
    for seed in (1, 2, 3):  # the same answers three times, no translator identity: three runs (with a warning)
        three += _records("c", seed, conds[0].tolist())
    a, b = (run_report(r, tmp_path / name, resamples=800) for r, name in ((one, "one"), (three, "three")))
    for x, y in zip(a.comparisons, b.comparisons):
        assert (y["runs"], y["pooled_n_pairs"]) == (3, 3 * x["pooled_n_pairs"])
        for key in ("delta", "ci_low", "ci_high", "permutation_p"):
            assert x[key] == y[key], key
    # The pooled CI shrinks with the copies (that is the flaw the clustered one removes).
    wb = [(x, y) for x, y in zip(a.comparisons, b.comparisons) if x["metric"] == MAIN_METRIC][0]
    assert wb[1]["pooled_ci_high"] - wb[1]["pooled_ci_low"] < wb[0]["pooled_ci_high"] - wb[0]["pooled_ci_low"]
    # Accuracy CIs resample questions as well.
    acc_a, acc_b = (r.summary["conditions"]["c"][MAIN_METRIC] for r in (a, b))
    assert (acc_a["ci_low"], acc_a["ci_high"]) == (acc_b["ci_low"], acc_b["ci_high"]) and acc_b["ci_unit"] == "question"


def _exact_sign_flip_p(d: np.ndarray) -> float:
    observed = abs(d.sum())
    sums = [abs(np.dot(signs, d)) for signs in itertools.product((-1, 1), repeat=d.size)]
    return float(np.mean([s >= observed - 1e-9 for s in sums]))


def test_sign_flip_p_agrees_with_full_enumeration() -> None:
    d = np.array([1, 1, 2 / 3, 1 / 3, -1 / 3, 1, 0, 0, 2 / 3, -2 / 3, 1 / 3, 1])
    exact = _exact_sign_flip_p(d)
    assert 0.01 < exact < 0.2  # a case between the extremes
    assert sign_flip_p(d, permutations=100_000, seed=3) == pytest.approx(exact, abs=0.005)
    assert sign_flip_p(d, permutations=500, seed=3) == sign_flip_p(d, permutations=500, seed=3)  # seeded


def test_sign_flip_p_edges() -> None:
    assert sign_flip_p(np.zeros(20), permutations=100) == 1.0
    # Every question gained: no random sign assignment of 40 questions reaches it in 999 draws: the floor 1 / 1000.
    assert sign_flip_p(np.ones(40), permutations=999, seed=0) == pytest.approx(1 / 1000)
    with pytest.raises(ValueError, match="permutations"):
        sign_flip_p(np.ones(3), permutations=0)


def test_runs_of_different_sizes_get_a_ci_of_their_mean_of_run_means(tmp_path: Path) -> None:
    # Run 1 holds 300 questions at 0.5, run 2 only 30 of them, all wrong: the summary's accuracy is 0.25, the
    # pooled scores' mean 0.45. A pooled CI printed beside 0.25 excluded it (and the plot's error bar was negative).
    recs = _records("no_inject", None, [True] * 150 + [False] * 150)
    recs += _records("c", 1, [True, False] * 150) + _records("c", 2, [False] * 30)
    res = run_report(recs, tmp_path, resamples=2000, intersect=True)
    acc = res.summary["conditions"]["c"][MAIN_METRIC]
    assert acc["mean"] == 0.25 and acc["ci_unit"] == "run" and acc["ci_low"] < 0.25 < acc["ci_high"]
    assert acc["pooled_ci_low"] < 300 * 0.5 / 330 < acc["pooled_ci_high"]  # the paper's pooled view, kept
    assert (tmp_path / "accuracy.png").exists()
