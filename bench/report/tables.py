"""File tables with pandas: a methods x shots table per (task, dataset, backbone, classes), written
as tidy CSV, LaTeX (booktabs) for papers, markdown and HTML."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from bench.report.stats import GROUP_COLUMNS, is_fraction, ordered_shots
from bench.runtime import write_text_atomic


def fmt(value: float, metric: str, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.{digits}f}" if is_fraction(metric) else f"{value:.3g}"


def wide_table(summary: pd.DataFrame, metric: str, markup: str = "plain", with_ci: bool = True) -> pd.DataFrame:
    """Methods as rows, shots as columns; each cell 'mean ± std [CI low, high]' with the best of
    each column marked (bold in markdown/HTML/LaTeX, a trailing * in plain text). Rows are named
    by their label: oracle, selected-on-validation and gradient-based rows say so."""
    shots = ordered_shots(summary["shots"])
    methods = list(dict.fromkeys(summary["method"]))
    cells = {(r.method, r.shots): r for r in summary.itertuples(index=False)}
    data = {}
    for s in shots:
        column = []
        for m in methods:
            r = cells.get((m, s))
            if r is None:
                column.append("")
                continue
            text = f"{fmt(r.mean, metric)} ± {fmt(r.std, metric)}" if r.n > 1 else fmt(r.mean, metric)
            if with_ci and r.n > 1:
                text += f" [{fmt(r.ci95_low, metric)}, {fmt(r.ci95_high, metric)}]"
            column.append(_mark(text, markup) if r.best else text)
        data[f"{s}-shot"] = column
    labels = summary.groupby("method", sort=False)["label"].first() if "label" in summary.columns else {}
    table = pd.DataFrame(data, index=pd.Index([labels.get(m, m) for m in methods], name="method"))
    return table


def _mark(text: str, markup: str) -> str:
    if markup == "latex":
        return rf"\textbf{{{_latex_escape(text)}}}"
    if markup == "markdown":
        return f"**{text}**"
    if markup == "html":
        return f"<b>{text}</b>"
    return f"{text} *"


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                 ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"),
                 ("^", r"\textasciicircum{}")):
        text = text.replace(a, b)
    return text.replace("±", r"$\pm$")


def to_latex(summary: pd.DataFrame, metric: str, caption: str, label: str) -> str:
    """booktabs table via pandas' Styler; cells are escaped here because some carry \\textbf."""
    table = wide_table(summary, metric, markup="latex")
    table = table.apply(lambda col: [c if c.startswith(r"\textbf") else _latex_escape(c) for c in col])
    table.index = [_latex_escape(m) for m in table.index]
    table.index.name = "method"
    table.columns = [_latex_escape(c) for c in table.columns]
    styler = table.style
    return styler.to_latex(hrules=True, caption=_latex_escape(caption), label=label,
                           column_format="l" + "r" * table.shape[1], position="htbp")


def to_markdown(table: pd.DataFrame) -> str:
    return table.to_markdown()


def best_note(summary: pd.DataFrame) -> str:
    """Why an oracle row is never the best: said wherever a table has one."""
    if "selection" in summary.columns and summary["selection"].eq("oracle").any():
        return " (oracle rows, chosen on the test set, excluded)"
    return ""


def group_title(key: tuple, metric: str, n_seeds: int | None = None) -> str:
    task, dataset, backbone, classes = key
    unit = " (%)" if is_fraction(metric) else ""
    seeds = "" if not n_seeds else (f", mean ± std over {n_seeds} seeds" if n_seeds > 1 else ", one seed (no spread)")
    return f"{metric}{unit} on '{classes}' classes of {dataset}, {backbone} (task {task}){seeds}"


def write_text(path: Path, text: str) -> Path:
    """Write under a temporary name, then rename: a reader never sees half a file."""
    write_text_atomic(path, text)
    return path


def write_group_tables(summary: pd.DataFrame, metric: str, key: tuple, stem: str, folder: Path) -> dict[str, Path]:
    """tables/<stem>.csv (tidy: one row per method x shots) and tables/<stem>.tex."""
    folder.mkdir(parents=True, exist_ok=True)
    tidy = summary.drop(columns=GROUP_COLUMNS).copy()
    n_seeds = int(summary["n"].max())
    csv_path = write_text(folder / f"{stem}.csv", tidy.to_csv(index=False))
    tex = to_latex(summary, metric, group_title(key, metric, n_seeds) + "; best of each column in bold"
                   + best_note(summary) + ", 95% confidence interval in brackets", f"tab:{stem}")
    tex_path = write_text(folder / f"{stem}.tex", tex)
    return {"csv": csv_path, "tex": tex_path}
