"""Equivalence (TOST) and degradation tests of the paper (arXiv 2606.03280, section 4.4), normal approximation.

Both run on the *clustered* view: each sample's paired delta averaged over runs (``stats.clustered_deltas``,
n = number of samples), with standard error ``sd(ddof=1) / sqrt(n)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

# The paper's equivalence margins (accuracy units).
DEFAULT_MARGINS = (0.05, 0.03)


def _mean_se(deltas: np.ndarray | Sequence[float]) -> tuple[float, float, int]:
    d = np.asarray(deltas, dtype=np.float64).ravel()
    if d.size < 2:
        raise ValueError(f"need at least 2 samples for a standard error, got {d.size}")
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

    def to_dict(self) -> dict:
        """Plain-dict form for JSON."""
        return asdict(self)


def _upper_tail(z_num: float, se: float) -> float:
    # P(Z >= z_num / se); with se == 0 every resample equals the mean, so the tail is 0 or 1 (never nan).
    if se == 0.0:
        return 0.0 if z_num > 0 else 1.0
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
    z = float(stats.norm.ppf(1.0 - alpha))
    p_lower = _upper_tail(mean + margin, se)  # H0: delta <= -margin
    p_upper = _upper_tail(margin - mean, se)  # H0: delta >= +margin
    p = max(p_lower, p_upper)
    return TostResult(
        n=n,
        delta=mean,
        se=se,
        ci90_low=mean - z * se,
        ci90_high=mean + z * se,
        margin=float(margin),
        p_lower=p_lower,
        p_upper=p_upper,
        p=p,
        alpha=alpha,
        equivalent=p < alpha,
    )


def degradation_p(deltas: np.ndarray | Sequence[float]) -> float:
    """One-sided p of H0 ``delta >= 0`` against H1 ``delta < 0`` (normal approximation).

    With no variation (se = 0) a negative mean gives 0 and a zero or positive mean gives 1.

    Args:
        deltas: Paired deltas (the clustered view).
    """
    mean, se, _ = _mean_se(deltas)
    return _upper_tail(-mean, se)
