"""Numbers behind the report: mean, spread and confidence interval over seeds per cell, and the
comparison of methods across cells (average ranks, Friedman, a post-hoc test, the critical
difference). The tests come from scipy and scikit-posthocs; nothing here re-implements them."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bench.statistics import ci95_halfwidth

# A table or figure is drawn for each of these; a cell of the cross-cell comparison adds shots.
GROUP_COLUMNS = ["task", "dataset", "backbone", "classes"]
BLOCK_COLUMNS = [*GROUP_COLUMNS, "shots"]
LOWER_IS_BETTER = {"gen_time_s", "num_proxies"}
POSTHOC_TESTS = ("nemenyi", "wilcoxon")


def is_fraction(metric: str) -> bool:
    """Metrics in [0, 1], shown as percentages."""
    return metric in ("acc", "balanced_acc", "macro_f1") or metric.startswith("acc_class_")


def shots_key(shots: str) -> tuple[int, float, str]:
    """Numeric shot counts in order, then anything else ('all') after them."""
    try:
        return (0, float(shots), "")
    except ValueError:
        return (1, 0.0, str(shots))


def ordered_shots(values) -> list[str]:
    return sorted(dict.fromkeys(str(v) for v in values), key=shots_key)


def method_marks(frame: pd.DataFrame) -> pd.DataFrame:
    """Per method: ``selection`` ("" plain, "validation" chosen on validation, "oracle" best on
    test), ``training_free`` and the ``label`` tables show. Runs written before these columns
    existed are plain and training-free."""
    methods = list(dict.fromkeys(frame["method"]))
    sel = frame.groupby("method", sort=False)["selection"].first() if "selection" in frame.columns else None
    free = frame.groupby("method", sort=False)["training_free"].first() if "training_free" in frame.columns else None
    out = pd.DataFrame(index=pd.Index(methods, name="method"))
    out["selection"] = ["" if sel is None or pd.isna(sel.get(m)) else str(sel.get(m)) for m in methods]
    out["training_free"] = [True if free is None or pd.isna(free.get(m)) else bool(free.get(m)) for m in methods]
    out["label"] = [method_label(m, s, f) for m, s, f in zip(methods, out["selection"], out["training_free"])]
    return out


def method_label(method: str, selection: str = "", training_free: bool = True) -> str:
    """What a table calls a method: oracle rows (chosen on the test set) and gradient-based heads
    say so; rows selected on validation say how they were chosen."""
    marks = {"oracle": " (oracle)", "validation": " (selected on validation)"}.get(selection, "")
    return method + marks + ("" if training_free else " (gradient-based)")


def summarise(frame: pd.DataFrame, metric: str = "acc") -> pd.DataFrame:
    """One row per (task, dataset, backbone, classes, method, shots): mean, std (ddof 1), n seeds,
    the 95% CI, and whether the cell is the best of its (group, shots) column. Oracle rows (picked
    on the test set) are never the best: a star must not reward looking at the test set."""
    if metric not in frame.columns:
        raise KeyError(metric)
    keys = [*GROUP_COLUMNS, "method", "shots"]
    grouped = frame.groupby(keys, sort=False, dropna=False)[metric]
    out = grouped.agg(mean="mean", std="std", n="count").reset_index()
    # one seed has no spread: std stays NaN (shown as the mean alone), never a reassuring 0
    half = [ci95_halfwidth(s, int(n)) for s, n in zip(out["std"], out["n"])]
    out["ci95_low"] = out["mean"] - np.asarray(half)
    out["ci95_high"] = out["mean"] + np.asarray(half)
    if is_fraction(metric):  # a t interval knows no bounds; an accuracy stays within [0, 1]
        out["ci95_low"] = out["ci95_low"].clip(lower=0.0)
        out["ci95_high"] = out["ci95_high"].clip(upper=1.0)
    pick = "min" if metric in LOWER_IS_BETTER else "max"
    marks = method_marks(frame)
    eligible = out["method"].map(marks["selection"]).ne("oracle")
    best = out.assign(_eligible=out["mean"].where(eligible)).groupby(
        [*GROUP_COLUMNS, "shots"], sort=False)["_eligible"].transform(pick)
    # Equal means up to float noise share the mark: a tie is not a win.
    out["best"] = eligible & np.isclose(out["mean"], best, rtol=0, atol=1e-12)
    out.insert(len(keys), "metric", metric)
    for column in ("selection", "training_free", "label"):
        out[column] = out["method"].map(marks[column])
    if "spec" in frame.columns:
        out.insert(len(GROUP_COLUMNS) + 1, "spec", out["method"].map(frame.groupby("method")["spec"].first()))
    return out


@dataclass
class Comparison:
    """Methods compared across cells (one cell = task, dataset, backbone, classes, shots; the
    value in a cell is the mean over seeds, so seeds are not counted as independent data sets)."""

    metric: str
    blocks: pd.DataFrame  # cells x methods
    ranks: pd.Series  # average rank per method, 1 = best
    excluded: list[str]  # methods missing from some cell, left out of the test
    friedman_stat: float = float("nan")
    friedman_p: float = float("nan")
    posthoc: str = "nemenyi"
    pvalues: pd.DataFrame | None = None  # method x method, adjusted where the test says so
    cd: float | None = None  # Nemenyi critical difference of average ranks at alpha
    alpha: float = 0.05
    notes: list[str] = field(default_factory=list)

    @property
    def defined(self) -> bool:
        return self.pvalues is not None


def compare_methods(frame: pd.DataFrame, metric: str = "acc", posthoc: str = "nemenyi",
                    alpha: float = 0.05) -> Comparison:
    import scikit_posthocs as sp
    from scipy.stats import friedmanchisquare, studentized_range

    if posthoc not in POSTHOC_TESTS:
        from bench.errors import BenchError

        raise BenchError(f"--posthoc '{posthoc}' is not one of {', '.join(POSTHOC_TESTS)}")
    oracle = method_marks(frame)["selection"].eq("oracle")
    # An oracle row is a member's test score picked on the test set: ranked, it would rank picking on test.
    frame = frame[~frame["method"].isin(oracle.index[oracle])]
    cells = frame.groupby([*BLOCK_COLUMNS, "method"], sort=False)[metric].mean().unstack("method")
    methods = list(dict.fromkeys(frame["method"]))
    cells = cells[methods]
    complete = [m for m in methods if cells[m].notna().all()]
    excluded = [m for m in methods if m not in complete]
    blocks = cells[complete]
    higher_better = metric not in LOWER_IS_BETTER
    ranks = blocks.rank(axis=1, ascending=not higher_better, method="average").mean().sort_values()
    out = Comparison(metric, blocks, ranks, excluded, posthoc=posthoc, alpha=alpha)
    k, n = blocks.shape[1], blocks.shape[0]
    if excluded:
        out.notes.append(f"left out of the test (missing from some cells): {', '.join(excluded)}")
    if oracle.any():
        out.notes.append(f"oracle rows (chosen on the test set) left out: {', '.join(oracle.index[oracle])}")
    if k < 3 or n < 2:
        out.notes.append(f"the Friedman test needs at least 3 methods and 2 cells present in every cell; "
                         f"there are {k} methods and {n} cells")
        return out
    values = blocks.to_numpy(dtype=float)
    if np.all(values == values[:, :1]):
        out.notes.append("every method has the same value in every cell: nothing to test")
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = friedmanchisquare(*[values[:, j] for j in range(k)])
    out.friedman_stat, out.friedman_p = float(res.statistic), float(res.pvalue)
    oriented = blocks if higher_better else -blocks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if posthoc == "nemenyi":
            pvals = sp.posthoc_nemenyi_friedman(oriented.reset_index(drop=True))
            q = studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2)
            out.cd = float(q * math.sqrt(k * (k + 1) / (6 * n)))
        else:
            long = oriented.reset_index(drop=True).melt(var_name="method", value_name="value")
            pvals = sp.posthoc_wilcoxon(long, val_col="value", group_col="method", p_adjust="holm",
                                        zero_method="zsplit")
    pvals = pvals.loc[complete, complete].astype(float).fillna(1.0)
    out.pvalues = pvals
    return out
