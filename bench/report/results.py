"""Result tables: one row per (backbone, dataset, classes, shots, seed, method)."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from bench.runtime import atomic_path

KEY_COLUMNS = ["backbone", "dataset", "task", "classes", "shots", "seed", "method"]


def write_table(rows: Sequence[dict[str, Any]], out_dir: Path, stem: str = "results") -> list[Path]:
    """CSV always, Parquet when pyarrow is installed; each written to a temporary name first."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    paths = []
    csv_path = out_dir / f"{stem}.csv"
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    paths.append(csv_path)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return paths
    table = pa.Table.from_pylist([{c: _plain(r.get(c)) for c in columns} for r in rows])
    pq_path = out_dir / f"{stem}.parquet"
    with atomic_path(pq_path) as tmp:
        pq.write_table(table, tmp)
    paths.append(pq_path)
    return paths


def _plain(v: Any) -> Any:
    return str(v) if isinstance(v, (list, dict)) else v


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def summarise(rows: Sequence[dict[str, Any]], metric: str = "acc") -> dict[tuple, tuple[float, float]]:
    """(classes, method, shots) -> (mean, std) of ``metric`` over seeds."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        groups[(r["classes"], r["method"], str(r["shots"]))].append(float(r[metric]))
    return {k: mean_std(v) for k, v in groups.items()}


def format_table(rows: Sequence[dict[str, Any]], metric: str = "acc") -> str:
    """Methods against shots, one block per class subset: mean accuracy (%) over seeds."""
    summary = summarise(rows, metric)
    subsets = list(dict.fromkeys(r["classes"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    shots = list(dict.fromkeys(str(r["shots"]) for r in rows))
    seeds = len({r["seed"] for r in rows})
    width = max(len(m) for m in methods)
    out = []
    for subset in subsets:
        out.append(f"\n{metric} (%) on classes '{subset}', mean ± std over {seeds} seed(s)")
        out.append(f"{'method':<{width}} " + " ".join(f"{s + '-shot':>13}" for s in shots))
        for m in methods:
            cells = []
            for s in shots:
                if (subset, m, s) in summary:
                    mu, sd = summary[(subset, m, s)]
                    cells.append(f"{100 * mu:6.1f} ±{100 * sd:4.1f}")
                else:
                    cells.append("-")
            out.append(f"{m:<{width}} " + " ".join(f"{c:>13}" for c in cells))
    return "\n".join(out)


def multiproxy_verdict(rows: Sequence[dict[str, Any]], subset: str, mean_method: str = "qi2018") -> str | None:
    """Kept for callers of the old name: the paired verdict of ``bench.report.verdict``."""
    from bench.report.verdict import multiproxy_verdict as paired_verdict

    return paired_verdict(rows, subset, mean_method)
