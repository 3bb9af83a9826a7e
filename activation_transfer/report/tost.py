"""Equivalence (TOST) and degradation tests of the paper (arXiv 2606.03280, section 4.4), normal approximation.

Both run on the *clustered* view: each sample's paired delta averaged over runs (``stats.clustered_deltas``,
n = number of samples), with standard error ``sd(ddof=1) / sqrt(n)``. When every delta is the same value ``c`` the
standard error is 0 and the normal approximation says nothing (it used to call any n "equivalent", n = 2 included);
the tests then use the exact bound that deltas in [-1, 1] allow: under H0 ``delta >= m`` (``c < m``) a delta equals
``c`` with probability at most ``(1 - m) / (1 - c)``, so n of them at most that to the n-th power.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

# The paper's equivalence margins (accuracy units).
DEFAULT_MARGINS = (0.05, 0.03)
# Fewer questions than this differing between the two conditions: the normal approximation of TOST is rough (one
# differing question out of 100 gives a 90% CI of [-0.006, +0.026], "equivalent" at 0.03, where the exact bound on the
# share of differing questions is 0.047), so the tables mark the verdict.
FEW_DIFFER = 10


def _mean_se(deltas: np.ndarray | Sequence[float]) -> tuple[float, float, int]:
    """Mean, standard error and n; the standard error is exactly 0 when all deltas are one value (rounding of the
    mean would otherwise leave an se of 1e-17 and a z of 1e15)."""
    d = np.asarray(deltas, dtype=np.float64).ravel()
    if d.size < 2:
        raise ValueError(f"need at least 2 samples for a standard error, got {d.size}")
    if d.min() == d.max():
        return float(d[0]), 0.0, int(d.size)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size)), int(d.size)


@dataclass(frozen=True)
class TostResult:
    """Two one-sided tests (normal approximation) for ``|delta| < margin``.

    Attributes:
        n: Number of (clustered) deltas.
        delta: Mean delta.
        se: Standard error of the mean.
        ci90_low: ``delta - z_{1-alpha} * se`` (the (1 - 2 alpha) CI; 90% at alpha 0.05).
        ci90_high: ``delta + z_{1-alpha} * se``.
        margin: Equivalence margin.
        p_lower: p of H0 ``delta <= -margin``.
        p_upper: p of H0 ``delta >= +margin``.
        p: ``max(p_lower, p_upper)``.
        alpha: Level of each one-sided test.
        equivalent: ``p < alpha`` (equivalently the CI lies inside ``(-margin, margin)``).
        n_differ: Number of deltas that are not 0 (questions on which the two conditions differ); with few of them
            the normal approximation is rough (tables mark rows under ``FEW_DIFFER``).
    """

    n: int
    delta: float
    se: float
    ci90_low: float
    ci90_high: float
    margin: float
    p_lower: float
    p_upper: float
    p: float
    alpha: float
    equivalent: bool
    n_differ: int

    def to_dict(self) -> dict:
        """Plain-dict form for JSON."""
        return asdict(self)


def _constant_p(c: float, m: float, n: int) -> float:
    """Exact p of H0 ``delta >= m`` when all n deltas (each in [-1, 1]) equal ``c``.

    The distribution under H0 that makes ``c`` likeliest puts mass q on +1 and 1 - q on c, with q(1) + (1 - q)c = m.
    """
    if c >= m:
        return 1.0
    # m >= 1: no law of deltas in [-1, 1] has mean m while giving c < m (0, not the negative (1 - m)^n of m > 1).
    return float(max(0.0, (1.0 - m) / (1.0 - c)) ** n)


def _constant_bound(c: float, n: int, alpha: float) -> float:
    """The m at which ``_constant_p(c, m, n) == alpha``: the exact one-sided upper confidence bound of delta."""
    return 1.0 - (1.0 - c) * alpha ** (1.0 / n)


def _upper_tail(z_num: float, se: float) -> float:
    # P(Z >= z_num / se) for se > 0.
    return float(stats.norm.sf(z_num / se))


def tost(deltas: np.ndarray | Sequence[float], margin: float, alpha: float = 0.05) -> TostResult:
    """TOST equivalence test with a normal approximation.

    Args:
        deltas: Paired deltas (the clustered view: per-sample deltas averaged over runs).
        margin: Equivalence margin (> 0), in accuracy units.
        alpha: Level of each one-sided test; the reported CI is the matching (1 - 2 alpha) CI.
    """
    if margin <= 0:
        raise ValueError(f"tost: margin must be > 0, got {margin}")
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"tost: alpha must be in (0, 0.5), got {alpha}")
    mean, se, n = _mean_se(deltas)
    if se == 0.0:
        # Every delta equals the mean: the exact bound (module docstring); H0 delta <= -m mirrors H0 delta >= m.
        p_lower = _constant_p(-mean, margin, n)
        p_upper = _constant_p(mean, margin, n)
        low, high = -_constant_bound(-mean, n, alpha), _constant_bound(mean, n, alpha)
    else:
        z = float(stats.norm.ppf(1.0 - alpha))
        p_lower = _upper_tail(mean + margin, se)  # H0: delta <= -margin
        p_upper = _upper_tail(margin - mean, se)  # H0: delta >= +margin
        low, high = mean - z * se, mean + z * se
    p = max(p_lower, p_upper)
    return TostResult(
        n=n,
        delta=mean,
        se=se,
        ci90_low=low,
        ci90_high=high,
        margin=float(margin),
        p_lower=p_lower,
        p_upper=p_upper,
        p=p,
        alpha=alpha,
        equivalent=p < alpha,
        n_differ=int(np.count_nonzero(np.asarray(deltas, dtype=np.float64))),
    )


def degradation_p(deltas: np.ndarray | Sequence[float]) -> float:
    """One-sided p of H0 ``delta >= 0`` against H1 ``delta < 0`` (normal approximation).

    With no variation (se = 0) the exact bound of the module docstring: 1 for a zero or positive mean,
    ``(1 / (1 - mean))^n`` for a negative one.

    Args:
        deltas: Paired deltas (the clustered view).
    """
    mean, se, n = _mean_se(deltas)
    if se == 0.0:
        return _constant_p(mean, 0.0, n)
    return _upper_tail(-mean, se)
