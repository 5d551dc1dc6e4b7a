"""Benchmark suites: named sets of task suites, each on its own dataset, run one after another.

A benchmark suite is ``tasks/<name>.suite.yaml``::

    name: vtab-1k
    version: "1"                     # bump whenever a member, a split or a revision changes
    description: ...
    members:
      - task: vtab-1k/caltech101     # a task suite: tasks/vtab-1k/caltech101.yaml
        dataset:                     # the run config's dataset section for this member
          train_split: train[:1000]
          test_split: test
          options: {image_key: webp, label_key: cls, revision: <commit>}

The dataset itself (``hf:<repo>``) is the member task's ``dataset``; ``dataset.options.revision``
is passed to ``datasets.load_dataset(revision=...)``, so it is part of the run config and lands
in every member run's run.json. A member without a pinned revision is listed as unpinned by
``bench suite NAME --dry-run``: its numbers cannot be cited until the revision is pinned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bench import packaged
from bench.data.tasks import VersionText, read_tasks_file
from bench.errors import BenchError
from bench.validation import format_validation_error

SUFFIX = ".suite.yaml"


class MemberDataset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train_split: Annotated[str, Field(description="the pool's split (HF slicing like train[:1000] works)")] = "train"
    test_split: Annotated[str, Field(description="the queries' split name")] = "test"
    options: Annotated[dict[str, Any], Field(description="the dataset source's options, e.g. revision")] = {}


class Member(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: Annotated[str, Field(description="a task suite name or path, e.g. vtab-1k/caltech101")]
    dataset: Annotated[MemberDataset, Field(description="train_split, test_split and options")] = MemberDataset()

    def overrides(self) -> list[str]:
        """The run-config overrides that make a run of this member."""
        options = yaml.safe_dump(self.dataset.options, default_flow_style=True, width=10_000).strip()
        return [f"task={self.task}", f"dataset.train_split={self.dataset.train_split}",
                f"dataset.test_split={self.dataset.test_split}", f"dataset.options={options}"]

    @property
    def revision(self) -> str | None:
        return self.dataset.options.get("revision")


class BenchmarkSuite(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(description="the benchmark suite's name")]
    version: Annotated[VersionText, Field(description="bump whenever the content changes")] = "1"
    description: Annotated[str, Field(description="what the suite is and where it comes from")] = ""
    members: Annotated[list[Member], Field(description="the task suites, each with its dataset section")]

    @field_validator("members")
    @classmethod
    def _distinct(cls, value: list[Member]) -> list[Member]:
        tasks = [m.task for m in value]
        twice = sorted({t for t in tasks if tasks.count(t) > 1})
        if not value or twice:
            raise ValueError(f"members must list each task once, and at least one (twice: {twice})")
        return value

    @classmethod
    def load(cls, name_or_path: str | Path) -> BenchmarkSuite:
        """``tasks/<name>.suite.yaml`` (the working directory's, else the shipped one), or a path."""
        path = Path(name_or_path)
        wanted = path if str(path).endswith(SUFFIX) else Path("tasks") / f"{name_or_path}{SUFFIX}"
        found, data = read_tasks_file(wanted, f"benchmark suite '{name_or_path}'",
                                      f"known: {', '.join(known_benchmarks()) or 'none'}")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise BenchError(format_validation_error(err, cls, f"benchmark suite {found}")) from None

    def unpinned(self) -> list[str]:
        """Members whose dataset revision is not pinned to a commit."""
        return [m.task for m in self.members if not m.revision]


def known_benchmarks() -> list[str]:
    here = Path("tasks")
    names = {p.name[: -len(SUFFIX)] for p in here.glob(f"*{SUFFIX}")} if here.is_dir() else set()
    return sorted(names | {p.name[: -len(SUFFIX)] for p in packaged.folder("tasks").glob(f"*{SUFFIX}")})
