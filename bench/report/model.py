"""What a report holds: per (task, dataset, backbone, classes) groups and the comparison across
them. ``build`` fills it; ``page`` renders it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench.report.runs import Merged
from bench.report.stats import Comparison


@dataclass
class Group:
    """What the report shows for one (task, dataset, backbone, classes)."""

    key: tuple
    slug: str
    title: str
    summary: pd.DataFrame
    tables: dict[str, Path] = field(default_factory=dict)
    figures: dict[str, dict[str, Path]] = field(default_factory=dict)  # kind -> {png, svg}
    heatmap_shots: str | None = None


@dataclass
class Report:
    out_dir: Path
    metric: str
    merged: Merged
    groups: list[Group]
    comparison: Comparison
    files: dict[str, Path] = field(default_factory=dict)
    figures: dict[str, dict[str, Path]] = field(default_factory=dict)  # cross-run figures

    @property
    def html(self) -> Path:
        return self.out_dir / "report.html"
