"""pass@k: the unbiased estimator of Chen et al. 2021 and bootstrap confidence intervals.

With n samples of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the probability that k
samples drawn without replacement from the n include a pass. Averaged over problems; the
interval resamples problems with replacement (90% by default, as the paper reports).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k), as a product so large n neither overflows nor loses precision."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def per_problem(ns: Sequence[int], cs: Sequence[int], k: int) -> np.ndarray:
    return np.array([pass_at_k(n, c, k) for n, c in zip(ns, cs)])


def bootstrap_ci(values: np.ndarray, level: float = 0.9, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean over problems, resampling problems with replacement."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)
