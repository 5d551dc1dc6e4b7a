"""Task suites: which classes, shots, queries and seeds to evaluate, as YAML under ``tasks/``.

A suite file looks like::

    name: digits-base-novel
    dataset: digits                 # a dataset source name (see bench.data.sources)
    class_splits: {base: [0, 1, 2, 3, 4], novel: "5-9"}   # lists or inclusive ranges
    classes: [base, novel]          # subsets: all | even | odd | a split name | [explicit list]
    shots: [1, 5, 20, all]
    queries: test                   # an int per class, rest, test (the test split) or holdout
    holdout: 0.25                   # with queries: holdout, the share (or count) of each class
    validation: 0.2                 # optional: a share (or count) of each class set apart per episode
    ways: 5                         # optional: N-way episodes, N classes of the subset drawn per seed
    seeds: [0, 1, 2]                # or an inclusive range, e.g. "0-599" (600 episodes per shot count)
    version: "1"                    # bump whenever the suite's content changes (results cite it)

``shots: 0`` draws queries (and validation) with an empty support: the zero-shot point.

Every field is typed; a bad value stops with one line naming the file, the key and the
accepted form. Listing a seed, shot count or class subset twice is an error (it would give
duplicate rows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Sequence, Union

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from bench import packaged
from bench.data.episodes import Episode, draw_ways, sample_episode, select_classes
from bench.errors import BenchError
from bench.validation import format_validation_error, read_yaml_mapping

TASKS_DIR = packaged.folder("tasks")  # the shipped suites (the repository's tasks/, packaged)
SUITE_SUFFIXES = (".yaml", ".yml", ".json")  # JSON is YAML, so a .json suite file reads the same way


def _class_list(value: Any, where: str) -> list[int]:
    """A list of class ids, or a range written as "first-last" (inclusive), e.g. "0-49"."""
    if isinstance(value, str):
        first, sep, last = value.partition("-")
        if not sep or not first.strip().isdigit() or not last.strip().isdigit():
            raise ValueError(f"{where}: '{value}' must be a list of class ids or a range like '0-49'")
        return list(range(int(first), int(last) + 1))
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{where}: must be a list of class ids or a range like '0-49'")
    return list(value)


def _listed(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


def _once(values: list, what: str) -> list:
    if not values:
        raise ValueError(f"no {what} given; list at least one (an empty list would run no episode)")
    seen, twice = set(), []
    for v in values:
        key = tuple(v) if isinstance(v, list) else v
        if key in seen:
            twice.append(v)
        seen.add(key)
    if twice:
        raise ValueError(f"{what} {twice} listed more than once; list each once (duplicates would give duplicate rows)")
    return values



def _number_as_text(value: Any) -> Any:
    # YAML reads `version: 1` as an int and `version: 1.1` as a float; a version is text
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


VersionText = Annotated[str, BeforeValidator(_number_as_text)]

class TaskSuite(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(description="a suite name")]
    dataset: Annotated[str, Field(description="a dataset source name, e.g. digits or imagefolder:<root>")]
    classes: Annotated[list[Union[str, list[int]]],
                       Field(description="a list of class subsets: all, even, odd, a class_splits name, "
                                         "or a list of class ids")] = ["all"]
    shots: Annotated[list[Union[NonNegativeInt, Literal["all"]]],
                     Field(description="a list of ints >= 0 (0: zero-shot, no support) or 'all'")] = [1, 5]
    queries: Annotated[Union[PositiveInt, Literal["rest", "test", "holdout"]],
                       Field(description="a positive int per class, rest, test or holdout")] = "test"
    holdout: Annotated[Union[PositiveInt, float],
                       Field(description="with queries: holdout, a share in (0, 1) or a count per class")] = 0.25
    seeds: Annotated[list[NonNegativeInt], Field(description="a list of ints >= 0, or a range like '0-599'")] = [0]
    class_splits: Annotated[dict[str, Any], Field(description="a mapping of split names to class lists or "
                                                              "ranges like '0-49'")] = {}
    validation: Annotated[Union[PositiveInt, float, None],
                          Field(description="a share in (0, 1) or a count per class set apart per episode to "
                                            "choose settings on")] = None
    ways: Annotated[Union[PositiveInt, None],
                    Field(description="N of N-way episodes: N classes of each subset drawn per seed (>= 2)")] = None
    version: Annotated[VersionText, Field(description="the suite's version; bump it whenever its content changes")] = "1"
    # Zero-shot prompts for text methods; a run config's `text:` section overrides them.
    class_names: Annotated[Union[list[str], dict[int, str], None],
                           Field(description="class names for zero-shot prompts: a list in class-id order, "
                                             "a mapping id -> name, or null")] = None
    templates: Annotated[Union[str, list[str], None],
                         Field(description="zero-shot prompt templates: a set name (imagenet, cifar10, ...), "
                                           "a list with {c} for the class name, or null")] = None


    @field_validator("ways")
    @classmethod
    def _two_ways(cls, value: Any) -> Any:
        if value is not None and value < 2:
            raise ValueError(f"ways {value} must be at least 2 (an episode needs 2+ classes)")
        return value

    @field_validator("classes", "shots", "seeds", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        return _listed(value)

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_range(cls, value: Any) -> Any:
        # N-way results are means over hundreds of episodes (600 in easyfsl / LibFewShot tables)
        return _class_list(value, "seeds") if isinstance(value, str) else value

    @field_validator("shots")
    @classmethod
    def _unique_shots(cls, value: list) -> list:
        return _once(value, "shot count(s)")

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: list) -> list:
        return _once(value, "seed(s)")

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, value: list) -> list:
        for subset in value:
            if isinstance(subset, list) and (not subset or len(set(subset)) < len(subset)):
                raise ValueError(f"class subset {subset} must list each class id once, and at least one")
        return _once(value, "class subset(s)")

    @field_validator("holdout", "validation")
    @classmethod
    def _share(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, float) and not 0 < value < 1:
            raise ValueError(f"{info.field_name} {value} must be a share in (0, 1) or a positive count per class")
        return value

    @field_validator("class_splits")
    @classmethod
    def _ranges(cls, value: dict) -> dict:
        return {k: _class_list(v, f"class_splits.{k}") for k, v in value.items()}

    @model_validator(mode="after")
    def _ways_fit_known_subsets(self) -> TaskSuite:
        # subsets whose size the file itself tells (lists, class_splits); all/even/odd wait for the labels
        if self.ways is not None:
            for subset in self.classes:
                known = subset if isinstance(subset, list) else self.class_splits.get(subset)
                size = None if known is None else len(known)
                if size is not None and size < self.ways:
                    raise ValueError(f"ways {self.ways} is more than the {size} classes of subset {subset}; "
                                     "lower ways or use a larger subset")
        return self

    @classmethod
    def build(cls, data: dict[str, Any], source: str = "task suite") -> TaskSuite:
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise BenchError(format_validation_error(err, cls, source)) from None

    @classmethod
    def load(cls, name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> TaskSuite:
        """A suite file, or a suite name, with ``overrides`` replacing its fields.

        A path (ending in .yaml, .yml or .json) is read as given; one under ``tasks/`` that the
        working directory lacks is the packaged copy. A name is ``./tasks/<name>.yaml`` when that
        exists (a user's own suites, or their edit of a shipped one), else the shipped suite.
        """
        path = Path(name_or_path)
        wanted = path if path.suffix in SUITE_SUFFIXES else Path("tasks") / f"{name_or_path}.yaml"
        found, data = read_tasks_file(wanted, f"task suite '{name_or_path}'", f"known suites: {', '.join(known_suites())}")
        return cls.build({**data, **(overrides or {})}, source=f"task suite {found}")

    def subsets(self, available: Sequence[int]) -> list[tuple[str, list[int]]]:
        """(display name, classes) for every class subset of the suite."""
        out = []
        for subset in self.classes:
            label = subset if isinstance(subset, str) else "[" + ",".join(map(str, subset)) + "]"
            out.append((label, select_classes(subset, available, self.class_splits)))
        return out

    def episodes(
        self, labels: np.ndarray, test_labels: np.ndarray | None = None, names: Sequence[str] | None = None
    ) -> Iterator[tuple[str, Episode]]:
        """Every (class subset, shots, seed) episode of the suite, in a fixed order. ``names``
        (class id -> name) only makes error messages name the classes."""
        available = np.unique(labels[labels >= 0]).tolist()
        subsets = self.subsets(available)
        if self.ways is not None:  # refused before any episode is drawn, not after the first subsets ran
            for label, classes in subsets:
                draw_ways(classes, self.ways, 0, label)
        for label, classes in subsets:
            for shots in self.shots:
                for seed in self.seeds:
                    drawn = classes if self.ways is None else draw_ways(classes, self.ways, seed, label)
                    yield label, sample_episode(labels, drawn, shots, self.queries, seed,
                                                test_labels=test_labels, holdout=self.holdout, names=names,
                                                validation=self.validation, ways=self.ways)


def read_tasks_file(wanted: Path, what: str, known: str) -> tuple[Path, dict]:
    """(the file found, its YAML mapping) for a path under ``tasks/``: the working directory's
    copy, else the shipped one. ``what`` and ``known`` word the error when there is neither."""
    found = packaged.locate(wanted, "tasks")
    if found is None or not found.is_file():
        raise BenchError(f"{what} not found (no file {wanted} here, nor shipped); {known}")
    return found, read_yaml_mapping(found, what.split(" '")[0])  # "task suite" or "benchmark suite"


def known_suites() -> list[str]:
    """Suite names: the shipped ones and those in ./tasks."""
    here = Path("tasks")
    def stems(folder: Path) -> set[str]:  # benchmark suites (*.suite.yaml, bench.data.benchmarks) are not tasks
        return {p.stem for p in folder.glob("*.yaml") if not p.name.endswith(".suite.yaml")}

    return sorted((stems(here) if here.is_dir() else set()) | stems(TASKS_DIR))
