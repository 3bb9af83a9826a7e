"""Paired statistics of the paper (arXiv 2606.03280, section 4.4) as pure numpy/scipy functions.

A *run* of a condition is one 0/1 correctness vector over the evaluation samples (one per seed; one for a
deterministic condition). Vectors compared here are already aligned by sample id (see ``analysis``).
"""

from __future__ import annotations

import hashlib
import statistics as _stats
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

DEFAULT_RESAMPLES = 5000
# Cap on resample-by-sample index matrices held at once (int64): 2e7 entries = 160 MB is too much, 4e6 = 32 MB.
_CHUNK_ENTRIES = 4_000_000
# Up to this many distinct values the bootstrap draws multinomial counts per value instead of indices.
_MAX_LEVELS = 64


def derive_seed(seed: int, label: str) -> int:
    """A deterministic 32-bit seed for one comparison: first 8 hex digits of SHA-256 of ``"{seed}|{label}"``.

    Deriving per comparison (rather than sharing one generator) makes each CI independent of which other
    conditions happen to be in the report, and of their order.

    Args:
        seed: The report's base seed.
        label: A string naming the comparison, e.g. ``"additive|no_inject|word_boundary_contains"``.
    """
    return int(hashlib.sha256(f"{seed}|{label}".encode()).hexdigest()[:8], 16)


def percentile_ci(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The one percentile rule of every bootstrap here (the paper's): the sorted values at ``int(q * (B - 1))`` and
    ``int((1 - q) * (B - 1))`` with ``q = (1 - confidence) / 2``, the products taken in decimal (0.05, not the float
    0.04999999999999999 that ``(1 - 0.90) / 2`` gives)."""
    values = np.sort(values)
    q = (1.0 - confidence) / 2.0
    b = values.size
    # Rounded before the floor: (1 - 0.90) / 2 is 0.04999999999999999, whose product with B - 1 falls just short of a
    # whole 0.05 * (B - 1) (B = 21, 1001, 10001) and floored one index too low. The rule's decimal fractions are far
    # coarser than 1e-9, so the rounding moves nothing else (the defaults B = 5000, 10000 read the same indices).
    return float(values[int(round(q * (b - 1), 9))]), float(values[int(round((1.0 - q) * (b - 1), 9))])


def bootstrap_mean_ci(
    values: np.ndarray | Sequence[float],
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Simple percentile bootstrap CI of the mean (not BCa), vectorized.

    Samples with few distinct values are resampled through multinomial value counts, which has exactly the
    distribution of index resampling and is ~100x faster. The paper used Python's ``random.Random``, so CI ends agree
    with the paper's to about +/-0.002, not exactly.

    Args:
        values: The sample (1-D); for paired comparisons, the pooled paired deltas.
        resamples: Number of bootstrap resamples ``B`` (>= 1).
        confidence: Two-sided coverage, e.g. 0.95 or 0.90.
        seed: Seed of ``numpy.random.default_rng``.

    Returns:
        ``(low, high)``: the sorted resampled means at indices ``int(q * (B - 1))`` and ``int((1 - q) * (B - 1))``
        with ``q = (1 - confidence) / 2``.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("bootstrap_mean_ci: empty sample")
    if resamples < 1:
        raise ValueError(f"bootstrap_mean_ci: resamples must be >= 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap_mean_ci: confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    n = x.size
    uniq, counts = np.unique(x, return_counts=True)
    if uniq.size <= _MAX_LEVELS:
        # Few distinct values (0/1 scores, -1/0/+1 deltas, their run averages): how often each value is drawn in a
        # resample of size n is exactly Multinomial(n, counts / n), so drawing the counts gives the same bootstrap
        # distribution as drawing n indices, in O(B * levels) instead of O(B * n).
        draws = rng.multinomial(n, counts / n, size=resamples)
        means = draws @ uniq / n
    else:
        means = np.empty(resamples, dtype=np.float64)
        rows = max(1, _CHUNK_ENTRIES // n)
        for start in range(0, resamples, rows):
            stop = min(resamples, start + rows)
            idx = rng.integers(0, n, size=(stop - start, n))
            means[start:stop] = x[idx].mean(axis=1)
    return percentile_ci(means, confidence)


def bootstrap_run_means_ci(
    runs: Sequence[Sequence[bool]], resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile CI of the mean of run accuracies, each run's 0/1 scores resampled within the run (stratified).

    For runs of different sizes, whose questions cannot be resampled together: the estimand is the mean of the run
    means (the summary's accuracy), which a bootstrap of the pooled scores would weight by run size instead. A run's
    resampled accuracy is exactly ``Binomial(n, p) / n``, the distribution of the mean of n scores drawn with
    replacement.

    Args:
        runs: Each run's scores (non-empty).
        resamples: Number of bootstrap resamples ``B`` (>= 1).
        confidence: Two-sided coverage, e.g. 0.95.
        seed: Seed of ``numpy.random.default_rng``.

    Returns:
        ``(low, high)`` by the percentile rule of :func:`bootstrap_mean_ci`.
    """
    if not runs or any(len(r) == 0 for r in runs):
        raise ValueError("bootstrap_run_means_ci: every run needs a score")
    if resamples < 1:
        raise ValueError(f"bootstrap_run_means_ci: resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples, dtype=np.float64)
    for r in runs:
        x = np.asarray(r, dtype=np.float64)
        means += rng.binomial(x.size, x.mean(), size=resamples) / x.size
    return percentile_ci(means / len(runs), confidence)


def _as_bool(a: np.ndarray | Sequence[bool], name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr.astype(bool)


def paired_deltas(condition: np.ndarray | Sequence[bool], baseline: np.ndarray | Sequence[bool]) -> np.ndarray:
    """Per-sample ``condition - baseline`` of two aligned 0/1 vectors.

    Args:
        condition: Correctness of the condition, aligned by sample id with ``baseline``.
        baseline: Correctness of the baseline.

    Returns:
        An int array of -1/0/+1.
    """
    c, b = _as_bool(condition, "condition"), _as_bool(baseline, "baseline")
    if c.shape != b.shape:
        raise ValueError(f"condition and baseline differ in length: {c.size} vs {b.size}")
    return c.astype(np.int64) - b.astype(np.int64)


def gained_lost(condition: np.ndarray | Sequence[bool], baseline: np.ndarray | Sequence[bool]) -> tuple[int, int]:
    """Samples the condition gets right and the baseline wrong (gained), and the reverse (lost).

    Args:
        condition: Correctness of the condition, aligned with ``baseline``.
        baseline: Correctness of the baseline.
    """
    d = paired_deltas(condition, baseline)
    return int((d > 0).sum()), int((d < 0).sum())


def mcnemar_p(gained: int, lost: int) -> float:
    """Continuity-corrected McNemar test (chi-square, 1 df; equivalently a two-sided normal approximation).

    ``chi2 = (max(|b - c| - 1, 0))^2 / (b + c)``; no discordant pairs gives p = 1.

    Args:
        gained: Discordant pairs in the condition's favour (b).
        lost: Discordant pairs in the baseline's favour (c).
    """
    if gained < 0 or lost < 0:
        raise ValueError(f"mcnemar_p: counts must be >= 0, got {gained}, {lost}")
    total = gained + lost
    if total == 0:
        return 1.0
    chi2 = max(abs(gained - lost) - 1, 0) ** 2 / total
    return float(stats.chi2.sf(chi2, df=1))


def run_mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample SD (``statistics.stdev``, n - 1) of per-run scores.

    Args:
        values: One score per run.

    Returns:
        ``(mean, sd)``; ``sd`` is ``None`` for a single run, where the sample SD is undefined.
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("run_mean_sd: no runs")
    return float(np.mean(vals)), (_stats.stdev(vals) if len(vals) > 1 else None)


def _paired_matrix(condition_runs: Sequence, baseline_runs: Sequence) -> np.ndarray:
    if len(condition_runs) == 0:
        raise ValueError("no runs to compare")
    if len(condition_runs) != len(baseline_runs):
        raise ValueError(
            f"{len(condition_runs)} condition runs but {len(baseline_runs)} baseline runs; pair them first "
            "(repeat a deterministic baseline once per run)"
        )
    return np.stack([paired_deltas(c, b) for c, b in zip(condition_runs, baseline_runs)])


def clustered_deltas(condition_runs: Sequence, baseline_runs: Sequence) -> np.ndarray:
    """Each sample's paired delta averaged over runs (the "clustered" view, n = number of samples).

    Args:
        condition_runs: One aligned 0/1 vector per run of the condition.
        baseline_runs: The baseline vector paired with each run (same length as ``condition_runs``).
    """
    return _paired_matrix(condition_runs, baseline_runs).mean(axis=0)


@dataclass(frozen=True)
class PairedComparison:
    """Pooled paired comparison of a condition with a baseline (one metric).

    Attributes:
        runs: Number of paired runs.
        n_pairs: Pooled paired deltas (runs x samples).
        delta: Mean pooled delta.
        ci_low: Lower percentile-bootstrap end.
        ci_high: Upper percentile-bootstrap end.
        gained_per_run: Mean gained samples per run.
        lost_per_run: Mean lost samples per run.
        gained: Total gained over runs.
        lost: Total lost over runs.
        mcnemar_p: Continuity-corrected McNemar p on the pooled discordant counts.
        resamples: Bootstrap resamples.
        confidence: CI coverage.
        bootstrap_seed: Seed of the bootstrap generator.
    """

    runs: int
    n_pairs: int
    delta: float
    ci_low: float
    ci_high: float
    gained_per_run: float
    lost_per_run: float
    gained: int
    lost: int
    mcnemar_p: float
    resamples: int
    confidence: float
    bootstrap_seed: int

    def to_dict(self) -> dict:
        """Plain-dict form for JSON."""
        return asdict(self)


def compare_paired(
    condition_runs: Sequence,
    baseline_runs: Sequence,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedComparison:
    """Pool the paired deltas of all runs, bootstrap their mean, and count gained/lost samples (the paper's figures).

    Pooling treats runs x questions as independent pairs, which they are not when runs answer the same questions: the
    report keeps these figures as ``pooled_*`` and leads with the question-clustered ones (``clustered``).

    Pooling happens before bootstrapping (e.g. 3 runs x 396 samples = 1,188 deltas); a deterministic baseline is
    paired with every run of the condition.

    Args:
        condition_runs: One aligned 0/1 vector per run of the condition.
        baseline_runs: The baseline vector paired with each run (same length as ``condition_runs``).
        resamples: Bootstrap resamples.
        seed: Bootstrap seed (use :func:`derive_seed` for a per-comparison seed).
        confidence: CI coverage.
    """
    mat = _paired_matrix(condition_runs, baseline_runs)
    runs = mat.shape[0]
    pooled = mat.ravel()
    gained, lost = int((pooled > 0).sum()), int((pooled < 0).sum())
    lo, hi = bootstrap_mean_ci(pooled, resamples=resamples, confidence=confidence, seed=seed)
    return PairedComparison(
        runs=runs,
        n_pairs=int(pooled.size),
        delta=float(pooled.mean()),
        ci_low=lo,
        ci_high=hi,
        gained_per_run=gained / runs,
        lost_per_run=lost / runs,
        gained=gained,
        lost=lost,
        mcnemar_p=mcnemar_p(gained, lost),
        resamples=resamples,
        confidence=confidence,
        bootstrap_seed=seed,
    )
