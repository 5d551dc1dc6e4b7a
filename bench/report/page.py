"""report.md and a self-contained report.html (figures embedded as PNG data, no script, no
stylesheet or font from the network: it opens from disk anywhere)."""

from __future__ import annotations

import base64
import html as htmlmod
import math
from pathlib import Path

import pandas as pd

from bench.report.model import Report
from bench.report.stats import method_marks
from bench.report.tables import best_note, fmt, wide_table

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #e3e3e3; text-align: right; white-space: nowrap; }
th:first-child, td:first-child, tbody th { text-align: left; }
thead th { border-bottom: 2px solid #888; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
.warn { background: #fff3cd; border: 1px solid #e0c36b; padding: 0.6em 1em; }
.note { color: #555; font-size: 0.9em; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def _p(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


def _rel(report: Report, path: Path) -> str:
    return path.relative_to(report.out_dir).as_posix()


def _stats_lines(report: Report) -> list[str]:
    c = report.comparison
    lines = [f"{c.blocks.shape[1]} methods over {c.blocks.shape[0]} cells (task, dataset, backbone, classes, "
             f"shots; each cell is the mean over seeds)."]
    if c.defined:
        test = ("Nemenyi" if c.posthoc == "nemenyi" else "Wilcoxon signed-rank with Holm correction")
        lines.append(f"Friedman test: χ² = {_p(c.friedman_stat)}, p = {_p(c.friedman_p)}. "
                     f"Post-hoc: {test} at α = {c.alpha:g}"
                     + (f"; critical difference of average ranks {c.cd:.2f}." if c.cd is not None else "."))
    lines += c.notes
    return lines


def _ranks_table(report: Report) -> pd.DataFrame:
    c = report.comparison
    labels = method_marks(report.merged.frame)["label"]  # gradient-based and selected rows say so
    return pd.DataFrame({"average rank": [f"{v:.2f}" for v in c.ranks.to_numpy()]},
                        index=pd.Index([labels.get(m, m) for m in c.ranks.index], name="method"))


def _runs_lines(report: Report) -> list[str]:
    m = report.merged
    lines = [f"{r.path} ({r.rows} rows)" for r in m.runs]
    return lines


def markdown(report: Report) -> str:
    m = report.merged
    out = [f"# bench report: {report.metric}", ""]
    out += ["## Runs", ""] + [f"- {line}" for line in _runs_lines(report)] + [""]
    if m.skipped:
        out += ["**Left out (not complete):**", ""] + [f"- {p}: {why}" for p, why in m.skipped] + [""]
    if m.replaced:
        out += [f"**{len(m.replaced)} cell(s) held by two runs; the newest run was kept** (--prefer newest).", ""]
    out += [f"- {n}" for n in m.notes]
    out += ["## Methods across all cells", ""] + _stats_lines(report) + [""]
    out += [_ranks_table(report).to_markdown(), ""]
    if "cd" in report.figures:
        out += [f"![critical-difference diagram]({_rel(report, report.figures['cd']['png'])})", ""]
    for g in report.groups:
        out += [f"## {g.title}", "", f"Best of each column in bold{best_note(g.summary)}; 95% confidence interval "
                "over seeds in brackets.", ""]
        out += [wide_table(g.summary, report.metric, markup="markdown").to_markdown(), ""]
        out += [f"Tables: [{_rel(report, g.tables['csv'])}]({_rel(report, g.tables['csv'])}), "
                f"[{_rel(report, g.tables['tex'])}]({_rel(report, g.tables['tex'])})", ""]
        for kind, caption in _figure_captions(g).items():
            if kind in g.figures:
                out += [f"![{caption}]({_rel(report, g.figures[kind]['png'])})", ""]
    if "diagnostics" in report.figures:
        out += ["## Diagnostics against accuracy", "",
                f"![diagnostics against accuracy]({_rel(report, report.figures['diagnostics']['png'])})", ""]
    return "\n".join(out)


def _figure_captions(group) -> dict[str, str]:
    return {
        "acc_vs_shots": "accuracy against shots, one line per method, band ± 1 std over seeds",
        "gen_norm": f"GEN x NORM at {group.heatmap_shots}-shot (best over AGG)",
        "kmeans_k": "effect of k in the k-means sweep",
    }


def _img(path: Path, alt: str, ident: str, cls: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img id="{ident}" class="{cls}" alt="{htmlmod.escape(alt)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{htmlmod.escape(alt)} '
            f'(<a href="figures/{path.name}">PNG</a>, <a href="figures/{path.stem}.svg">SVG</a>)'
            f'</figcaption></figure>')


def _table_html(table: pd.DataFrame, ident: str, cls: str) -> str:
    table = table.copy()
    table.index = [htmlmod.escape(str(i)) for i in table.index]
    table.index.name = "method"
    return table.to_html(escape=False, table_id=ident, classes=cls, border=0)


def html(report: Report) -> str:
    m = report.merged
    e = htmlmod.escape
    body = [f"<h1>bench report: {e(report.metric)}</h1>", "<h2>Runs</h2><ul>"]
    body += [f"<li><code>{e(line)}</code></li>" for line in _runs_lines(report)]
    body.append("</ul>")
    if m.skipped:
        body.append('<div class="warn" id="left-out"><b>Left out (not complete):</b><ul>'
                    + "".join(f"<li><code>{e(p)}</code>: {e(w)}</li>" for p, w in m.skipped) + "</ul></div>")
    if m.replaced:
        body.append(f'<p class="warn">{len(m.replaced)} cell(s) were held by two runs; the newest run was kept '
                    "(--prefer newest).</p>")
    body += [f'<p class="note">{e(n)}</p>' for n in m.notes]
    body.append("<h2>Methods across all cells</h2>")
    body += [f"<p>{e(line)}</p>" for line in _stats_lines(report)]
    body.append(_table_html(_ranks_table(report), "ranks", "ranks"))
    if "cd" in report.figures:
        body.append(_img(report.figures["cd"]["png"], "critical-difference diagram (Demšar 2006)",
                         "cd-diagram", "cd-diagram"))
    for g in report.groups:
        body.append(f'<h2 id="{e(g.slug)}">{e(g.title)}</h2>')
        body.append(f'<p class="note">Best of each column in bold{e(best_note(g.summary))}; 95% confidence interval '
                    'over seeds in brackets. '
                    f'Tables: <a href="{e(_rel(report, g.tables["csv"]))}">CSV</a>, '
                    f'<a href="{e(_rel(report, g.tables["tex"]))}">LaTeX</a>.</p>')
        body.append(_table_html(wide_table(g.summary, report.metric, markup="html"), f"methods-{g.slug}", "methods"))
        for kind, caption in _figure_captions(g).items():
            if kind in g.figures:
                body.append(_img(g.figures[kind]["png"], caption, f"{kind.replace('_', '-')}-{g.slug}",
                                 kind.replace("_", "-")))
    if "diagnostics" in report.figures:
        body.append("<h2>Diagnostics against accuracy</h2>")
        body.append(_img(report.figures["diagnostics"]["png"], "each diagnostic against accuracy, Kendall τ",
                         "diagnostics", "diagnostics"))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><link rel=\"icon\" href=\"data:,\">"
            f"<title>bench report: {e(report.metric)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


__all__ = ["markdown", "html", "fmt"]
