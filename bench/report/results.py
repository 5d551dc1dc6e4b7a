"""Result tables: one row per (backbone, dataset, classes, shots, seed, method)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

from bench.report.schema import SCHEMA_VERSION
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
    # the file cites its schema itself, for readers who get the table without its run.json
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"bench_schema_version": str(SCHEMA_VERSION).encode()})
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
