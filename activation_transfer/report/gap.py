"""The fraction of the floor-to-ceiling gap a condition recovers, with a question-clustered bootstrap CI.

In the split-context protocol ``receiver_alone`` (the receiver reads only the question) is the floor and ``skyline``
(it reads the whole context) the ceiling. A slot condition's accuracy alone does not say how much of the context's
value it carried over; ``(acc(C) - acc(floor)) / (acc(ceiling) - acc(floor))`` does: 0 is no better than the floor,
1 is as good as reading the context.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from activation_transfer.report.analysis import condition_accuracy
from activation_transfer.report.load import sort_runs
from activation_transfer.report.stats import _CHUNK_ENTRIES, DEFAULT_RESAMPLES, derive_seed, percentile_ci, run_mean_sd
from activation_transfer.task.scoring import MAIN_METRIC, METRICS

GAP_LOW = "receiver_alone"
GAP_HIGH = "skyline"
GAP_CONFIDENCE = 0.95
# The columns of ``gap_recovered.csv``; the optional ones are blank on rows that do not carry them.
GAP_COLUMNS: tuple[str, ...] = (
    "condition",
    "metric",
    "low",
    "high",
    "acc_condition",
    "acc_low",
    "acc_high",
    "fraction",
    "ci_low",
    "ci_high",
    "per_run",
    "per_run_sd",
    "confidence",
    "resamples",
    "bootstrap_seed",
    "runs",
    "n",
    "dropped",
    "undefined_resamples",
    "note",
)
# Accuracies are ratios of counts of at most millions, so a true non-zero gap exceeds 1e-7; below this tolerance
# the float difference of two run means is rounding, and dividing by it would print noise as a huge fraction.
_ZERO_GAP = 1e-12

Groups = Mapping[str, Mapping[str, Mapping[str, Mapping[str, bool]]]]


def _counts(runs: Mapping[str, Mapping[str, Mapping[str, bool]]], ids: Sequence[str], metric: str) -> np.ndarray:
    """Per id, how many of the condition's runs got it right (int64, so sums and signs below are exact)."""
    per_run = [np.fromiter((runs[r][i][metric] for i in ids), dtype=np.int64, count=len(ids)) for r in sort_runs(runs)]
    return np.sum(per_run, axis=0)


def _resampled_sums(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Sum of each column of ``values`` (ids x k) over ``resamples`` resamples of its rows, drawn with replacement.

    One index matrix per chunk serves every column, which is what pairs the condition, the floor and the ceiling by
    question. Chunked so that at most ``stats._CHUNK_ENTRIES`` indices are held at once.
    """
    rng = np.random.default_rng(seed)
    n = values.shape[0]
    out = np.empty((resamples, values.shape[1]), dtype=np.int64)
    rows = max(1, _CHUNK_ENTRIES // n)
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = values[idx].sum(axis=1)
    return out


def _bootstrap(
    groups: Groups, cond: str, low: str, high: str, ids: Sequence[str], metric: str, resamples: int, seed: int
) -> tuple[float | None, float | None, int]:
    """Percentile CI of the fraction over resampled questions: ``(ci_low, ci_high, undefined resamples)``.

    A run's resampled accuracy is the mean of its scores at the resampled ids, and the resampled ids are the same for
    every run, so the mean over runs of those accuracies is the mean over resampled ids of each id's run-averaged
    score. Scaling by the run counts keeps everything in integers: with ``kc, kl, kh`` the per-id counts of correct
    runs and ``rc, rl, rh`` the run counts,
    ``fraction = sum(kc * rl - kl * rc) * rh / (sum(kh * rl - kl * rh) * rc)``, so identical inputs give exactly 0
    or 1 and the sign test of the denominator is exact.

    A resample whose gap is <= 0 has no finite fraction: as its gap falls to 0 the fraction runs off towards the
    infinity of its numerator's sign, so it is ranked there. Leaving such resamples out would print a finite interval
    even when the gap's own CI contains 0, where the ratio's interval is unbounded (Fieller); with them ranked, a
    percentile that lands on one gives ``(None, None)``.
    """
    rc, rl, rh = (len(groups[c]) for c in (cond, low, high))
    kc, kl, kh = (_counts(groups[c], ids, metric) for c in (cond, low, high))
    per_id = np.stack([kc * rl - kl * rc, kh * rl - kl * rh], axis=1)
    sums = _resampled_sums(per_id, resamples, seed)
    num, den = sums[:, 0], sums[:, 1]
    defined = den > 0
    ratios = np.where(num >= 0, np.inf, -np.inf)
    ratios[defined] = num[defined] * rh / (den[defined] * rc)
    lo, hi = percentile_ci(ratios, GAP_CONFIDENCE)
    undefined = resamples - int(defined.sum())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return None, None, undefined
    return lo, hi, undefined


def gap_recovered(
    groups: Groups,
    low: str = GAP_LOW,
    high: str = GAP_HIGH,
    metric: str = MAIN_METRIC,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> list[dict]:
    """Per condition, the fraction of the ``low`` -> ``high`` accuracy gap it recovers, with a 95% bootstrap CI.

    The point estimate reads :func:`analysis.condition_accuracy` on the ids common to every run of the condition,
    ``low`` and ``high``, so when all runs hold the same questions its three accuracies are the summary's to the last
    bit. The CI is a simple percentile bootstrap (as the paper's CIs; not BCa) over those questions: each resample
    draws sample ids with replacement and uses them for every run of the condition and for ``low`` and ``high``.
    When some ids are not common (e.g. a run missing a question) ``dropped`` counts them, and the point estimate and
    its accuracies leave them out too: a fraction whose floor was measured on other questions than the condition
    is not paired, and could fall outside its own CI.

    Why questions are the unit: the three accuracies are measured on the same questions, so their errors are
    correlated; resampling them apart would ignore that and give a much wider interval. Seeds are not independent
    samples either: the runs of a condition answer the same questions, so a question's runs move together.

    Args:
        groups: ``{condition: {run: {sample_id: {metric: bool}}}}`` (after ``load.collapse_repeated_runs``).
        low: The floor condition (fraction 0).
        high: The ceiling condition (fraction 1).
        metric: One of ``scoring.METRICS``.
        resamples: Bootstrap resamples (>= 1).
        seed: Base seed; each row uses ``derive_seed(seed, "{condition}|gap|{low}|{high}|{metric}")``.

    Returns:
        One row per condition of ``groups`` other than ``low`` and ``high``, in ``groups`` order, with the keys of
        :data:`GAP_COLUMNS` (``dropped``, ``undefined_resamples`` and ``note`` only where they apply); ``per_run``
        holds each run's own fraction (``{run: fraction}``, the run's accuracy against the same floor and ceiling)
        and ``per_run_sd`` their sample SD (``None`` for one run): the CI resamples questions for these runs, so it
        says nothing about other translators, the spread does; ``[]`` when
        ``low`` or ``high`` is absent. A resample whose gap is <= 0 has no finite fraction: it is counted in
        ``undefined_resamples`` and ranked at the infinity of its numerator's sign; when a percentile lands on one,
        the CI is unbounded: ``None`` with a ``note``. A point gap <= 0 (or no common id) gives ``fraction`` and CI
        ``None`` and a ``note``.

    Raises:
        ValueError: An unknown metric, ``low == high``, or ``resamples < 1``.
    """
    if metric not in METRICS:
        raise ValueError(f"gap_recovered: unknown metric {metric!r} (one of {list(METRICS)})")
    if low == high:
        raise ValueError(f"gap_recovered: low and high are both {low!r}")
    if resamples < 1:
        raise ValueError(f"gap_recovered: resamples must be >= 1, got {resamples}")
    if low not in groups or high not in groups:
        return []
    accuracy = condition_accuracy(groups)
    rows: list[dict] = []
    for cond, runs in groups.items():
        if cond in (low, high):
            continue
        id_sets = [set(r) for c in (cond, low, high) for r in groups[c].values()]
        ids = sorted(set.intersection(*id_sets))
        dropped = len(set.union(*id_sets)) - len(ids)
        acc = accuracy
        if dropped and ids:
            # The fraction pairs the three accuracies by question, as its CI does: on the common ids only.
            acc = condition_accuracy(
                {c: {r: {i: s[i] for i in ids} for r, s in groups[c].items()} for c in (cond, low, high)}
            )
        boot_seed = derive_seed(seed, f"{cond}|gap|{low}|{high}|{metric}")
        row: dict[str, Any] = {
            "condition": cond,
            "metric": metric,
            "low": low,
            "high": high,
            "acc_condition": acc[cond][metric]["mean"],
            "acc_low": acc[low][metric]["mean"],
            "acc_high": acc[high][metric]["mean"],
            "fraction": None,
            "ci_low": None,
            "ci_high": None,
            "per_run": {},
            "per_run_sd": None,
            "confidence": GAP_CONFIDENCE,
            "resamples": resamples,
            "bootstrap_seed": boot_seed,
            "runs": len(runs),
            "n": len(ids),
        }
        if dropped:
            row["dropped"] = dropped
        floor, ceiling = row["acc_low"], row["acc_high"]
        gap = ceiling - floor
        if not ids:
            row["note"] = f"no sample id common to every run of {cond}, {low} and {high}: no fraction"
        elif gap <= _ZERO_GAP:
            row["note"] = f"{high} is not above {low} ({ceiling:.4f} vs {floor:.4f}): the fraction is undefined"
        else:
            row["fraction"] = (row["acc_condition"] - floor) / gap
            # Each run's (translator's, seed's) own fraction: the CI is conditional on these runs, their spread
            # shows how much another translator could move the figure.
            per_run = {k: (a - floor) / gap for k, a in acc[cond][metric]["per_run"].items()}
            row["per_run"] = per_run
            row["per_run_sd"] = run_mean_sd(list(per_run.values()))[1]
            row["ci_low"], row["ci_high"], undefined = _bootstrap(
                groups, cond, low, high, ids, metric, resamples, boot_seed
            )
            if undefined:
                row["undefined_resamples"] = undefined
            if row["ci_low"] is None:
                row["note"] = (
                    f"{high} is not above {low} in {undefined} of {resamples} resamples: "
                    f"the fraction's {GAP_CONFIDENCE:.0%} CI is unbounded"
                )
        rows.append(row)
    return rows
