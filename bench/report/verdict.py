"""Does multi-proxy k-means imprinting beat mean imprinting? A paired comparison over the same
episodes: a win is claimed only when the mean per-episode difference exceeds the spread over
seeds, the standard deviation of those per-episode differences. Pairing removes what the two
methods share (an easy or a hard draw of support and queries), which the unpaired ± of the
tables still holds."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from bench.report.stats import ordered_shots

EPISODE = ("backbone", "dataset", "task", "classes", "shots", "seed")


@dataclass
class Paired:
    method: str
    baseline: str
    shots: str
    method_mean: float
    baseline_mean: float
    diff: float  # mean over episodes of (method - baseline)
    spread: float  # standard deviation of the per-episode differences; NaN with one episode
    n: int
    # Both methods scored the same on every seed: the seeds drew the same episode (shots=all
    # with a fixed query set), so there is one observation and no spread to judge against.
    identical: bool = False

    @property
    def outcome(self) -> str:
        """'win', 'loss' or 'tie' (within the spread over seeds, or one seed: nothing to judge)."""
        if self.n < 2 or self.identical or math.isnan(self.spread):
            return "tie"
        if self.diff > self.spread and self.diff > 0:
            return "win"
        if self.diff < -self.spread and self.diff < 0:
            return "loss"
        return "tie"

    def describe(self) -> str:
        if self.n < 2:
            spread = "one seed: no spread to judge against"
        elif self.identical:
            spread = f"the same on all {self.n} seeds: no spread to judge against"
        else:
            spread = f"std {100 * self.spread:.1f} over {self.n} seeds"
        return (f"{self.shots}-shot: {self.method} {100 * self.method_mean:.1f}% vs {self.baseline} "
                f"{100 * self.baseline_mean:.1f}%, paired difference {100 * self.diff:+.1f} points ({spread})")


def paired(rows: Sequence[dict[str, Any]], subset: str, shots: str, method: str, baseline: str,
           metric: str = "acc") -> Paired | None:
    """Pair the two methods' rows on the same episode; None when they share no episode."""
    def by_episode(name: str) -> dict[tuple, float]:
        return {tuple(str(r[c]) for c in EPISODE): float(r[metric]) for r in rows
                if r["method"] == name and r["classes"] == subset and str(r["shots"]) == shots}

    a, b = by_episode(method), by_episode(baseline)
    common = sorted(set(a) & set(b))
    if not common:
        return None
    diffs = [a[e] - b[e] for e in common]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else float("nan")
    identical = n > 1 and len({a[e] for e in common}) == 1 and len({b[e] for e in common}) == 1
    return Paired(method, baseline, shots, sum(a[e] for e in common) / n, sum(b[e] for e in common) / n,
                  mean, sd, n, identical)


def multiproxy_verdict(rows: Sequence[dict[str, Any]], subset: str, mean_method: str = "qi2018",
                       metric: str = "acc") -> str | None:
    """One sentence on the higher half of the shot counts, for the best k-means head (k > 1) at
    each of them against ``mean_method``; None when the run has no such pair."""
    # rows picked by selection (@val, @oracle) repeat a member's scores; only plain heads compete
    subset_rows = [r for r in rows if r["classes"] == subset and not _selected(r.get("selection"))]
    kmeans = sorted({r["method"] for r in subset_rows
                     if r.get("gen") == "kmeans" and _k(r.get("gen.k")) > 1})
    if not kmeans or not any(r["method"] == mean_method for r in subset_rows):
        return None
    shots = ordered_shots(r["shots"] for r in subset_rows)
    results: list[Paired] = []
    for s in shots[len(shots) // 2:]:
        candidates = [p for m in kmeans if (p := paired(subset_rows, subset, s, m, mean_method, metric))]
        if candidates:
            results.append(max(candidates, key=lambda p: p.method_mean))
    if not results:
        return None
    outcomes = [p.outcome for p in results]
    wins, losses = outcomes.count("win"), outcomes.count("loss")
    if wins == len(results):
        verdict = "multi-proxy k-means beats mean imprinting"
    elif losses == len(results):
        verdict = "mean imprinting beats multi-proxy k-means"
    elif wins or losses:
        won = ", ".join(f"{p.shots}-shot" for p in results if p.outcome == "win") or "no shot count"
        lost = ", ".join(f"{p.shots}-shot" for p in results if p.outcome == "loss")
        verdict = f"multi-proxy k-means beats mean imprinting at {won} only" + (
            f" and loses at {lost}" if lost else "")
    else:
        verdict = "neither multi-proxy k-means nor mean imprinting wins beyond the spread over seeds"
    return (f"On '{subset}' classes at higher shot counts, {verdict} "
            f"({'; '.join(p.describe() for p in results)}).")


def _k(value: Any) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return 1


def _selected(value: Any) -> bool:
    return isinstance(value, str) and value != ""
