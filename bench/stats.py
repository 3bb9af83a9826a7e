"""Bootstrap speed: 5000 resamples of 1188 paired deltas, the discrete fast path vs the general path.

    python bench/stats.py

Prints seconds per call (best of 3) and the ratio, measured side by side in one run; record the machine and the
torch/numpy thread count with any figure you quote.
"""

from __future__ import annotations

import time

import numpy as np

from activation_transfer.report import stats as st


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    rng = np.random.default_rng(0)
    deltas = rng.choice([-1, 0, 0, 0, 0, 0, 1], size=1188).astype(float)
    noisy = deltas + rng.normal(0, 1e-6, size=deltas.size)  # not discrete: forces the general path
    discrete = best_of(lambda: st.bootstrap_mean_ci(deltas, resamples=5000, seed=0))
    general = best_of(lambda: st.bootstrap_mean_ci(noisy, resamples=5000, seed=0))
    print(f"discrete path: {discrete:.4f} s  general path: {general:.4f} s  ratio {general / discrete:.1f}x")


if __name__ == "__main__":
    main()
