"""Reports: merged result tables, statistics, figures, HTML, and W&B logging.

Names are imported on first use, so that ``import bench.report.results`` (done by every run)
does not load pandas, matplotlib or scipy.
"""

from __future__ import annotations

_EXPORTS = {
    "build_report": "bench.report.build",
    "write_run_report": "bench.report.build",
    "load_runs": "bench.report.runs",
    "print_summary": "bench.report.terminal",
    "summary_text": "bench.report.terminal",
    "multiproxy_verdict": "bench.report.verdict",
    "log_bench_run": "bench.report.wandb_log",
    "log_report": "bench.report.wandb_log",
    "log_tables": "bench.report.wandb_log",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bench.report' has no attribute '{name}'")
