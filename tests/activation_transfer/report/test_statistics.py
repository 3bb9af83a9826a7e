"""Paired statistics (arXiv 2606.03280, section 4.4): bootstrap, gained/lost, McNemar, TOST, degradation, run SD."""

from __future__ import annotations

import hashlib
import math
import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from scipy import stats

from activation_transfer.report import stats as st
from activation_transfer.report import tost as eq


def test_derive_seed_is_deterministic_and_label_specific() -> None:
    a = st.derive_seed(0, "additive|no_inject|word_boundary_contains")
    # PAPER.md: seeded from the first 8 hex digits of the SHA-256 of the label string.
    assert a == int(hashlib.sha256(b"0|additive|no_inject|word_boundary_contains").hexdigest()[:8], 16)
    assert a == st.derive_seed(0, "additive|no_inject|word_boundary_contains")
    assert a != st.derive_seed(0, "additive|no_inject|legacy_contains")
    assert a != st.derive_seed(1, "additive|no_inject|word_boundary_contains")
    assert 0 <= a < 2**32


def test_bootstrap_is_seeded() -> None:
    x = np.random.default_rng(0).integers(-1, 2, size=500)
    assert st.bootstrap_mean_ci(x, seed=7) == st.bootstrap_mean_ci(x, seed=7)
    assert st.bootstrap_mean_ci(x, seed=7) != st.bootstrap_mean_ci(x, seed=8)


def test_bootstrap_constant_sample_has_a_point_ci() -> None:
    assert st.bootstrap_mean_ci(np.zeros(100), resamples=200) == (0.0, 0.0)
    assert st.bootstrap_mean_ci(np.full(10, 0.25), resamples=200) == (0.25, 0.25)


@pytest.mark.parametrize("jitter", [False, True], ids=["multinomial-path", "index-path"])
def test_bootstrap_ci_matches_normal_theory(jitter: bool) -> None:
    # 0/1 data take the multinomial-count path; tiny jitter forces the index-resampling path. Both must give the
    # percentile CI of the mean, which for n = 2000 is close to mean +/- 1.96 * sd / sqrt(n).
    rng = np.random.default_rng(1)
    x = (rng.random(2000) < 0.1).astype(float)
    if jitter:
        x = x + rng.normal(0, 1e-6, size=x.size)
    lo, hi = st.bootstrap_mean_ci(x, resamples=5000, seed=3)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert lo == pytest.approx(x.mean() - half, abs=0.002)
    assert hi == pytest.approx(x.mean() + half, abs=0.002)
    lo90, hi90 = st.bootstrap_mean_ci(x, resamples=5000, seed=3, confidence=0.90)
    assert lo < lo90 < hi90 < hi


class _ScriptedGenerator:
    """Stands in for ``numpy.random.default_rng(seed)`` and hands out resamples chosen by the test."""

    def __init__(self, multinomial=None, integers=None) -> None:
        self._multinomial, self._integers = multinomial, integers
        self.calls: list[str] = []

    def multinomial(self, n, pvals, size):
        self.calls.append("multinomial")
        return self._multinomial

    def integers(self, low, high, size):
        self.calls.append("integers")
        return self._integers[: size[0]]


@pytest.mark.parametrize("path", ["multinomial", "integers"])
def test_bootstrap_reads_the_documented_percentile_index(monkeypatch, path: str) -> None:
    # B = 100 resampled means, all distinct, chosen by hand: the k-th resample's mean is k / 99 (multinomial path: a
    # 0/1 sample of n = 99 drawn with k ones; index path: 100 distinct values, resample k repeats value k).
    # q = 0.025: the lower end is sorted index int(0.025 * 99) = 2, the upper int(0.975 * 99) = 96 (PAPER.md,
    # "read at index int(q*(B-1))"), so the CI is (2/99, 96/99). Neighbouring indices give other values, so an
    # index off by one cannot pass.
    order = np.random.default_rng(0).permutation(100)  # the resamples arrive unsorted
    if path == "multinomial":
        x = np.array([0.0] * 50 + [1.0] * 49)
        gen = _ScriptedGenerator(multinomial=np.stack([99 - order, order], axis=1))  # counts of (0, 1) per resample
    else:
        x = np.arange(100) / 99  # > 64 distinct values: index resampling
        gen = _ScriptedGenerator(integers=np.repeat(order[:, None], 100, axis=1))
    monkeypatch.setattr(np.random, "default_rng", lambda seed: gen)
    lo, hi = st.bootstrap_mean_ci(x, resamples=100, seed=0)
    assert gen.calls and set(gen.calls) == {path}
    assert (lo, hi) == (pytest.approx(2 / 99, abs=1e-12), pytest.approx(96 / 99, abs=1e-12))
    lo90, hi90 = st.bootstrap_mean_ci(x, resamples=100, seed=0, confidence=0.90)  # int(0.05*99)=4, int(0.95*99)=94
    assert (lo90, hi90) == (pytest.approx(4 / 99, abs=1e-12), pytest.approx(94 / 99, abs=1e-12))


def test_bootstrap_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="empty"):
        st.bootstrap_mean_ci([])
    with pytest.raises(ValueError, match="resamples"):
        st.bootstrap_mean_ci([1.0], resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        st.bootstrap_mean_ci([1.0], confidence=1.0)


def test_paired_deltas_and_gained_lost() -> None:
    cond = [1, 1, 0, 0, 1]
    base = [1, 0, 1, 0, 0]
    assert st.paired_deltas(cond, base).tolist() == [0, 1, -1, 0, 1]
    assert st.gained_lost(cond, base) == (2, 1)
    with pytest.raises(ValueError, match="differ in length"):
        st.paired_deltas([1, 0], [1])


def test_mcnemar_continuity_corrected() -> None:
    # The additive vs no_inject pooled counts: b = 16, c = 11 -> chi2 = (|16 - 11| - 1)^2 / 27.
    expected = stats.chi2.sf(16 / 27, df=1)
    assert st.mcnemar_p(16, 11) == pytest.approx(expected)
    # Same thing as a two-sided normal approximation.
    assert st.mcnemar_p(16, 11) == pytest.approx(2 * stats.norm.sf(4 / math.sqrt(27)))
    assert st.mcnemar_p(0, 0) == 1.0
    assert st.mcnemar_p(5, 5) == 1.0
    assert st.mcnemar_p(6, 5) == 1.0  # |b - c| - 1 = 0
    assert st.mcnemar_p(0, 35) < 1e-6
    with pytest.raises(ValueError):
        st.mcnemar_p(-1, 2)


def test_run_mean_sd_uses_sample_sd() -> None:
    vals = [35 / 396, 35 / 396, 40 / 396]
    mean, sd = st.run_mean_sd(vals)
    assert mean == pytest.approx(sum(vals) / 3)
    assert sd == pytest.approx(statistics.stdev(vals))
    assert round(mean, 4) == 0.0926 and round(sd, 4) == 0.0073  # the paper's additive word-boundary figures
    assert st.run_mean_sd([0.5]) == (0.5, None)
    with pytest.raises(ValueError):
        st.run_mean_sd([])


def test_compare_paired_pools_runs_against_a_deterministic_baseline() -> None:
    base = np.array([1, 0, 0, 1, 0, 0], dtype=bool)
    runs = [np.array(r, dtype=bool) for r in ([1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 0, 0], [1, 0, 0, 1, 0, 0])]
    cmp_ = st.compare_paired(runs, [base] * 3, resamples=1000, seed=5)
    assert cmp_.runs == 3 and cmp_.n_pairs == 18
    assert cmp_.gained == 3 and cmp_.lost == 1
    assert cmp_.gained_per_run == pytest.approx(1.0) and cmp_.lost_per_run == pytest.approx(1 / 3)
    assert cmp_.delta == pytest.approx(2 / 18)
    assert cmp_.ci_low <= cmp_.delta <= cmp_.ci_high
    assert cmp_.bootstrap_seed == 5 and cmp_.to_dict()["resamples"] == 1000
    with pytest.raises(ValueError, match="pair them first"):
        st.compare_paired(runs, [base], resamples=10)


def test_clustered_deltas_average_over_runs() -> None:
    base = np.array([1, 0, 0], dtype=bool)
    runs = [np.array(r, dtype=bool) for r in ([1, 1, 0], [0, 1, 0], [1, 0, 1])]
    assert st.clustered_deltas(runs, [base] * 3).tolist() == pytest.approx([-1 / 3, 2 / 3, 1 / 3])


def test_tost_against_hand_computation() -> None:
    rng = np.random.default_rng(4)
    d = rng.normal(0.01, 0.1, size=400)
    se = d.std(ddof=1) / math.sqrt(d.size)
    t = eq.tost(d, 0.03)
    assert t.delta == pytest.approx(d.mean())
    assert t.se == pytest.approx(se)
    assert t.ci90_low == pytest.approx(d.mean() - stats.norm.ppf(0.95) * se)
    assert t.p_lower == pytest.approx(stats.norm.sf((d.mean() + 0.03) / se))
    assert t.p_upper == pytest.approx(stats.norm.cdf((d.mean() - 0.03) / se))
    assert t.p == max(t.p_lower, t.p_upper)


@settings(max_examples=60, deadline=None)
@given(
    mean=hs.floats(-0.1, 0.1),
    sd=hs.floats(0.01, 0.3),
    margin=hs.sampled_from([0.01, 0.03, 0.05]),
)
def test_tost_equivalence_iff_ci90_inside_margins(mean: float, sd: float, margin: float) -> None:
    d = np.random.default_rng(0).normal(0, 1, size=200)
    d = (d - d.mean()) / d.std(ddof=1) * sd + mean
    t = eq.tost(d, margin)
    inside = -margin < t.ci90_low and t.ci90_high < margin
    # Exact ties are measure-zero for continuous draws; skip the boundary within float noise.
    if min(abs(t.ci90_low + margin), abs(t.ci90_high - margin)) > 1e-12:
        assert t.equivalent == inside


def test_tost_and_degradation_without_variation() -> None:
    # No variation: the normal approximation has no se; the exact bound decides, so n matters.
    t = eq.tost(np.zeros(50), 0.03)
    assert t.p == pytest.approx(0.97**50) and not t.equivalent and t.n_differ == 0
    # The CI is the exact bound, and still equivalent iff it lies inside the margins.
    assert t.ci90_high == pytest.approx(1 - 0.05 ** (1 / 50)) and t.ci90_low == -t.ci90_high
    assert not eq.tost(np.zeros(2), 0.05).equivalent  # called equivalent before the exact bound
    big = eq.tost(np.zeros(300), 0.03)
    assert big.equivalent and big.p == pytest.approx(0.97**300) and big.ci90_high < 0.03
    assert eq.degradation_p(np.zeros(50)) == 1.0
    # Equal values that the mean rounds (0.1 is not a binary fraction) still count as no variation.
    assert eq.degradation_p(np.full(50, -0.1)) == pytest.approx((1 / 1.1) ** 50)
    shifted = eq.tost(np.full(50, 0.1), 0.05)
    assert shifted.se == 0.0 and shifted.p_upper == 1.0 and not shifted.equivalent
    # A margin beyond the deltas' range [-1, 1]: a probability of 0, never the negative (1 - m)^n.
    wide = eq.tost(np.zeros(3), 2.0)
    assert wide.p_lower == wide.p_upper == wide.p == 0.0 and wide.equivalent
    with pytest.raises(ValueError, match="margin"):
        eq.tost(np.zeros(5), 0.0)
    with pytest.raises(ValueError, match="at least 2"):
        eq.tost([0.1], 0.05)


@pytest.mark.parametrize("c", [0.0, 0.01, -0.02])
def test_exact_bound_without_variation_holds_its_level(c: float) -> None:
    # The likeliest H0 law for "all deltas equal c" (delta >= m): +1 with probability q, else c, mean exactly m.
    # Its rate of all-c samples is the p the test reports, so at the n where p < alpha first, that rate is < alpha.
    m, alpha = 0.03, 0.05
    q = (m - c) / (1 - c)
    assert q * 1 + (1 - q) * c == pytest.approx(m)
    n = next(k for k in range(2, 2000) if eq.tost(np.full(k, c), m).p_upper < alpha)
    p = eq.tost(np.full(n, c), m).p_upper
    assert p == pytest.approx((1 - q) ** n) and p < alpha <= eq.tost(np.full(n - 1, c), m).p_upper
    rng = np.random.default_rng(0)
    all_c = (rng.random((20_000, n)) >= q).all(axis=1).mean()  # simulated: within 3 standard errors of p
    assert all_c == pytest.approx(p, abs=3 * math.sqrt(p * (1 - p) / 20_000))


def test_degradation_p_direction() -> None:
    rng = np.random.default_rng(2)
    worse = rng.normal(-0.05, 0.2, size=400)
    d_mean, se = worse.mean(), worse.std(ddof=1) / 20
    assert eq.degradation_p(worse) == pytest.approx(stats.norm.cdf(d_mean / se))
    assert eq.degradation_p(worse) < 0.01
    assert eq.degradation_p(-worse) > 0.99


def test_run_means_ci_matches_resampling_each_run_by_index() -> None:
    # Binomial(n, p) / n per run is the mean of n scores drawn with replacement: the same distribution as drawing
    # indices within each run, so with many resamples the two CIs agree to sampling error.
    rng = np.random.default_rng(5)
    runs = [np.arange(300) % 2 == 0, np.arange(30) < 3]  # 0.5 and 0.1: run mean 0.3, pooled 153 / 330
    lo, hi = st.bootstrap_run_means_ci(runs, resamples=40_000, seed=1)
    draws = [r[rng.integers(0, r.size, size=(40_000, r.size))].mean(axis=1) for r in runs]
    direct = np.mean(draws, axis=0)
    assert lo == pytest.approx(np.quantile(direct, 0.025), abs=0.004)
    assert hi == pytest.approx(np.quantile(direct, 0.975), abs=0.004)
    # Centred on the mean of run means, not on the pooled mean (which weights the 300-score run ten times).
    centre = (runs[0].mean() + runs[1].mean()) / 2
    assert lo < centre < hi and not lo < np.concatenate(runs).mean() < hi
    with pytest.raises(ValueError, match="every run"):
        st.bootstrap_run_means_ci([[True], []])


@pytest.mark.parametrize(
    ("resamples", "confidence", "lo_i", "hi_i"),
    [(21, 0.90, 1, 19), (1001, 0.90, 50, 950), (11, 0.80, 1, 9), (41, 0.95, 1, 39)],
)
def test_percentile_index_is_the_decimal_rule_where_q_times_b_minus_1_is_whole(resamples, confidence, lo_i, hi_i):
    # (1 - 0.90) / 2 is 0.04999999999999999 in floats, so int(q * (B - 1)) fell one short whenever 0.05 * (B - 1)
    # is whole (B = 21, 101, 1001, 10001): the 90% CI's lower end was read one order statistic further out than
    # its upper end (B = 1001: sorted indices 49 and 950 instead of 50 and 950). Distinct values, so an index off by
    # one shows.
    from activation_transfer.report.clustered import question_means_ci

    assert st.percentile_ci(np.arange(resamples, dtype=float)[::-1], confidence) == (lo_i, hi_i)
    x = np.random.default_rng(1).random(30)  # question-level bootstrap read by the same rule, against a direct one
    means = np.sort(x[np.random.default_rng(5).integers(0, 30, size=(resamples, 30))].mean(axis=1))
    assert question_means_ci(x, resamples, confidence, seed=5) == (means[lo_i], means[hi_i])
