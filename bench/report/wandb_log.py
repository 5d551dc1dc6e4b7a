"""Weights & Biases logging through Lightning's ``WandbLogger``.

One W&B run per method (grouped by the bench run), so the dashboard can group and filter runs
by the method's fields (gen, gen.k, norm_pre, agg, ...) as config keys. Each run logs the mean
over seeds of every metric per (class subset, shots), and a table with one row per episode.
Runs are offline unless the user has credentials (or asks for online); a key is never printed.
"""

from __future__ import annotations

import netrc
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from bench.errors import BenchError
from bench.report.results import mean_std

METRICS = ("acc", "balanced_acc", "macro_f1", "gen_time_s")


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str) -> str:
    if mode not in ("auto", "offline", "online", "disabled"):
        raise BenchError(f"wandb.mode '{mode}' is not one of auto, offline, online, disabled")
    if os.environ.get("WANDB_MODE") in ("offline", "disabled") and mode in ("auto", "online"):
        return os.environ["WANDB_MODE"]
    if mode == "auto":
        return "online" if has_credentials() else "offline"
    return mode


def _open_run(mode: str, project: str, entity: str | None, name: str, group: str | None, job_type: str,
              save_dir: Path, config: dict[str, Any]):
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(project=project, entity=entity, name=name, group=group, job_type=job_type,
                       save_dir=str(save_dir), offline=(mode == "offline"), config=config, reinit="create_new")


def _close_run(logger, mode: str) -> str:
    """Finish the run; return its URL (online) or the folder holding the offline runs."""
    run = logger.experiment
    where = run.url if mode == "online" else str(Path(run.dir).parent.parent)
    run.finish()
    return where


def log_to_wandb(
    rows: Sequence[dict[str, Any]],
    run_config: dict[str, Any],
    run_name: str,
    save_dir: Path,
    mode: str = "auto",
    project: str = "bench",
    entity: str | None = None,
) -> str | None:
    """Log results; returns where the runs went (a folder or a URL), or None if disabled."""
    mode = resolve_mode(mode)
    if mode == "disabled" or not rows:
        return None
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    columns = list(dict.fromkeys(c for r in rows for c in r))
    method_keys = [c for c in columns if c in ("method", "spec", "norm_pre", "gen", "norm_post", "norm_inf", "agg")
                   or c.split(".")[0] in ("norm_pre", "gen", "norm_post", "norm_inf", "agg")]
    where = None
    for method, mrows in by_method.items():
        first = mrows[0]
        config = {
            "backbone": first["backbone"],
            "dataset": first["dataset"],
            "task": first["task"],
            "classes": sorted({r["classes"] for r in mrows}),
            "shots": list(dict.fromkeys(str(r["shots"]) for r in mrows)),
            "seeds": sorted({int(r["seed"]) for r in mrows}),
            **{k: v for k, v in first.items() if k in method_keys},
            "run": run_config,
        }
        logger = _open_run(mode, project, entity, method, run_name, first["task"], save_dir, config)
        groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for r in mrows:
            groups[(r["classes"], str(r["shots"]))].append(r)
        metrics = {}
        for (subset, shots), grp in groups.items():
            for m in METRICS:
                mu, sd = mean_std([float(r[m]) for r in grp])
                metrics[f"{subset}/{m}@{shots}shot"] = mu
                metrics[f"{subset}/{m}@{shots}shot_std"] = sd
        logger.log_metrics(metrics)
        logger.log_table("episodes", columns=columns, data=[[r.get(c) for c in columns] for r in mrows])
        where = _close_run(logger, mode)
    return where


def log_tables(
    tables: dict[str, Sequence[dict[str, Any]]],
    summary: dict[str, float],
    config: dict[str, Any],
    run_name: str,
    save_dir: Path,
    mode: str = "auto",
    project: str = "bench",
    entity: str | None = None,
) -> str | None:
    """One W&B run holding several tables and summary numbers (used by ``bench diagnose``)."""
    mode = resolve_mode(mode)
    if mode == "disabled":
        return None
    logger = _open_run(mode, project, entity, run_name, None, "diagnose", save_dir, config)
    logger.log_metrics(summary)
    for key, rows in tables.items():
        if rows:
            columns = list(dict.fromkeys(c for r in rows for c in r))
            logger.log_table(key, columns=columns, data=[[r.get(c) for c in columns] for r in rows])
    return _close_run(logger, mode)
