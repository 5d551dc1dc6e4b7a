"""Build a report folder from merged runs: tables, figures, statistics, report.md and a
self-contained report.html. The folder is built under a temporary name and swapped into place,
so a reader never finds half a report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pandas as pd

from bench.errors import BenchError
from bench.report import figures, page
from bench.report.model import Group, Report
from bench.report.runs import REPORT_MARKER, Merged, load_runs
from bench.report.stats import GROUP_COLUMNS, compare_methods, ordered_shots, summarise
from bench.report.tables import group_title, wide_table, write_group_tables, write_text
from bench.runtime import replace_dir_atomic, slug

DIAGNOSTIC_COLUMNS = ["nc1", "l2_nc1", "cdnv", "ncc_accuracy", "logme", "h_score", "gc", "gc_normalized"]


def build_report(inputs: Sequence[str], out_dir: Path, metric: str = "acc", prefer: str | None = None,
                 skip_incomplete: bool = False, posthoc: str = "nemenyi", heatmap_shots: str | None = None,
                 alpha: float = 0.05) -> Report:
    merged = load_runs(inputs, prefer=prefer, skip_incomplete=skip_incomplete)
    if metric not in merged.metric_columns:
        raise BenchError(f"metric '{metric}' is not a column of the results; choose one of "
                         f"{', '.join(merged.metric_columns)}")
    if not 0 < alpha < 1:
        raise BenchError(f"--alpha {alpha} must lie between 0 and 1, e.g. 0.05")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, merged)
    built: dict = {}

    def fill(tmp: Path) -> None:
        built["report"], built["tmp"] = _write(merged, tmp, metric, posthoc, heatmap_shots, alpha), tmp

    replace_dir_atomic(out_dir, fill, what="the report")
    return _relocate(built["report"], built["tmp"], out_dir)


def write_run_report(run_dir: Path, metric: str = "acc") -> Path:
    """The report of one finished run, in ``run_dir/report``; returns the report.html path."""
    return build_report([str(run_dir)], Path(run_dir) / "report", metric=metric).html


def _check_out_dir(out_dir: Path, merged: Merged) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise BenchError(f"report folder {out_dir} is a file; choose another -o")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / REPORT_MARKER).is_file():
        raise BenchError(f"{out_dir} already exists and is not a report folder; choose another -o "
                         "(a report replaces only an earlier report)")
    resolved = out_dir.resolve()
    for run in merged.runs:
        if run.path.resolve() == resolved:
            raise BenchError(f"the report folder {out_dir} is the run folder {run.path}; choose another -o")


def _relocate(report: Report, tmp: Path, out_dir: Path) -> Report:
    def move(p: Path) -> Path:
        return out_dir / p.relative_to(tmp)

    report.out_dir = out_dir
    report.files = {k: move(v) for k, v in report.files.items()}
    report.figures = {k: {e: move(p) for e, p in v.items()} for k, v in report.figures.items()}
    for g in report.groups:
        g.tables = {k: move(v) for k, v in g.tables.items()}
        g.figures = {k: {e: move(p) for e, p in v.items()} for k, v in g.figures.items()}
    return report


def _write(merged: Merged, out: Path, metric: str, posthoc: str, heatmap_shots: str | None,
           alpha: float) -> Report:
    frame = merged.frame
    summary = summarise(frame, metric)
    groups: list[Group] = []
    for key, part in summary.groupby(GROUP_COLUMNS, sort=False):
        n_seeds = int(part["n"].max())
        stem = slug("-".join(key))
        group = Group(key=key, slug=stem, title=group_title(key, metric, n_seeds), summary=part)
        group.tables = write_group_tables(part, metric, key, stem, out / "tables")
        short = f"{key[3]} classes, {key[2]} on {key[1]}"
        group.figures["acc_vs_shots"] = _save(figures.accuracy_vs_shots(part, metric, short),
                                              out, f"{stem}-{metric}-vs-shots")
        shots = ordered_shots(part["shots"])
        numeric = [s for s in shots if s.replace(".", "", 1).isdigit()]
        chosen = heatmap_shots if heatmap_shots is not None else (numeric or shots)[-1]
        if chosen not in shots:
            raise BenchError(f"--heatmap-shots {chosen} is not a shot count of {short}; "
                             f"choose one of {', '.join(shots)}")
        group.heatmap_shots = chosen
        fig = figures.gen_norm_heatmap(part, metric, chosen, short)
        if fig is not None:
            group.figures["gen_norm"] = _save(fig, out, f"{stem}-gen-norm-{slug(chosen)}shot")
        fig = figures.kmeans_sweep(part, metric, short)
        if fig is not None:
            group.figures["kmeans_k"] = _save(fig, out, f"{stem}-kmeans-k")
        groups.append(group)
    comparison = compare_methods(frame, metric, posthoc=posthoc, alpha=alpha)
    report = Report(out_dir=out, metric=metric, merged=merged, groups=groups, comparison=comparison)
    _write_comparison(report, out)
    if merged.diagnostics is not None and merged.diagnose_accuracy is not None:
        fig = figures.diagnostics_scatter(merged.diagnostics, merged.diagnose_accuracy, metric, DIAGNOSTIC_COLUMNS)
        if fig is not None:
            report.figures["diagnostics"] = _save(fig, out, "diagnostics-vs-accuracy")
    runs = pd.DataFrame([{"run": str(r.path), "rows": r.rows, "complete": r.complete} for r in merged.runs]
                        + [{"run": p, "rows": 0, "complete": False, "left_out": why} for p, why in merged.skipped])
    report.files["runs"] = write_text(out / "tables" / "runs.csv", runs.to_csv(index=False))
    report.files["md"] = write_text(out / "report.md", page.markdown(report))
    report.files["html"] = write_text(out / "report.html", page.html(report))
    marker = {"kind": "bench-report", "metric": metric, "posthoc": posthoc,
              "runs": [str(r.path) for r in merged.runs], "left_out": merged.skipped}
    write_text(out / REPORT_MARKER, json.dumps(marker, indent=2))
    return report


def _save(fig, out: Path, stem: str) -> dict[str, Path]:
    return figures.save(fig, out / "figures", stem)


def _write_comparison(report: Report, out: Path) -> None:
    c = report.comparison
    ranks = pd.DataFrame({"method": c.ranks.index, "average_rank": c.ranks.to_numpy()})
    ranks["cells"] = c.blocks.shape[0]
    report.files["ranks"] = write_text(out / "tables" / "ranks.csv", ranks.to_csv(index=False))
    test = pd.DataFrame([{"metric": c.metric, "methods": c.blocks.shape[1], "cells": c.blocks.shape[0],
                          "friedman_chi2": c.friedman_stat, "friedman_p": c.friedman_p, "posthoc": c.posthoc,
                          "critical_difference": c.cd, "alpha": c.alpha, "note": "; ".join(c.notes)}])
    report.files["friedman"] = write_text(out / "tables" / "friedman.csv", test.to_csv(index=False))
    blocks = c.blocks.reset_index()
    report.files["cells"] = write_text(out / "tables" / "cells.csv", blocks.to_csv(index=False))
    if c.defined:
        report.files["posthoc"] = write_text(out / "tables" / f"posthoc-{c.posthoc}.csv", c.pvalues.to_csv())
        report.figures["cd"] = _save(figures.critical_difference(c), out, "critical-difference")
        tex = ranks.set_index("method")[["average_rank"]].style.format(precision=2).format_index(escape="latex")
        report.files["ranks_tex"] = write_text(
            out / "tables" / "ranks.tex",
            tex.to_latex(hrules=True, caption=f"Average rank of {c.metric} over {c.blocks.shape[0]} cells "
                         f"(Friedman p = {c.friedman_p:.2g})", label="tab:ranks", position="htbp"))


def summary_frame(report: Report) -> pd.DataFrame:
    return pd.concat([g.summary for g in report.groups], ignore_index=True)


def group_table(group: Group, metric: str, markup: str) -> pd.DataFrame:
    return wide_table(group.summary, metric, markup=markup)
