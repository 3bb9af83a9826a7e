"""Question-clustered statistics: the questions, not the runs x questions, are the independent units.

The runs of a condition (seeds, translators) answer the same questions, so a question's runs move together; pooling
them as independent pairs (the paper's pairwise CIs, ``stats.compare_paired``) narrows the CIs and inflates McNemar.
Here each bootstrap draw resamples questions and keeps every run of a drawn question, and the p-value comes from
flipping the sign of each question's run-averaged delta.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from activation_transfer.report.stats import _CHUNK_ENTRIES, DEFAULT_RESAMPLES, clustered_deltas, percentile_ci

DEFAULT_PERMUTATIONS = 10_000
CI_METHOD = "question-clustered percentile bootstrap (each draw keeps all runs of a question)"
P_METHOD = "paired sign-flip permutation test on per-question mean deltas (two-sided)"


def question_bootstrap_ci(
    condition_runs: Sequence,
    baseline_runs: Sequence,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the paired delta, resampling questions (each draw keeps all runs of a question).

    Every paired run holds the same questions (aligned by sample id), so the mean over the drawn questions' runs is
    the mean of the drawn questions' run-averaged deltas. Indices are drawn as
    ``default_rng(seed).integers(0, n, size=(resamples, n))`` (in row chunks for large ``n``), so a direct
    implementation with the same generator gives the same CI.

    Args:
        condition_runs: One aligned 0/1 vector per run of the condition.
        baseline_runs: The baseline vector paired with each run.
        resamples: Bootstrap resamples ``B`` (>= 1).
        confidence: Two-sided coverage.
        seed: Seed of ``numpy.random.default_rng``.
    """
    return question_means_ci(clustered_deltas(condition_runs, baseline_runs), resamples, confidence, seed)


def question_means_ci(
    per_question: np.ndarray | Sequence[float],
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-question values, each already the mean over that question's runs.

    Resampling these values resamples questions with all their runs. Indices are drawn as
    ``default_rng(seed).integers(0, n, size=(resamples, n))``, in row chunks for large ``n``.

    Args:
        per_question: One value per question (a run-averaged delta, accuracy or rate).
        resamples: Bootstrap resamples ``B`` (>= 1).
        confidence: Two-sided coverage.
        seed: Seed of ``numpy.random.default_rng``.
    """
    if resamples < 1:
        raise ValueError(f"question_means_ci: resamples must be >= 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"question_means_ci: confidence must be in (0, 1), got {confidence}")
    x = np.asarray(per_question, dtype=np.float64).ravel()
    n = x.size
    if n == 0:
        raise ValueError("question_means_ci: no questions")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    rows = max(1, _CHUNK_ENTRIES // n)
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        means[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return percentile_ci(means, confidence)


def sign_flip_p(per_question: np.ndarray | Sequence[float], permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0):
    """Two-sided p of a paired sign-flip permutation test of mean zero (Monte Carlo, ``(1 + k) / (1 + P)``).

    Under H0 (condition and baseline exchangeable within a question) each question's run-averaged delta is as likely
    negative as positive; ``k`` counts the ``P`` random sign assignments whose ``|sum|`` reaches the observed one.
    Questions with delta 0 do not change under a flip. The questions sharing one ``|delta|`` (a multiple of
    ``1 / runs``: a handful of values) contribute ``|delta| * (2 * heads - count)`` with ``heads ~ Binomial(count,
    1/2)``, which is exactly the distribution of flipping each of them, drawn in O(P x values) instead of O(P x n).

    Args:
        per_question: Each question's paired delta averaged over runs (``stats.clustered_deltas``).
        permutations: Random sign assignments ``P`` (>= 1); the smallest possible p is ``1 / (P + 1)``.
        seed: Seed of ``numpy.random.default_rng``.
    """
    if permutations < 1:
        raise ValueError(f"sign_flip_p: permutations must be >= 1, got {permutations}")
    d = np.asarray(per_question, dtype=np.float64).ravel()
    observed = abs(d.sum())
    # Equal magnitudes up to float noise (1/3 computed two ways) are one value.
    values, counts = np.unique(np.round(np.abs(d[d != 0]), 12), return_counts=True)
    if values.size == 0:
        return 1.0
    rng = np.random.default_rng(seed)
    sums = np.zeros(permutations, dtype=np.float64)
    for value, count in zip(values, counts):
        sums += value * (2 * rng.binomial(count, 0.5, size=permutations) - count)
    # The tolerance absorbs float summation order: a draw equal to the observed sum counts as reaching it.
    hits = int((np.abs(sums) >= observed - 1e-9).sum())
    return (1 + hits) / (1 + permutations)
