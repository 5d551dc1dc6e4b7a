"""Task suites: which classes, shots, queries and seeds to evaluate, as YAML under ``tasks/``.

A suite file looks like::

    name: digits-base-novel
    dataset: digits                 # a dataset source name (see bench.data.sources)
    class_splits: {base: [0, 1, 2, 3, 4], novel: "5-9"}   # lists or inclusive ranges
    classes: [base, novel]          # subsets: all | even | odd | a split name | [explicit list]
    shots: [1, 5, 20, all]
    queries: test                   # an int per class, 'rest', or 'test' (the test split)
    seeds: [0, 1, 2]
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import yaml

from bench.data.episodes import Episode, sample_episode, select_classes
from bench.errors import BenchError

TASKS_DIR = Path(__file__).resolve().parents[2] / "tasks"


def _class_list(value: Any, where: str) -> list[int]:
    """A list of class ids, or a range written as "first-last" (inclusive), e.g. "0-49"."""
    if isinstance(value, str):
        first, sep, last = value.partition("-")
        if not sep or not first.strip().isdigit() or not last.strip().isdigit():
            raise BenchError(f"{where}: '{value}' must be a list of class ids or a range like '0-49'")
        return list(range(int(first), int(last) + 1))
    if not isinstance(value, list):
        raise BenchError(f"{where}: must be a list of class ids or a range like '0-49'")
    return [int(v) for v in value]


@dataclass
class TaskSuite:
    name: str
    dataset: str
    classes: list[Any] = field(default_factory=lambda: ["all"])
    shots: list[Any] = field(default_factory=lambda: [1, 5])
    queries: Any = "test"
    seeds: list[int] = field(default_factory=lambda: [0])
    class_splits: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "task suite") -> TaskSuite:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BenchError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        for key in ("name", "dataset"):
            if key not in data:
                raise BenchError(f"{source}: missing required key '{key}'")
        data = dict(data)
        data["class_splits"] = {k: _class_list(v, f"{source}: class_splits.{k}")
                                for k, v in (data.get("class_splits") or {}).items()}
        suite = cls(**data)
        for key in ("classes", "shots", "seeds"):
            if not isinstance(getattr(suite, key), list):
                setattr(suite, key, [getattr(suite, key)])
        return suite

    @classmethod
    def load(cls, name_or_path: str | Path) -> TaskSuite:
        """A YAML path, or a suite name looked up in ./tasks and the repository's tasks/."""
        path = Path(name_or_path)
        candidates = [path] if path.suffix in (".yaml", ".yml") else [
            Path("tasks") / f"{name_or_path}.yaml",
            TASKS_DIR / f"{name_or_path}.yaml",
        ]
        for cand in candidates:
            if cand.is_file():
                with open(cand) as f:
                    data = yaml.safe_load(f) or {}
                if not isinstance(data, dict):
                    raise BenchError(f"{cand}: a task suite must be a YAML mapping")
                return cls.from_dict(data, source=str(cand))
        known = sorted(p.stem for p in TASKS_DIR.glob("*.yaml")) if TASKS_DIR.is_dir() else []
        raise BenchError(
            f"task suite '{name_or_path}' not found (looked at {', '.join(map(str, candidates))}); "
            f"known suites: {', '.join(known) or 'none'}"
        )

    def subsets(self, available: Sequence[int]) -> list[tuple[str, list[int]]]:
        """(display name, classes) for every class subset of the suite."""
        out = []
        for subset in self.classes:
            label = subset if isinstance(subset, str) else "[" + ",".join(map(str, subset)) + "]"
            out.append((label, select_classes(subset, available, self.class_splits)))
        return out

    def episodes(
        self, labels: np.ndarray, test_labels: np.ndarray | None = None
    ) -> Iterator[tuple[str, Episode]]:
        """Every (class subset, shots, seed) episode of the suite, in a fixed order."""
        available = np.unique(labels).tolist()
        for label, classes in self.subsets(available):
            for shots in self.shots:
                for seed in self.seeds:
                    yield label, sample_episode(
                        labels, classes, shots, self.queries, seed, test_labels=test_labels
                    )
