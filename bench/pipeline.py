"""The whole job: extract (or reuse) embeddings, imprint every head on every episode, evaluate,
write the results table and log to W&B. The CLI is a thin shell around these functions."""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from tqdm.auto import tqdm

from bench.backbones.registry import Backbone, build_backbone
from bench.config import RunConfig, workers_for
from bench.data.datamodules import EpisodeDataModule
from bench.data.episodes import select_classes
from bench.data.sources import build_source
from bench.data.tasks import TaskSuite
from bench.errors import BenchError
from bench.extract.cache import CacheEntry, EmbeddingCache, cache_key
from bench.extract.extractor import entry_fields, extract
from bench.imprint import Grid, expand_grid
from bench.module import ImprintingModule, trainer_for_imprinting
from bench.report.results import format_table, multiproxy_verdict, write_table
from bench.report.wandb_log import log_to_wandb


def quiet_lightning() -> None:
    """Keep the terminal for our progress and tables: Lightning's banners are noise here."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (
        ".*does not have many workers.*",
        ".*configure_optimizers.*",
        ".*`training_step` returned `None`.*",
        ".*LightningModule.configure_optimizers` returned `None`.*",
        ".*Starting from v1.9.0, `tensorboardX` has been removed.*",
        ".*litlogger.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def is_rank_zero() -> bool:
    return getattr(rank_zero_only, "rank", 0) == 0


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")


@dataclass
class Embeddings:
    backbone: Backbone
    suite: TaskSuite
    pool: CacheEntry
    queries: CacheEntry | None


@dataclass
class RunResult:
    rows: list[dict[str, Any]]
    out_dir: Path
    paths: list[Path] = field(default_factory=list)
    wandb: str | None = None
    dropped: list[tuple[str, str]] = field(default_factory=list)


def check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise BenchError(f"cannot write to output folder {path}: {err.strerror}; choose another with "
                         "out_dir=... (or cache_dir=...)") from err


def extract_stage(cfg: RunConfig, require_cached: bool = False, suite: TaskSuite | None = None) -> Embeddings:
    """Embeddings of the task's dataset: the pool (train split) and, if needed, the test split."""
    suite = suite or TaskSuite.load(cfg.task)
    backbone = build_backbone(cfg.backbone.name, **cfg.backbone.options())
    dataset = cfg.dataset.name or suite.dataset
    cache = EmbeddingCache(cfg.cache_dir)
    splits = [cfg.dataset.train_split] + ([cfg.dataset.test_split] if suite.queries == "test" else [])
    entries = []
    for split in splits:
        source = build_source(dataset, split=split, **cfg.dataset.options)
        if require_cached:
            entry = cache.lookup(cache_key(entry_fields(backbone, source, cfg.extract.dtype)))
            if entry is None:
                raise BenchError(
                    f"no cached embeddings of {dataset}/{split} for {backbone.name} in {cache.root}; "
                    "run `bench extract` (or `bench run`) with the same config first"
                )
        else:
            entry = extract(
                backbone, source, cache,
                trainer_kwargs={**cfg.trainer.kwargs(), "enable_progress_bar": is_rank_zero()},
                batch_size=cfg.extract.batch_size,
                num_workers=workers_for(cfg.extract.num_workers, cfg.trainer.accelerator, cfg.trainer.devices),
                dtype=cfg.extract.dtype, skip_corrupt=cfg.extract.skip_corrupt,
                rebuild=cfg.extract.rebuild, shard_size=cfg.extract.shard_size,
            )
        entries.append(entry)
    return Embeddings(backbone, suite, entries[0], entries[1] if len(entries) > 1 else None)


def reference_mean(cfg: RunConfig, emb: Embeddings) -> torch.Tensor | None:
    """The center-l2 reference: a class subset's mean over the pool, or None (support mean)."""
    if cfg.center is None or cfg.center == "support":
        return None
    labels = emb.pool.labels
    classes = select_classes(cfg.center, torch.unique(labels).tolist(), emb.suite.class_splits)
    keep = torch.isin(labels, torch.tensor(classes))
    return emb.pool.embeddings[keep].float().mean(0)


def imprint_stage(
    cfg: RunConfig, emb: Embeddings, out_dir: Path | None = None, grid: Grid | None = None
) -> tuple[list[dict], list, int]:
    """Imprint and evaluate every method on every episode of the suite."""
    grid = grid or expand_grid(cfg.methods)
    center = reference_mean(cfg, emb)
    q_labels = emb.queries.labels.numpy() if emb.queries is not None else None
    episodes = list(emb.suite.episodes(emb.pool.labels.numpy(), q_labels))
    dataset = cfg.dataset.name or emb.suite.dataset
    rows = []
    world_size = 1
    bar = tqdm(episodes, desc="imprint + evaluate", unit="episode", disable=not is_rank_zero())
    for subset, episode in bar:
        bar.set_postfix_str(f"{subset} {episode.shots}-shot seed {episode.seed}")
        module = ImprintingModule(grid.specs, seed=episode.seed, reference_mean=center)
        dm = EpisodeDataModule(emb.pool, emb.queries, episode, batch_size=cfg.batch_size)
        trainer = trainer_for_imprinting(**cfg.trainer.kwargs())
        trainer.fit(module, datamodule=dm)
        trainer.test(module, datamodule=dm, verbose=False)
        world_size = trainer.world_size
        for spec in grid.specs:
            rows.append({
                "backbone": emb.backbone.name, "dataset": dataset, "task": emb.suite.name,
                "classes": subset, "shots": str(episode.shots), "seed": episode.seed,
                **spec.fields(), **module.results[spec.name],
            })
            if cfg.save_heads and out_dir is not None and is_rank_zero():
                head_dir = out_dir / "heads" / f"{subset}-{episode.shots}shot-seed{episode.seed}"
                head_dir.mkdir(parents=True, exist_ok=True)
                module.heads[module.head_key(spec)].save(head_dir / f"{slug(spec.name)}.safetensors")
    return rows, grid.dropped, world_size


def run(cfg: RunConfig, require_cached: bool = False) -> RunResult:
    quiet_lightning()
    suite = TaskSuite.load(cfg.task)
    name = cfg.name or slug(f"{suite.name}-{cfg.backbone.name}")
    out_dir = Path(cfg.out_dir) / name
    grid = expand_grid(cfg.methods)  # a typo in the grid should stop us before any extraction
    if is_rank_zero():
        check_writable(out_dir)
    emb = extract_stage(cfg, require_cached=require_cached, suite=suite)
    rows, dropped, world_size = imprint_stage(cfg, emb, out_dir, grid)
    result = RunResult(rows, out_dir, dropped=dropped)
    if is_rank_zero():
        result.paths = write_table(rows, out_dir)
        write_run_record(out_dir, cfg, emb, world_size, dropped)
        result.wandb = log_to_wandb(rows, cfg.to_dict(), name, out_dir, cfg.wandb.mode,
                                    cfg.wandb.project, cfg.wandb.entity)
    return result


def write_run_record(out_dir: Path, cfg: RunConfig, emb: Embeddings, world_size: int, dropped) -> Path:
    """run.json: the config, where the embeddings came from and how many processes ran."""
    import json
    import platform

    import lightning

    record = {
        "config": cfg.to_dict(),
        "world_size": world_size,
        "cache_entries": [str(e.path) for e in (emb.pool, emb.queries) if e is not None],
        "backbone_sha256": emb.backbone.fingerprint,
        "dropped_methods": dropped,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "lightning": lightning.__version__},
    }
    path = out_dir / "run.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path)
    return path


def report(result: RunResult) -> str:
    """What the run prints at the end: the table, the multi-proxy verdict, where things went."""
    lines = [format_table(result.rows)]
    if result.dropped:
        lines.append("\nmethods dropped from the grid: " + "; ".join(f"{s} ({r})" for s, r in result.dropped))
    for subset in dict.fromkeys(r["classes"] for r in result.rows):
        verdict = multiproxy_verdict(result.rows, subset)
        if verdict:
            lines.append(verdict)
    lines.append(f"\nresults: {', '.join(str(p) for p in result.paths)}")
    lines.append(f"W&B: {result.wandb}" if result.wandb else "W&B: disabled")
    return "\n".join(lines)
