"""The whole job: launch the processes, extract (or reuse) embeddings, imprint every head on
every episode, evaluate, write the results table and the run record, log to W&B. The CLI is a
thin shell around these functions."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only

from bench import packaged, selection
from bench.backbones.registry import Backbone, build_backbone, check_backbone
from bench.config import RunConfig
from bench.data.episodes import check_subset_name, holdout_indices, select_classes
from bench.data.sources import Source, build_source, check_source
from bench.data.splits import check_query_split, check_split_names, match_classes
from bench.data.tasks import TaskSuite
from bench.engine import RunLabels, gather_rows, imprint_episodes
from bench.errors import BenchError
from bench.extract.cache import CacheEntry, EmbeddingCache, cache_key
from bench.extract.extractor import cached_stats, entry_fields, extract
from bench.imprint import Grid, Reference, expand_grid
from bench.imprint.registry import get
from bench.runtime import configure_threads, quiet_lightning, slug, write_text_atomic

__all__ = ["Embeddings", "RunResult", "extract_stage", "imprint_stage", "launch", "run", "slug"]


def is_rank_zero() -> bool:
    return getattr(rank_zero_only, "rank", 0) == 0


@dataclass
class Embeddings:
    backbone: Backbone
    suite: TaskSuite
    pool: CacheEntry
    queries: CacheEntry | None
    dataset: str = ""
    notes: list[str] = field(default_factory=list)
    dropped_query_classes: list[str] = field(default_factory=list)
    unlabelled: dict[str, int] = field(default_factory=dict)  # split -> samples without a label
    extraction: dict[str, dict] = field(default_factory=dict)  # split -> throughput, peak memory (run.json)
    text: torch.Tensor | None = None  # (classes, D) class text embeddings, when a method reads text (zeroshot)


@dataclass
class RunResult:
    rows: list[dict[str, Any]]
    out_dir: Path
    paths: list[Path] = field(default_factory=list)
    wandb: str | None = None
    dropped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    report: Path | None = None


def load_plugins(plugins: list[str]) -> None:
    """Import the modules (names or .py files) that register a user's own methods or backbone
    families; each once per process, however many stages ask."""
    for item in plugins:
        try:
            if item.endswith(".py"):
                path = packaged.locate(item, "configs") or Path(item)  # configs/examples/... ships too
                if not path.is_file():
                    raise BenchError(f"plugin file {path} does not exist")
                loaded = sys.modules.get(f"bench_plugin_{path.stem}")
                if loaded is not None and Path(loaded.__file__).resolve() == path.resolve():
                    continue
                spec = importlib.util.spec_from_file_location(f"bench_plugin_{path.stem}", path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(item)
        except ImportError as err:
            raise BenchError(f"cannot import plugin '{item}': {err}") from err


def launch(cfg: RunConfig) -> Any:
    """Start the run's processes with Lightning Fabric (one per device and node; a no-op for one),
    and give each its share of the CPU threads. Every stage after this runs in every process."""
    from lightning.fabric import Fabric

    trainer = cfg.trainer
    fabric = Fabric(accelerator=trainer.accelerator, devices=trainer.devices, num_nodes=trainer.num_nodes,
                    strategy=trainer.resolved_strategy(), precision="32-true")
    fabric.launch()
    configure_threads(max(1, fabric.world_size // trainer.num_nodes))
    return fabric


def check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise BenchError(f"cannot write to output folder {path}: {err.strerror}; choose another with "
                         "out_dir=... (or cache_dir=...)") from err


def dataset_of(cfg: RunConfig, suite: TaskSuite) -> str:
    """The run's dataset: the suite's. A different ``dataset.name`` is refused, because the
    suite's class splits and ids were written for its own dataset."""
    if cfg.dataset.name:
        check_source(cfg.dataset.name, cfg.dataset.options)
    check_source(suite.dataset, cfg.dataset.options)
    if suite.queries == "test":
        check_split_names(suite.dataset, cfg.dataset.train_split, cfg.dataset.test_split)
    if cfg.dataset.name and cfg.dataset.name != suite.dataset:
        raise BenchError(
            f"task suite '{suite.name}' is for dataset '{suite.dataset}', but dataset.name is '{cfg.dataset.name}'; "
            f"use a suite written for that dataset, or set task.dataset={cfg.dataset.name} to apply this suite's "
            "class splits to it on purpose"
        )
    return suite.dataset


def extract_stage(cfg: RunConfig, require_cached: bool = False, suite: TaskSuite | None = None,
                  text_methods: Sequence[str] = ()) -> Embeddings:
    """Embeddings of the task's dataset: the pool (train split) and, if needed, the test split.
    ``text_methods`` (from :func:`check_text`) need the backbone's text tower, which a hub model
    shows only once loaded: they are refused then, before any image is embedded."""
    load_plugins(cfg.plugins)  # `bench extract` and `bench diagnose` come here first
    suite = suite or cfg.task.resolve()
    dataset = dataset_of(cfg, suite)
    torch.manual_seed(cfg.seed)  # random-init backbones (weights: null) are seeded by the config
    backbone = build_backbone(cfg.backbone.name, **cfg.backbone.options())
    if text_methods and backbone.text is None:
        raise BenchError(no_text_tower(list(text_methods), cfg.backbone.name))
    cache = EmbeddingCache(cfg.cache_dir)
    splits = [cfg.dataset.train_split] + ([cfg.dataset.test_split] if suite.queries == "test" else [])
    # Every split is opened before any is embedded, so a missing split stops the run at once.
    sources = [build_source(dataset, split=split, **cfg.dataset.options) for split in splits]
    entries, notes = [], list(dict.fromkeys(note for source in sources for note in source.notes))
    extraction: dict[str, dict] = {}
    if len(sources) > 1:  # before any image is embedded: a pool holding the queries is refused
        notes += check_query_split(*sources)
    if sources[0].renumbered:
        notes.append(class_id_note(sources[0]))
    for split, source in zip(splits, sources):
        if require_cached:
            entry = cache.lookup(cache_key(entry_fields(backbone, source, cfg.extract.dtype)))
            if entry is None:
                raise BenchError(
                    f"no cached embeddings of {dataset}/{split} for {backbone.name} in {cache.root}; "
                    "run `bench extract` (or `bench run`) with the same config first"
                )
            extraction[split] = cached_stats()
        else:
            extraction[split] = {}
            entry = extract(
                backbone, source, cache,
                trainer_kwargs={**cfg.trainer.kwargs(), "enable_progress_bar": is_rank_zero()},
                batch_size=cfg.extract.batch_size,
                num_workers=cfg.extract.num_workers,
                dtype=cfg.extract.dtype, skip_corrupt=cfg.extract.skip_corrupt,
                rebuild=cfg.extract.rebuild, shard_size=cfg.extract.shard_size, stats=extraction[split],
            )
        entries.append(entry)
    emb = Embeddings(backbone, suite, entries[0], entries[1] if len(entries) > 1 else None, dataset, notes,
                     unlabelled={source.split: source.unlabelled for source in sources}, extraction=extraction)
    if emb.queries is not None:
        emb.queries, emb.dropped_query_classes = align_query_labels(emb.pool, emb.queries)
        if emb.dropped_query_classes:
            emb.notes.append(f"query classes {emb.dropped_query_classes} of split '{cfg.dataset.test_split}' have no "
                             f"samples in the pool split '{cfg.dataset.train_split}'; their queries are left out")
    return emb


def class_id_note(source: Source, shown: int = 12) -> str:
    """The class ids of a source that numbers its label values (strings, sparse or huge ints):
    a task's class ids (class_splits, explicit lists, even/odd) refer to these."""
    names = source.class_names
    pairs = ", ".join(f"{i} = {name}" for i, name in enumerate(names[:shown]))
    more = f", ... ({len(names)} classes; run.json lists all under classes)" if len(names) > shown else ""
    return (f"the labels of {source.name} ({source.split}) are not class ids 0..K-1; each distinct label is a class, "
            f"numbered in sorted order, and task class ids refer to these numbers: {pairs}{more}")


def align_query_labels(pool: CacheEntry, queries: CacheEntry) -> tuple[CacheEntry, list[str]]:
    """The query split's labels in the pool's label space, matched by class name.

    Two splits of an image folder or a Hugging Face dataset number their classes on their own,
    so the same id can name different classes. A query class the pool lacks gets label -1 (no
    episode draws it) and is reported; nothing is relabelled to another class. A query without
    a label (-1) stays without one.
    """
    pool_names, query_names = pool.class_names, queries.class_names
    if not pool_names or not query_names or pool_names == query_names:
        return queries, []
    labels, dropped = match_classes(pool_names, query_names, queries.labels.numpy())
    manifest = {**queries.manifest, "class_names": list(pool_names)}  # its ids are the pool's now
    return CacheEntry(queries.path, manifest, queries.embeddings, torch.from_numpy(labels), queries.indices), dropped


def check_reference(cfg: RunConfig, grid: Grid) -> list[str]:
    """The methods that read reference-class statistics; without ``reference`` they are refused
    before any work."""
    needs_classes = [s.name for s in grid.specs if get("gen", s.gen.name).needs_reference]
    if needs_classes and cfg.reference is None:
        raise BenchError(f"methods {needs_classes} calibrate from reference classes; set reference: base "
                         "(a class subset of the pool, e.g. a suite's base classes)")
    return needs_classes


def check_text(cfg: RunConfig, grid: Grid) -> list[str]:
    """The methods that read class text embeddings (zeroshot, tip); with a backbone family that has
    no text tower they are refused before any work."""
    specs = list(grid.specs) + [m for fam in selection.families(cfg.select) for m in fam.members]
    needs = list(dict.fromkeys(s.name for s in specs if get("gen", s.gen.name).needs_text))
    if needs:
        family, arg, options = check_backbone(cfg.backbone.name, cfg.backbone.options())
        if family.has_text(arg, options) is False:  # None: known once built (a hub name), checked then
            raise BenchError(no_text_tower(needs, cfg.backbone.name))
    return needs


def no_text_tower(methods: list[str], backbone: str) -> str:
    return (f"methods {methods} read class text embeddings, but backbone {backbone} has no text tower; use "
            "openclip:<arch> or a CLIP/SigLIP hf model, or drop those methods")


def run_templates(cfg: RunConfig, suite: TaskSuite, dataset: str) -> tuple[str, list[str]]:
    """(set name, prompt templates) a run uses: the run config's text section first, then the task's
    own, then the set for the dataset or task name (bench.text.templates_for)."""
    from bench.text import templates_for

    choice = cfg.text.templates if cfg.text.templates is not None else getattr(suite, "templates", None)
    return templates_for(choice, dataset, suite.name)


def text_embeddings(cfg: RunConfig, emb: Embeddings, device: torch.device | None = None) -> torch.Tensor:
    """(classes, D) zero-shot class weights for every pool class (templates averaged; see
    bench.text), cached under ``cache_dir/text`` keyed by model, tokenizer, class names and templates."""
    from bench.text import class_text_embeddings

    tower = emb.backbone.text
    if tower is None:
        raise BenchError(f"backbone {emb.backbone.name} has no text tower, so zeroshot/tip cannot run; use a "
                         "vision-language model (openclip:<arch>, a CLIP/SigLIP hf model) or drop those methods")
    labels = emb.pool.labels
    count = max(len(emb.pool.class_names), int(labels.max()) + 1 if len(labels) else 0)
    names = list(emb.pool.class_names) or [str(i) for i in range(count)]
    # the run config's text section first, then the task's own (a suite may carry class_names / templates)
    override = cfg.text.class_names if cfg.text.class_names is not None else getattr(emb.suite, "class_names", None)
    if isinstance(override, list):
        if len(override) != count:
            raise BenchError(f"text.class_names lists {len(override)} names but the pool has {count} classes; give "
                             "one name per class id, or a mapping id -> name")
        names = list(override)
    elif isinstance(override, dict):
        unknown = sorted(set(override) - set(range(count)))
        if unknown:
            raise BenchError(f"text.class_names names class ids {unknown}, but the pool's ids are 0..{count - 1}")
        names = [override.get(i, name) for i, name in enumerate(names)]
    _, templates = run_templates(cfg, emb.suite, emb.dataset)
    with torch.no_grad():
        return class_text_embeddings(tower, names, templates, cfg.cache_dir, device=device)


def reference_stats(cfg: RunConfig, emb: Embeddings, grid: Grid) -> Reference | None:
    """Statistics of the ``reference`` classes (e.g. base) over the pool: the center-l2 mean,
    and the class means and covariances that generators such as ``dc`` read."""
    needs_classes = check_reference(cfg, grid)
    if cfg.reference is None:
        return None
    labels = emb.pool.labels
    available = torch.unique(labels[labels >= 0]).tolist()
    classes = select_classes(cfg.reference, available, emb.suite.class_splits)
    keep = torch.isin(labels, torch.tensor(classes))
    # Queries drawn from the pool must not inform the statistics that score them. Held-out
    # queries are fixed per class, so they leave the reference whatever the task scores;
    # queries that change with every episode (rest, a count) cannot be kept apart at all.
    suite = emb.suite
    if suite.queries == "holdout":
        keep[torch.as_tensor(holdout_indices(labels.numpy(), classes, suite.holdout), dtype=torch.long)] = False
    elif suite.queries != "test":
        scored = {c for subset in suite.classes for c in select_classes(subset, available, suite.class_splits)}
        if scored & set(classes):
            raise BenchError(f"reference '{cfg.reference}' holds classes the task scores, and with queries: "
                             f"{suite.queries} their queries change with every episode, so they would inform their "
                             "own reference statistics; use queries: holdout or test, or a reference the task does "
                             "not score")
    return Reference.from_embeddings(emb.pool.embeddings[keep].float(), labels[keep],
                                     class_statistics=bool(needs_classes))


def imprint_stage(
    cfg: RunConfig, emb: Embeddings, out_dir: Path | None = None, grid: Grid | None = None, fabric: Any = None
) -> tuple[list[dict], list, int]:
    """Imprint and evaluate every method on every episode of the suite (see bench.engine);
    returns the rows (every rank's, in suite order), the methods dropped from the grid and the
    number of processes."""
    grid = grid or expand_grid(cfg.methods)
    fams = selection.families(cfg.select)
    q_labels = emb.queries.labels.numpy() if emb.queries is not None else None
    episodes = list(emb.suite.episodes(emb.pool.labels.numpy(), q_labels, names=emb.pool.class_names))
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    labels = RunLabels(emb.backbone.name, emb.dataset or cfg.dataset.name or emb.suite.dataset, emb.suite.name,
                       emb.backbone.fingerprint)
    if emb.text is None and check_text(cfg, grid):
        emb.text = text_embeddings(cfg, emb, fabric.device if fabric is not None else None)
    rows = imprint_episodes(
        selection.with_members(grid.specs, fams), episodes, emb.pool, emb.queries, labels,
        reference=reference_stats(cfg, emb, grid),
        max_batch_bytes=int(cfg.imprint.max_batch_bytes), rank=rank, world_size=world,
        heads_dir=out_dir if cfg.save_heads and out_dir is not None else None, progress=rank == 0, select=fams,
        text=emb.text, listed=len(grid.specs),
    )
    return gather_rows(rows, fabric), grid.dropped, world


def plan(cfg: RunConfig, command: str) -> str:
    """What a command would do, checked as far as is possible without loading a model or a
    dataset (``--dry-run``): the config, plugins, task suite, dataset name and method grid."""
    load_plugins(cfg.plugins)
    for backbone in cfg.diagnose.backbone_configs(cfg.backbone) if command == "diagnose" else [cfg.backbone]:
        check_backbone(backbone.name, backbone.options())
    suite = cfg.task.resolve()
    dataset = dataset_of(cfg, suite)
    grid = expand_grid(cfg.methods)
    check_reference(cfg, grid)
    text_methods = check_text(cfg, grid)
    selection.check_selection(selection.families(cfg.select), getattr(suite, "validation", None))
    for where, subset in [("reference", cfg.reference)] + [("task.classes", c) for c in suite.classes]:
        check_subset_name(subset, suite.class_splits, f"{where}: ")
    splits = [cfg.dataset.train_split] + ([cfg.dataset.test_split] if suite.queries == "test" else [])
    episodes = len(suite.classes) * len(suite.shots) * len(suite.seeds)
    free = sum(not s.gen.method("gen").needs_support for s in grid.specs)  # all that runs at 0 shots
    heads = len(suite.classes) * len(suite.seeds) * sum(free if str(n) == "0" else len(grid.specs) for n in suite.shots)
    processes = cfg.trainer.processes * cfg.trainer.num_nodes
    lines = [
        f"bench {command} (dry run: nothing loaded)",
        f"  backbone  {cfg.backbone.name}" + (f" (weights: {cfg.backbone.weights})" if cfg.backbone.weights else ""),
        f"  dataset   {dataset}, splits {', '.join(splits)}",
        f"  task      {suite.name}: classes {suite.classes}, shots {suite.shots}, queries {suite.queries}, "
        f"seeds {suite.seeds} ({episodes} episodes)"
        + (f", {suite.ways}-way" if getattr(suite, "ways", None) else "")
        + (f", validation {suite.validation} per class" if getattr(suite, "validation", None) else ""),
        f"  methods   {len(grid.specs)}: {', '.join(s.name for s in grid.specs)}",
        f"  heads     {heads}",
        f"  processes {processes} ({cfg.trainer.accelerator}, strategy {cfg.trainer.resolved_strategy()})",
        f"  output    {Path(cfg.out_dir) / (cfg.name or slug(f'{suite.name}-{cfg.backbone.name}'))}",
    ]
    lines += [f"  dropped   {text}: {why}" for text, why in grid.dropped]
    if text_methods:
        name, templates = run_templates(cfg, suite, dataset)
        many = "s" if len(templates) != 1 else ""
        more = f" and {len(text_methods) - 3} more" if len(text_methods) > 3 else ""
        lines.append(f"  text      {len(templates)} prompt template{many} ({name}) per class for "
                     f"{', '.join(text_methods[:3])}{more}")
    lines += [f"  select    {f.name}@val, {f.name}@oracle over {len(f.members)} members: "
              f"{', '.join(m.name for m in f.members)}" for f in selection.families(cfg.select)]
    return "\n".join(lines)


def run(cfg: RunConfig, require_cached: bool = False) -> RunResult:
    from bench.report.build import write_run_report
    from bench.report.results import write_table
    from bench.report.wandb_log import log_bench_run

    quiet_lightning()
    load_plugins(cfg.plugins)
    suite = cfg.task.resolve()
    dataset_of(cfg, suite)
    grid = expand_grid(cfg.methods)  # a typo in the grid should stop us before any extraction
    check_reference(cfg, grid)
    text_methods = check_text(cfg, grid)
    selection.check_selection(selection.families(cfg.select), getattr(suite, "validation", None))
    name = cfg.name or slug(f"{suite.name}-{cfg.backbone.name}")
    out_dir = Path(cfg.out_dir) / name
    if is_rank_zero():
        check_writable(out_dir)
    fabric = launch(cfg)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if fabric.global_rank == 0:
        clear_outputs(out_dir)
        write_run_record(out_dir, cfg, None, fabric.world_size, grid.dropped, started=started, complete=False)
    fabric.barrier()  # no rank writes a head before the previous run's are gone
    clock = time.perf_counter()
    emb = extract_stage(cfg, require_cached=require_cached, suite=suite, text_methods=text_methods)
    seconds = {"extract": time.perf_counter() - clock}
    clock = time.perf_counter()
    rows, dropped, world_size = imprint_stage(cfg, emb, out_dir, grid, fabric)
    if not rows:  # never a run that says complete with nothing in it
        raise BenchError("the run produced no result rows: check the task's classes, shots and seeds (at 0 shots "
                         "only methods that need no support, such as zeroshot, give rows)")
    seconds["imprint"] = time.perf_counter() - clock
    result = RunResult(rows, out_dir, dropped=dropped, notes=emb.notes)
    if fabric.global_rank == 0:
        result.paths = write_table(rows, out_dir)
        # The record says complete only once the rows are on disk; the report and the W&B
        # artifact then read (and carry) a finished run.
        write_run_record(out_dir, cfg, emb, world_size, dropped, started=started, complete=True,
                         rows=len(rows), seconds=seconds)
        result.report = write_run_report(out_dir)
        result.wandb = log_bench_run(selection.shown(rows), cfg.to_dict(), name, out_dir, cfg.wandb.mode, cfg.wandb.project,
                                     cfg.wandb.entity)
    fabric.barrier()
    return result


def clear_outputs(out_dir: Path) -> None:
    """A run folder holds one run: a rerun under the same name first removes the previous run's
    results and saved heads, so no stale head or row is ever read as this run's."""
    import shutil

    if (out_dir / "run.json").exists():
        # W&B folders stay: an offline run may not be synced yet, and deleting it would lose it
        print(f"note: {out_dir} held an earlier run; its results, heads and report are replaced "
              f"(its W&B folders under {out_dir / 'wandb'} are kept; sync or delete them yourself)", file=sys.stderr)
    for name in ("results.csv", "results.parquet", "run.json"):
        (out_dir / name).unlink(missing_ok=True)
    for folder in ("heads", "report"):
        shutil.rmtree(out_dir / folder, ignore_errors=True)


def write_run_record(out_dir: Path, cfg: RunConfig, emb: Embeddings | None, world_size: int, dropped, *,
                     started: str, complete: bool, rows: int = 0, seconds: dict | None = None) -> Path:
    """run.json: the config, where the embeddings came from, how many processes and threads ran,
    and whether the run finished (written last, so a report never mistakes a killed run for one)."""
    from bench import provenance
    from bench.report.schema import SCHEMA_VERSION

    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "complete": complete,
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z") if complete else None,
        "config": cfg.to_dict(),
        "world_size": world_size,
        "threads_per_process": torch.get_num_threads(),
        "dropped_methods": dropped,
        # what others need to reproduce or cite the numbers (see bench.report.schema)
        "versions": provenance.versions(),
        **provenance.git_state(),
        "devices": provenance.devices(),
    }
    if emb is not None:
        record.update({
            "rows": rows,
            "stage_seconds": seconds or {},  # on rank 0; the imprint stage includes waiting for the others
            "dataset": emb.dataset,
            # the resolved suite: a report compares runs of one task only if they drew queries alike
            "task": emb.suite.model_dump(mode="json"),
            "cache_entries": [str(e.path) for e in (emb.pool, emb.queries) if e is not None],
            "backbone_sha256": emb.backbone.fingerprint,
            "backbone_parameters": provenance.parameter_count(emb.backbone.model),
            "extraction": emb.extraction,  # split -> images/s and peak memory, or from_cache
            # class id -> name as the pool numbers them (sparse or string labels are remapped)
            "classes": dict(enumerate(emb.pool.class_names)),
            "dropped_query_classes": emb.dropped_query_classes,
            "unlabelled": emb.unlabelled,  # split -> samples without a label, left out of every episode
            "notes": emb.notes,
        })
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "run.json"
    write_text_atomic(path, json.dumps(record, indent=2, default=str))
    return path


def report(result: RunResult) -> str:
    """What the run prints at the end: the methods x shots tables with the multi-proxy verdict,
    what was dropped or noticed, and where the results, the report and the W&B run went."""
    from bench.report.terminal import summary_text

    lines = [summary_text(selection.shown(result.rows))]
    if result.dropped:
        lines.append("methods dropped from the grid: " + "; ".join(f"{s} ({r})" for s, r in result.dropped))
    lines += [f"note: {note}" for note in result.notes]
    lines.append(f"\nresults: {', '.join(str(p) for p in result.paths)}")
    if result.report is not None:
        lines.append(f"report: {result.report}")
    lines.append(f"W&B: {result.wandb}" if result.wandb else "W&B: disabled")
    return "\n".join(lines)
