"""The results schema, as data: the fields of run.json and the columns of results.csv /
results.parquet, each with a one-line description, under one version number.

``SCHEMA_VERSION`` changes whenever a field or column is renamed, removed or changes meaning
(adding an optional one does not need a new version); ``bench report`` merges only runs of one
version. A run.json without ``schema_version`` is version 1 (runs written before it existed).
The tests check that what ``bench run`` writes matches these tables, so the docs' schema table
(printed by :func:`markdown`) cannot drift from the code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

SCHEMA_VERSION = 2
# `selection` of a select family member's own rows when the run did not list that member itself
# (bench.selection): results keep them, reports leave them out.
MEMBER = "member"
UNVERSIONED = 1  # the version of a run.json that does not say


@dataclass(frozen=True)
class Field:
    types: tuple[type, ...]  # accepted JSON value types (NoneType: may be null)
    description: str
    required: bool = True  # False: only some runs write it


NONE = type(None)
NUM = (int, float)

# Fields of run.json. Those marked required=False appear only in a complete run (the record
# written before the run starts has the rest).
RUN_FIELDS: dict[str, Field] = {
    "schema_version": Field((int,), "version of this schema (run.json without it: version 1)"),
    "complete": Field((bool,), "true once results.csv is written; a report reads only complete runs"),
    "started": Field((str,), "local start time, ISO 8601"),
    "finished": Field((str, NONE), "local end time, ISO 8601 (null until complete)"),
    "config": Field((dict,), "the run's full config, defaults filled in"),
    "world_size": Field((int,), "number of processes that ran the run"),
    "threads_per_process": Field((int,), "torch CPU threads per process"),
    "dropped_methods": Field((list,), "[method, why] pairs left out of the grid"),
    "versions": Field((dict,), "versions of bench, python, torch, torchvision, lightning, torchmetrics, timm, "
                                "open_clip, transformers, datasets (null: not installed)"),
    "git_commit": Field((str, NONE), "commit of the bench checkout that ran (null: not run from a git checkout)"),
    "git_dirty": Field((bool, NONE), "whether that checkout had uncommitted changes to tracked files"),
    "devices": Field((list,), "names of the visible CUDA devices, else the CPU model"),
    "rows": Field((int,), "number of result rows", required=False),
    "stage_seconds": Field((dict,), "wall seconds of the extract and imprint stages, on rank 0", required=False),
    "dataset": Field((str,), "the dataset source name", required=False),
    "task": Field((dict,), "the resolved task suite, its version included", required=False),
    "cache_entries": Field((list,), "embedding cache entries read (pool, then test split)", required=False),
    "backbone_sha256": Field((str,), "sha256 of the backbone's weights", required=False),
    "backbone_parameters": Field((int,), "parameter count of the backbone's image tower (a "
                                  "vision-language model's text tower is not counted)", required=False),
    "extraction": Field((dict,), "per split: from_cache, images, seconds, images_per_second, peak_memory_bytes, "
                                  "peak_memory (what was measured), device; see EXTRACTION_FIELDS", required=False),
    "classes": Field((dict,), "class id -> class name, as the pool numbers them", required=False),
    "dropped_query_classes": Field((list,), "query classes without pool samples, left out", required=False),
    "unlabelled": Field((dict,), "split -> samples without a label, left out of every episode", required=False),
    "notes": Field((list,), "what the run noticed about its data", required=False),
}

# run.json's extraction.<split>: measured by rank 0 around Trainer.predict.
EXTRACTION_FIELDS: dict[str, Field] = {
    "from_cache": Field((bool,), "true: the split's embeddings were in the cache, nothing was extracted or measured"),
    "images": Field((int,), "images embedded by this run (all processes)"),
    "seconds": Field((*NUM, NONE), "wall seconds of the extraction on rank 0"),
    "images_per_second": Field((*NUM, NONE), "images / seconds (null when from the cache)"),
    "peak_memory_bytes": Field((int, NONE), "peak memory of rank 0 (see peak_memory)"),
    "peak_memory": Field((str, NONE), "cuda_max_memory_allocated (GPU, during extraction) or process_max_rss "
                                      "(CPU, the process's peak since it started)"),
    "device": Field((str, NONE), "model name of the device that extracted (GPU or CPU)"),
}

# Columns of results.csv / results.parquet, one row per (backbone, dataset, task, classes, shots, seed, method).
RESULT_COLUMNS: dict[str, Field] = {
    "backbone": Field((str,), "backbone name"),
    "dataset": Field((str,), "dataset source name"),
    "task": Field((str,), "task suite name"),
    "classes": Field((str,), "class subset the episode drew from (all, base, novel, [0,1,...])"),
    "shots": Field((str,), "support samples per class ('0' zero-shot, 'all')"),
    "seed": Field((int,), "episode seed"),
    "method": Field((str,), "method (preset) name; <family>@val / <family>@oracle for selection rows"),
    "spec": Field((str,), "the method as NORM_pre/GEN/NORM_post/NORM_inf/AGG"),
    "norm_pre": Field((str,), "NORM_pre stage name"),
    "gen": Field((str,), "GEN stage name"),
    "norm_post": Field((str,), "NORM_post stage name"),
    "norm_inf": Field((str,), "NORM_inf stage name"),
    "agg": Field((str,), "AGG stage name"),
    "training_free": Field((bool,), "false for gradient-based reference heads (logreg)", required=False),
    "selection": Field((str,), "'' for plain rows, 'validation' or 'oracle' for a family's selected row, 'member' for a family "
                                    "member the run did not list (kept here, left out of reports)",
                       required=False),
    "selected": Field((str,), "the family member a selection row took ('' otherwise)", required=False),
    "validation_acc": Field(NUM, "validation accuracy of the selected member (selection rows)", required=False),
    "ways": Field((int,), "classes drawn per episode (N-way tasks only)", required=False),
    "acc": Field(NUM, "top-1 accuracy on the episode's queries"),
    "balanced_acc": Field(NUM, "mean per-class accuracy over the classes with queries"),
    "macro_f1": Field(NUM, "macro F1 over the classes with queries"),
    "gen_time_s": Field(NUM, "seconds to build the head"),
    "num_proxies": Field((int,), "class vectors (proxies) in the head"),
    "effective_k_min": Field((int,), "fewest proxies of any class"),
    "effective_k_max": Field((int,), "most proxies of any class"),
    "chosen": Field((str,), "settings a GEN chose itself per episode, e.g. c=0.1 ('' if none)", required=False),
}

# Column families named by a pattern (display name -> regex, field): one column per stage option or per class.
RESULT_PATTERNS: dict[str, tuple[str, Field]] = {
    "<stage>.<option>": (r"(norm_pre|gen|norm_post|norm_inf|agg)\.\w+",
                         Field((str, *NUM, bool, NONE), "a stage option, e.g. gen.k", required=False)),
    "acc_class_<label>": (r"acc_class_.+", Field(NUM, "accuracy on one class's queries", required=False)),
}


def result_column(name: str) -> Field | None:
    """The documentation of a results column, or None when the schema does not know it."""
    if name in RESULT_COLUMNS:
        return RESULT_COLUMNS[name]
    return next((f for pattern, f in RESULT_PATTERNS.values() if re.fullmatch(pattern, name)), None)


def run_schema_version(record: dict[str, Any]) -> int:
    version = record.get("schema_version", UNVERSIONED)
    return version if isinstance(version, int) and not isinstance(version, bool) else UNVERSIONED


def _typed(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # a bool is an int to Python, not to this schema
        return bool in types
    return isinstance(value, types)


def run_problems(record: dict[str, Any]) -> list[str]:
    """What in a run.json does not match RUN_FIELDS (and EXTRACTION_FIELDS): missing required
    fields, unknown fields, values of another type. Empty when it matches."""
    out = [f"missing field '{k}'" for k, f in RUN_FIELDS.items() if f.required and k not in record]
    out += [f"undocumented field '{k}'" for k in record if k not in RUN_FIELDS]
    out += [f"field '{k}' is {type(v).__name__}, not {'/'.join(t.__name__ for t in RUN_FIELDS[k].types)}"
            for k, v in record.items() if k in RUN_FIELDS and not _typed(v, RUN_FIELDS[k].types)]
    for split, stats in (record.get("extraction") or {}).items():
        out += [f"extraction.{split}: missing '{k}'" for k in EXTRACTION_FIELDS if k not in stats]
        out += [f"extraction.{split}.{k} is {type(v).__name__}" for k, v in stats.items()
                if k not in EXTRACTION_FIELDS or not _typed(v, EXTRACTION_FIELDS[k].types)]
    return out


def row_problems(rows: Iterable[dict[str, Any]]) -> list[str]:
    """What in result rows does not match the documented columns: undocumented columns,
    required ones missing, values of another type (each named once)."""
    out: dict[str, None] = {}
    for row in rows:
        for k, f in RESULT_COLUMNS.items():
            if f.required and k not in row:
                out[f"missing column '{k}'"] = None
        for k, v in row.items():
            f = result_column(k)
            if f is None:
                out[f"undocumented column '{k}'"] = None
            elif not _typed(v, f.types) and not (isinstance(v, float) and math.isnan(v) and float in f.types):
                out[f"column '{k}' holds {type(v).__name__} ({v!r})"] = None
    return list(out)


def markdown() -> str:
    """The schema as the docs print it."""
    def table(title: str, fields: dict[str, Field]) -> list[str]:
        lines = [f"| {title} | type | required | description |", "|---|---|---|---|"]
        for name, f in fields.items():
            types = "/".join("null" if t is NONE else t.__name__ for t in f.types)
            lines.append(f"| `{name}` | {types} | {'yes' if f.required else 'no'} | {f.description} |")
        return lines

    parts = [f"Results schema version {SCHEMA_VERSION}.", ""]
    parts += table("run.json field", RUN_FIELDS) + [""] + table("run.json extraction.<split> field", EXTRACTION_FIELDS)
    parts += [""] + table("results column", {**RESULT_COLUMNS, **{k: f for k, (_, f) in RESULT_PATTERNS.items()}})
    return "\n".join(parts)
