"""What a run prints at the end, with rich: a methods x shots table per (task, dataset, backbone,
classes), the best of each column marked (never an oracle row), and the paired multi-proxy verdict."""

from __future__ import annotations

import io
import sys
from typing import Any, Sequence

import pandas as pd

from bench.report.stats import GROUP_COLUMNS, is_fraction, ordered_shots, summarise
from bench.report.tables import best_note, fmt
from bench.report.verdict import multiproxy_verdict


def summary_tables(rows: Sequence[dict[str, Any]] | pd.DataFrame, metric: str = "acc") -> list[tuple[str, Any]]:
    """(title, rich Table), one per (task, dataset, backbone, classes). The title is printed on
    its own line: as a Table title it would wrap at the width of a narrow table."""
    from rich.table import Table

    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    frame = frame.assign(shots=frame["shots"].astype(str))
    summary = summarise(frame, metric)
    out = []
    for (task, dataset, backbone, classes), part in summary.groupby(GROUP_COLUMNS, sort=False):
        shots = ordered_shots(part["shots"])
        unit = " (%)" if is_fraction(metric) else ""
        seeds = int(part["n"].max())
        spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed (no spread)"
        title = (f"{metric}{unit} on '{classes}' classes: {backbone} on {dataset} (task {task}), {spread}; "
                 f"* best of its column{best_note(part)}")
        table = Table(header_style="bold")
        table.add_column("method", no_wrap=True)
        for s in shots:
            table.add_column(f"{s}-shot", justify="right", no_wrap=True)
        cells = {(r.method, r.shots): r for r in part.itertuples(index=False)}
        labels = part.groupby("method", sort=False)["label"].first()
        for method in dict.fromkeys(part["method"]):
            row = [labels[method]]
            for s in shots:
                r = cells.get((method, s))
                if r is None:
                    row.append("-")
                    continue
                text = f"{fmt(r.mean, metric)} ± {fmt(r.std, metric)}" if r.n > 1 else fmt(r.mean, metric)
                row.append(f"[bold green]{text} *[/]" if r.best else f"{text}  ")
            table.add_row(*row)
        out.append((title, table))
    return out


def verdicts(rows: Sequence[dict[str, Any]] | pd.DataFrame, mean_method: str = "qi2018") -> list[str]:
    records = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else list(rows)
    out = []
    for key in dict.fromkeys(tuple(str(r[c]) for c in GROUP_COLUMNS) for r in records):
        part = [r for r in records if tuple(str(r[c]) for c in GROUP_COLUMNS) == key]
        text = multiproxy_verdict(part, key[3], mean_method)
        if text:
            out.append(text)
    return out


def print_summary(rows, metric: str = "acc", console=None) -> None:
    """Print the tables and the verdicts to ``console`` (a rich Console; stdout by default)."""
    from rich.console import Console

    console = console or Console()
    for title, table in summary_tables(rows, metric):
        console.print(title, highlight=False, markup=False)
        console.print(table)
    for line in verdicts(rows):
        console.print(line, highlight=False, markup=False)


def summary_text(rows, metric: str = "acc", color: bool | None = None, width: int | None = None) -> str:
    """The same as ``print_summary`` as a string (ANSI colours only when ``color``, or when stdout
    is a terminal if ``color`` is None)."""
    from rich.console import Console

    if color is None:
        color = sys.stdout.isatty()
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=color, no_color=not color, width=width or 160,
                      color_system="standard" if color else None)
    print_summary(rows, metric, console)
    return buf.getvalue().rstrip("\n")
