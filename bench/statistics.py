"""The statistics every subsystem reports with, written once: a mean with its spread over seeds,
its 95% interval, and rank correlations (Kendall's tau-b and weighted tau).

One seed has no spread: its std is NaN (shown as the mean alone), never a reassuring 0. A rank
correlation of fewer than two points, or of a constant, is NaN.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1); std is NaN for a single value."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else float("nan")


def ci95_halfwidth(std: float, n: int) -> float:
    """Half-width of the t-based 95% confidence interval of a mean of n values (NaN for one)."""
    from scipy.stats import t

    if n < 2 or not math.isfinite(std):
        return float("nan")
    return float(t.ppf(0.975, n - 1) * std / math.sqrt(n))


def _ranked(x, y) -> tuple[np.ndarray, np.ndarray] | None:
    a, b = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"rank correlation of {a.size} against {b.size} values")
    if a.size < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return None
    if np.all(a == a[0]) or np.all(b == b[0]):
        return None
    return a, b


def kendall_tau(x, y) -> float:
    """Kendall's tau-b (ties counted as scipy counts them); NaN when undefined."""
    from scipy.stats import kendalltau

    pair = _ranked(x, y)
    return float("nan") if pair is None else float(kendalltau(*pair).statistic)


def weighted_tau(x, y) -> float:
    """scipy's weighted tau (top ranks count more); NaN when undefined."""
    from scipy.stats import weightedtau

    pair = _ranked(x, y)
    return float("nan") if pair is None else float(weightedtau(*pair).statistic)
