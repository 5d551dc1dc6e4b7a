"""How predicted accuracies are judged besides Kendall's tau (``bench.statistics.kendall_tau``):
R^2, permutation sensitivity, and the regret of label-free head selection."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch


def r2_score(pred, true) -> float:
    from torchmetrics.functional.regression import r2_score as r2

    p, t = torch.as_tensor(np.asarray(pred, dtype=np.float64)), torch.as_tensor(np.asarray(true, dtype=np.float64))
    if len(p) < 2:
        return float("nan")
    return float(r2(p, t))


def permutation_sensitivity(
    predict: Callable[[list], np.ndarray],
    networks: list,
    permute: Callable[[list, torch.Generator], list],
    repeats: int,
    seed: int,
) -> dict[str, float]:
    """The largest and the mean absolute change of the prediction over ``repeats`` random
    hidden-unit permutations of every network, absolute and as % of the prediction range."""
    g = torch.Generator().manual_seed(seed)
    base = np.asarray(predict(networks), dtype=np.float64)
    worst = np.zeros(len(networks))
    for _ in range(repeats):
        moved = np.asarray(predict([permute(n, g) for n in networks]), dtype=np.float64)
        worst = np.maximum(worst, np.abs(moved - base))
    span = float(base.max() - base.min()) or 1.0
    return {"max_abs": float(worst.max()), "mean_abs": float(worst.mean()), "range": span,
            "max_pct_of_range": 100.0 * float(worst.max()) / span}


def selection_regret(
    episodes: Sequence[Sequence[int]],
    true: np.ndarray,
    scores: np.ndarray,
) -> np.ndarray:
    """Per episode (indices of its candidate heads): the best true accuracy minus the true
    accuracy of the candidate with the highest score. Ties in score go to the first candidate."""
    out = []
    for idx in episodes:
        idx = np.asarray(idx)
        out.append(float(true[idx].max() - true[idx[int(np.argmax(scores[idx]))]]))
    return np.asarray(out)
