"""Weights & Biases logging.

``log_bench_run``: one W&B run per ``bench run``. Its config is the full resolved run config; its
group and tags come from the task, dataset and backbone, so the workspace sets benchmarks side by
side. It logs a table with one row per method x episode (every GEN/NORM/AGG field a column), a
summary with each method's mean per class subset and shot count, accuracy-against-shots plots,
and results.parquet + run.json as an artifact. ``log_report`` logs a merged ``bench report``
as a run of its own; ``log_tables`` is the one-run logger of ``bench diagnose``.

Runs are offline unless the user has credentials (or asks for online); a key is never printed.
Each offline run is one folder, ``<dir>/wandb/offline-run-*``, uploaded later with ``wandb sync``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from bench.runtime import (
    finish_wandb,
    resolve_wandb_mode,
    slug,
    wandb_logger,
    wandb_run,
)


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
    logger = wandb_logger(mode, save_dir, run_name, config, project=project, entity=entity, job_type="diagnose")
    if logger is None:
        return None
    logger.log_metrics(summary)
    for key, rows in tables.items():
        if rows:
            columns = list(dict.fromkeys(c for r in rows for c in r))
            logger.log_table(key, columns=columns, data=[[r.get(c) for c in columns] for r in rows])
    return finish_wandb(logger)


def _tag(kind: str, value: Any) -> str:
    """W&B tags hold at most 64 characters; long names (a checkpoint path) keep their tail."""
    text = f"{kind}:{value}"
    return text if len(text) <= 64 else f"{kind}:…{str(value)[-(62 - len(kind)):]}"


def _plain_frame(frame):
    """Columns W&B can hold: NaN as null, lists and dicts as text."""
    import pandas as pd

    out = frame.copy()
    for col in out.columns:
        if out[col].dtype == object:
            out[col] = out[col].map(lambda v: str(v) if isinstance(v, (list, dict)) else v)
    return out.astype(object).where(pd.notna(out), None)


def _attach_files(run, name: str, kind: str, files: Sequence[Path]):
    """An artifact of copies kept inside the run's own folder: ``wandb sync`` finds them there
    even after the run folder's results are rewritten."""
    import shutil

    import wandb

    files = [Path(f) for f in files if Path(f).is_file()]
    if not files:
        return None
    keep = Path(run.dir).parent / "artifact" / name
    keep.mkdir(parents=True, exist_ok=True)
    artifact = wandb.Artifact(name, type=kind)
    for f in files:
        copy = keep / f.name
        shutil.copyfile(f, copy)
        artifact.add_file(str(copy), name=f.name, policy="immutable")
    run.log_artifact(artifact)
    return artifact


def _line_plots(run, summary, metric: str, prefix: str) -> None:
    """Per class subset: a W&B line chart (x: position in the shot list, named in the axis title)
    and the report's own matplotlib figure as an image."""
    import wandb

    from bench.report import figures
    from bench.report.stats import GROUP_COLUMNS, ordered_shots

    for key, part in summary.groupby(GROUP_COLUMNS, sort=False):
        task, dataset, backbone, classes = key
        shots = ordered_shots(part["shots"])
        numeric = all(s.replace(".", "", 1).isdigit() for s in shots)
        xs = [float(s) for s in shots] if numeric else list(range(len(shots)))
        methods = list(dict.fromkeys(part["method"]))
        ys = []
        for m in methods:
            by_shot = dict(zip(part[part["method"] == m]["shots"], part[part["method"] == m]["mean"]))
            ys.append([float(by_shot.get(s, float("nan"))) for s in shots])
        xname = "shots" if numeric else "shots (" + ", ".join(f"{i}: {s}" for i, s in enumerate(shots)) + ")"
        one_benchmark = len(summary[GROUP_COLUMNS[:3]].drop_duplicates()) == 1
        plot_key = (f"{prefix}{classes}/{metric}_vs_shots" if one_benchmark
                    else f"{prefix}{task}/{dataset}/{backbone}/{classes}/{metric}_vs_shots")
        chart = wandb.plot.line_series(xs=xs, ys=ys, keys=methods, title=f"{metric} on '{classes}' classes",
                                       xname=xname)
        fig = figures.accuracy_vs_shots(part, metric, f"{classes} classes, {backbone} on {dataset}")
        run.log({plot_key: chart, f"{plot_key}_figure": wandb.Image(_figure_array(fig))})


def _figure_array(fig):
    import numpy as np

    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def log_bench_run(
    rows: Sequence[dict[str, Any]],
    config: dict[str, Any],
    run_name: str,
    out_dir: Path,
    mode: str = "auto",
    project: str = "bench",
    entity: str | None = None,
    metric: str = "acc",
) -> str | None:
    """One W&B run for one ``bench run``; returns its folder (offline) or URL, None if disabled.

    ``out_dir`` is the bench run folder: the W&B run goes to ``out_dir/wandb/offline-run-*`` and
    the artifact takes ``out_dir/results.parquet`` and ``out_dir/run.json`` (write them first).
    """
    import pandas as pd
    import wandb

    from bench.report.stats import summarise

    if resolve_wandb_mode(mode) == "disabled" or not rows:
        return None
    frame = pd.DataFrame(list(rows))
    frame["shots"] = frame["shots"].astype(str)
    values = {c: list(dict.fromkeys(str(v) for v in frame[c])) for c in ("task", "dataset", "backbone")}
    group = "+".join(values["task"]) + "@" + "+".join(values["dataset"])
    tags = [_tag(kind, v) for kind in ("task", "dataset", "backbone") for v in values[kind]]
    out_dir = Path(out_dir)
    run = wandb_run(mode, out_dir, run_name, config, project=project, entity=entity, group=group, tags=tags,
                    job_type="bench-run")
    try:
        run.log({"results": wandb.Table(dataframe=_plain_frame(frame))})
        summary = summarise(frame, metric)
        for r in summary.itertuples(index=False):
            run.summary[f"{r.classes}/{r.method}/{metric}@{r.shots}shot"] = float(r.mean)
            run.summary[f"{r.classes}/{r.method}/{metric}@{r.shots}shot_std"] = float(r.std)
        _line_plots(run, summary, metric, prefix="plots/")
        _attach_files(run, f"results-{slug(run_name, 100, keep='._-')}", "results",
                      [out_dir / "results.parquet", out_dir / "run.json"])
    except BaseException:
        run.finish()
        raise
    return finish_wandb(run)


def log_report(report, mode: str = "offline", project: str = "bench", entity: str | None = None,
               save_dir: Path | None = None) -> str | None:
    """A merged ``bench report`` as one W&B run: the merged rows, the methods x shots summary,
    ranks and tests as tables, every figure as an image, and the report folder as an artifact.
    The offline run goes next to the report folder (``<parent>/wandb``), not inside it, because
    a new report replaces the report folder whole."""
    import wandb

    from bench.report.build import summary_frame

    if resolve_wandb_mode(mode) == "disabled":
        return None
    merged, c = report.merged, report.comparison
    config = {"metric": report.metric, "runs": [str(r.path) for r in merged.runs],
              "left_out": [p for p, _ in merged.skipped], "posthoc": c.posthoc, "alpha": c.alpha}
    frame = merged.frame
    values = {k: list(dict.fromkeys(str(v) for v in frame[k])) for k in ("task", "dataset", "backbone")}
    tags = ["report"] + [_tag(kind, v) for kind in ("task", "dataset", "backbone") for v in values[kind]][:20]
    save_dir = Path(save_dir) if save_dir else report.out_dir.parent
    run = wandb_run(mode, save_dir, f"report-{report.out_dir.name}", config, project=project, entity=entity,
                    group="report", tags=tags, job_type="report")
    try:
        summary = summary_frame(report)
        run.log({"results": wandb.Table(dataframe=_plain_frame(frame)),
                 "summary": wandb.Table(dataframe=_plain_frame(summary)),
                 "ranks": wandb.Table(dataframe=_plain_frame(c.ranks.rename("average_rank").reset_index()))})
        images = {f"figures/{kind}": wandb.Image(str(paths["png"])) for kind, paths in report.figures.items()}
        for g in report.groups:
            for kind, paths in g.figures.items():
                images[f"figures/{g.slug}/{kind}"] = wandb.Image(str(paths["png"]))
        run.log(images)
        run.summary["friedman_p"] = c.friedman_p
        for method, rank in c.ranks.items():
            run.summary[f"average_rank/{method}"] = float(rank)
        files = [report.files["md"], report.files["html"], *report.files.values()]
        _attach_files(run, f"report-{slug(report.out_dir.name, 100, keep='._-')}", "report", list(dict.fromkeys(files)))
    except BaseException:
        run.finish()
        raise
    return finish_wandb(run)
