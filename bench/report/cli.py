"""``bench report RUN_DIR_OR_GLOB... [-o DIR]``: merge finished runs into one report."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bench.errors import BenchError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bench report",
        description="Merge the results of finished runs (folders or quoted globs such as 'runs/*') into tables, "
                    "statistics, figures, report.md and a self-contained report.html.")
    ap.add_argument("runs", nargs="+", help="run folders or globs (quote globs: 'runs/*')")
    ap.add_argument("-o", "--out", help="report folder (default: RUN/report for one run, ./report for several)")
    ap.add_argument("--metric", default="acc", help="metric column to compare (default: acc)")
    ap.add_argument("--prefer", choices=["newest"],
                    help="when two runs hold the same cell, keep the run that finished last")
    ap.add_argument("--skip-incomplete", action="store_true",
                    help="report without runs that have not finished (they are listed in the report)")
    ap.add_argument("--posthoc", choices=["nemenyi", "wilcoxon"], default="nemenyi",
                    help="post-hoc test after Friedman: Nemenyi, or Wilcoxon signed-rank with Holm correction")
    ap.add_argument("--alpha", type=float, default=0.05, help="significance level (default: 0.05)")
    ap.add_argument("--heatmap-shots", help="shot count of the GEN x NORM heatmap (default: the largest number)")
    ap.add_argument("--wandb", action="store_true", help="log the merged tables and figures as a W&B run")
    ap.add_argument("--wandb-mode", default="offline", choices=["auto", "offline", "online"],
                    help="W&B mode for --wandb (default: offline; auto is online only with credentials)")
    ap.add_argument("--wandb-project", default="bench")
    ap.add_argument("--wandb-entity")
    return ap


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from bench.report.build import build_report
    from bench.report.runs import expand_inputs
    from bench.report.terminal import print_summary

    if args.out:
        out = Path(args.out)
    else:
        folders = expand_inputs(args.runs)
        out = folders[0] / "report" if len(folders) == 1 else Path("report")
    report = build_report(args.runs, out, metric=args.metric, prefer=args.prefer,
                          skip_incomplete=args.skip_incomplete, posthoc=args.posthoc,
                          heatmap_shots=args.heatmap_shots, alpha=args.alpha)
    print_summary(report.merged.frame, args.metric)
    for path, why in report.merged.skipped:
        print(f"left out (not complete): {path}: {why}")
    for note in report.merged.notes:
        print(note)
    c = report.comparison
    if c.defined:
        ranks = ", ".join(f"{m} {r:.2f}" for m, r in c.ranks.items())
        print(f"average ranks over {c.blocks.shape[0]} cells: {ranks}")
        print(f"Friedman p = {c.friedman_p:.3g}; post-hoc {c.posthoc}")
    for note in c.notes:
        print(note)
    print(f"report: {report.html}")
    print(f"tables: {report.out_dir / 'tables'}; figures: {report.out_dir / 'figures'}; "
          f"markdown: {report.files['md']}")
    if args.wandb:
        from bench.report.wandb_log import log_report

        os.environ.setdefault("WANDB_SILENT", "true")
        where = log_report(report, mode=args.wandb_mode, project=args.wandb_project, entity=args.wandb_entity)
        print(f"W&B: {where}" if where else "W&B: disabled")
    return 0


__all__ = ["main", "BenchError"]
