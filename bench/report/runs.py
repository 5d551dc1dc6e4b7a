"""Find, check and merge the results of finished runs (``bench run`` folders and ``bench diagnose``
folders) into one table, refusing anything that would make the comparison wrong."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from bench.errors import BenchError
from bench.report.results import KEY_COLUMNS
from bench.report.schema import MEMBER, SCHEMA_VERSION, UNVERSIONED, run_schema_version

METHOD_STAGES = ("norm_pre", "gen", "norm_post", "norm_inf", "agg")
METHOD_COLUMNS = ("spec", *METHOD_STAGES)
# A report folder holds this file; a glob over runs/* passes over it instead of calling it a run.
REPORT_MARKER = "report.json"


@dataclass
class RunInfo:
    path: Path
    complete: bool
    config: dict = field(default_factory=dict)
    task: dict | None = None  # the resolved task suite (runs before it was recorded: None)
    finished: float = 0.0  # run.json's modification time: the run writes it last
    rows: int = 0
    schema_version: int = UNVERSIONED  # run.json's (runs before it was recorded: 1)

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class Merged:
    """Rows of every merged run (column ``run`` says which), plus what was found around them."""

    frame: pd.DataFrame
    runs: list[RunInfo]
    skipped: list[tuple[str, str]]  # (path, why) of runs left out with --skip-incomplete
    replaced: list[str]  # cells taken from the newer of two runs (--prefer newest)
    diagnostics: pd.DataFrame | None = None  # bench diagnose: one row per (backbone, classes)
    diagnose_accuracy: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def metric_columns(self) -> list[str]:
        return metric_columns(self.frame.columns)


def is_method_column(col: str) -> bool:
    return col in METHOD_COLUMNS or col.split(".")[0] in METHOD_STAGES


def metric_columns(columns: Iterable[str]) -> list[str]:
    """Every column that is a measured number, per-class accuracies excluded (they are named by
    each dataset's own labels, so two datasets never share them)."""
    return [c for c in columns if c not in KEY_COLUMNS and c != "run" and not is_method_column(c)
            and not c.startswith("acc_class_")]


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Run folders named directly or by a glob (quoted, so the shell leaves it to us)."""
    if not patterns:
        raise BenchError("bench report needs at least one run folder or glob, e.g. bench report 'runs/*'")
    out: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_dir())
            if not matches:
                raise BenchError(f"no run folder matches '{pattern}'")
            out += matches
        else:
            path = Path(pattern)
            if not path.is_dir():
                raise BenchError(f"run folder {path} does not exist")
            out.append(path)
    unique = list(dict.fromkeys(p.resolve() for p in out))
    return [Path(p) for p in unique]


def read_run(path: Path) -> tuple[RunInfo, pd.DataFrame | None, str | None]:
    """The run's rows, or None and the reason it cannot be used."""
    record = path / "run.json"
    info = RunInfo(path=path, complete=False)
    if not record.is_file():
        return info, None, "no run.json: the run has not finished (or this is not a run folder)"
    try:
        meta = json.loads(record.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return info, None, f"run.json is not valid JSON ({err})"
    info.config = meta.get("config") or {}
    info.task = meta.get("task")
    info.schema_version = run_schema_version(meta)
    info.finished = record.stat().st_mtime
    if meta.get("complete") is not True:
        return info, None, "run.json does not say complete: true (the run is still going, or was killed)"
    info.complete = True
    table = path / "results.csv"
    if not table.is_file():
        return info, None, "run.json says complete but results.csv is missing"
    frame = read_results(table)
    info.rows = len(frame)
    if frame.empty:
        return info, None, "results.csv holds no rows"
    return info, frame, None


def read_results(path: Path) -> pd.DataFrame:
    """results.csv with its key columns as text (shots is '5' or 'all'), seeds as ints."""
    frame = pd.read_csv(path, dtype={c: str for c in KEY_COLUMNS if c != "seed"}, keep_default_na=True)
    missing = [c for c in KEY_COLUMNS if c not in frame.columns]
    if missing:
        raise BenchError(f"{path} lacks the column(s) {missing}; it was not written by bench run")
    frame["seed"] = frame["seed"].astype(int)
    if "selection" in frame.columns:  # select families' unlisted members: in the results, not in reports
        frame = frame[frame["selection"].fillna("") != MEMBER].reset_index(drop=True)
    return frame


def is_report_folder(path: Path) -> bool:
    return (path / REPORT_MARKER).is_file()


def is_diagnose_folder(path: Path) -> bool:
    return (path / "diagnostics.csv").is_file() and not (path / "results.csv").is_file()


def load_runs(patterns: Sequence[str], prefer: str | None = None, skip_incomplete: bool = False) -> Merged:
    """Merge the runs; raise BenchError on anything that cannot be compared.

    A partial or missing run stops the merge (naming it) unless ``skip_incomplete``, in which
    case it is listed in ``Merged.skipped`` and in the report. Two runs holding the same cell
    are an error naming both, unless ``prefer == 'newest'``.
    """
    if prefer not in (None, "newest"):
        raise BenchError(f"--prefer '{prefer}' is not known; the only choice is --prefer newest")
    frames: list[pd.DataFrame] = []
    runs: list[RunInfo] = []
    skipped: list[tuple[str, str]] = []
    notes: list[str] = []
    diag_frames, diag_acc = [], []
    for path in expand_inputs(patterns):
        if is_report_folder(path):
            notes.append(f"{path} is a report folder, not a run: passed over")
            continue
        if is_diagnose_folder(path):
            diag_frames.append(pd.read_csv(path / "diagnostics.csv"))
            if (path / "accuracy.csv").is_file():
                diag_acc.append(read_results(path / "accuracy.csv"))
            continue
        info, frame, why = read_run(path)
        if frame is None:
            if not skip_incomplete:
                raise BenchError(f"run {path}: {why}. Wait for it to finish or re-run it, leave it out, "
                                 "or pass --skip-incomplete to report without it")
            skipped.append((str(path), why or ""))
            continue
        if (path / "diagnostics.csv").is_file():
            diag_frames.append(pd.read_csv(path / "diagnostics.csv"))
            if (path / "accuracy.csv").is_file():
                diag_acc.append(read_results(path / "accuracy.csv"))
        frame.insert(0, "run", str(path))
        frames.append(frame)
        runs.append(info)
    if not frames:
        why = "; ".join(f"{p}: {w}" for p, w in skipped) or "none of the folders is a run"
        raise BenchError(f"no finished run to report ({why})")
    _check_same_schema(runs)
    _check_same_metrics(frames)
    _check_same_protocol(runs)
    merged = pd.concat(frames, ignore_index=True, sort=False)
    _check_one_spec_per_method(merged)
    merged, replaced = _resolve_duplicates(merged, runs, prefer)
    return Merged(
        frame=merged, runs=runs, skipped=skipped, replaced=replaced,
        diagnostics=pd.concat(diag_frames, ignore_index=True) if diag_frames else None,
        diagnose_accuracy=pd.concat(diag_acc, ignore_index=True) if diag_acc else None,
        notes=notes,
    )


def _check_same_schema(runs: list[RunInfo]) -> None:
    """Runs written under different results schemas (bench.report.schema) may name or mean
    their columns differently, so they are never merged."""
    versions = sorted({r.schema_version for r in runs})
    if len(versions) > 1:
        by_version = {v: [str(r.path) for r in runs if r.schema_version == v] for v in versions}
        listed = "; ".join(f"schema {v}: {', '.join(paths)}" for v, paths in by_version.items())
        raise BenchError(f"the runs were written with different results schemas ({listed}); re-run the runs of the "
                         f"other schemas with this bench version (schema {SCHEMA_VERSION}), or report each schema's "
                         "runs separately")


def _check_same_metrics(frames: list[pd.DataFrame]) -> None:
    first = frames[0]
    want = set(metric_columns(first.columns))
    for other in frames[1:]:
        have = set(metric_columns(other.columns))
        if have != want:
            a, b = first["run"].iloc[0], other["run"].iloc[0]
            raise BenchError(
                f"runs {a} and {b} do not have the same metric columns "
                f"(only in the first: {sorted(want - have)}; only in the second: {sorted(have - want)}); "
                "re-run them with the same bench version, or report them separately")


# What makes two runs of one task comparable: the same queries and the same class subsets.
# Shots, seeds and the subsets chosen may differ: they are cells of their own.
PROTOCOL_FIELDS = ("dataset", "queries", "holdout", "class_splits")


def _check_same_protocol(runs: list[RunInfo]) -> None:
    """Runs of the same task name must have drawn their episodes the same way, or their seeds
    would be averaged as repeats of one condition when they are not."""
    seen: dict[str, RunInfo] = {}
    for run in runs:
        if not run.task:
            continue
        first = seen.setdefault(run.task.get("name", ""), run)
        for key in PROTOCOL_FIELDS:
            if first.task.get(key) != run.task.get(key):
                raise BenchError(
                    f"runs {first.path} and {run.path} both hold task '{run.task.get('name')}' but with "
                    f"different {key} ({first.task.get(key)!r} vs {run.task.get(key)!r}); their numbers are not "
                    "comparable: give one of them another task name (task.name=...) and re-run it, or report "
                    "them separately")


def _check_one_spec_per_method(frame: pd.DataFrame) -> None:
    """A method name is compared across runs only if it is the same head in all of them."""
    if "spec" not in frame.columns:
        return
    specs = frame.dropna(subset=["spec"]).groupby("method")["spec"].unique()
    for method, values in specs.items():
        if len(values) > 1:
            runs = [sorted(frame.loc[(frame["method"] == method) & (frame["spec"] == v), "run"].unique())[0]
                    for v in values[:2]]
            raise BenchError(f"method '{method}' is {values[0]} in run {runs[0]} but {values[1]} in run {runs[1]}; "
                             "rename one of them (a preset changed between the runs?) and re-run it")


def _resolve_duplicates(frame: pd.DataFrame, runs: list[RunInfo], prefer: str | None):
    dup = frame.duplicated(KEY_COLUMNS, keep=False)
    if not dup.any():
        return frame, []
    clash = frame[dup]
    for (run,), group in clash.groupby(["run"]):
        inner = group.duplicated(KEY_COLUMNS, keep=False)
        if inner.any():
            cell = group[inner].iloc[0]
            raise BenchError(f"run {run} holds the cell {_cell(cell)} more than once; "
                             "its task repeats a seed or shot count: fix the task and re-run it")
    first = clash.iloc[0]
    same = clash[(clash[KEY_COLUMNS] == first[KEY_COLUMNS]).all(axis=1)]
    names = sorted(same["run"].unique())
    if prefer != "newest":
        raise BenchError(f"runs {names[0]} and {names[1]} both hold the cell {_cell(first)} "
                         f"({int(frame[dup].drop_duplicates(KEY_COLUMNS).shape[0])} cells clash in all); leave one of them out, "
                         "or pass --prefer newest to keep the run that finished last")
    finished = {str(r.path): (r.finished, str(r.path)) for r in runs}
    frame = frame.assign(_finished=frame["run"].map(finished))
    frame = frame.sort_values("_finished", kind="stable")
    kept = frame.drop_duplicates(KEY_COLUMNS, keep="last")
    dropped = frame.drop(kept.index)
    replaced = [f"{_cell(r)}: kept {kept_run} over {r['run']}"
                for (_, r), kept_run in zip(dropped.iterrows(),
                                             _kept_runs(dropped, kept))]
    kept = kept.drop(columns="_finished").sort_index()
    return kept.reset_index(drop=True), replaced


def _kept_runs(dropped: pd.DataFrame, kept: pd.DataFrame) -> list[str]:
    index = {tuple(r[KEY_COLUMNS]): r["run"] for _, r in kept.iterrows()}
    return [index[tuple(r[KEY_COLUMNS])] for _, r in dropped.iterrows()]


def _cell(row) -> str:
    return "(" + ", ".join(f"{c}={row[c]}" for c in KEY_COLUMNS) + ")"
