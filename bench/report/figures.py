"""Figures with matplotlib (object API, Agg canvas: no display, no global pyplot state), each saved
as PNG and SVG: accuracy against shots, GEN x NORM heatmap, the k of a k-means sweep,
diagnostics against accuracy, and the critical-difference diagram."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from bench.report.stats import Comparison, is_fraction, ordered_shots
from bench.runtime import atomic_path
from bench.statistics import kendall_tau

LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig, folder: Path, stem: str) -> dict[str, Path]:
    """PNG and SVG, each under a temporary name first; SVG without a date so it is reproducible."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for ext, kwargs in (("png", {"dpi": 150}), ("svg", {"metadata": {"Date": None}})):
        path = folder / f"{stem}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, bbox_inches="tight", pad_inches=0.1, **kwargs)
        out[ext] = path
    return out


def _scale(metric: str) -> tuple[float, str]:
    return (100.0, f"{metric} (%)") if is_fraction(metric) else (1.0, metric)


def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def stages(spec: str) -> list[str] | None:
    """NORM_pre, GEN, NORM_post, NORM_inf, AGG of a canonical spec string, or None."""
    parts = str(spec).split("/")
    return parts if len(parts) == 5 else None


def accuracy_vs_shots(summary: pd.DataFrame, metric: str, title: str):
    """One line per method with a band of ± one standard deviation over seeds."""
    scale, ylabel = _scale(metric)
    shots = ordered_shots(summary["shots"])
    methods = list(dict.fromkeys(summary["method"]))
    fig = _figure(9.5, 4.8)
    ax = fig.add_subplot()
    x_of = {s: i for i, s in enumerate(shots)}
    for i, (method, color) in enumerate(zip(methods, _colors(len(methods)))):
        rows = summary[summary["method"] == method].copy()
        rows = rows.assign(x=rows["shots"].map(x_of)).sort_values("x")
        mean, std = rows["mean"].to_numpy() * scale, rows["std"].to_numpy() * scale
        # tab20 pairs a dark and a light shade of one hue: the light one gets a dashed line
        style = LINESTYLES[i % 2] if len(methods) > 10 else "-"
        ax.plot(rows["x"], mean, color=color, linestyle=style,
                marker=MARKERS[i % len(MARKERS)], markersize=5, linewidth=1.6, label=method)
        ax.fill_between(rows["x"], mean - std, mean + std, color=color, alpha=0.12, linewidth=0)
    # 0 shots is the zero-shot point (text heads only), the first on the axis
    ax.set_xticks(range(len(shots)), ["0\n(zero-shot)" if str(s) == "0" else str(s) for s in shots])
    ax.set_xlabel("shots per class (support samples)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="method (band: ± 1 std over seeds)",
              title_fontsize=8, frameon=False)
    return fig


def gen_norm_heatmap(summary: pd.DataFrame, metric: str, shots: str, title: str):
    """GEN (with options) against the NORM triple (pre / post / inference) at one shot count;
    a cell holds the best mean over the methods sharing it (they differ in AGG)."""
    rows = summary[summary["shots"] == shots]
    cells: dict[tuple[str, str], float] = {}
    for r in rows.itertuples(index=False):
        parts = stages(_spec_of(r))
        if parts is None:
            continue
        key = (parts[1], f"{parts[0]} / {parts[2]} / {parts[3]}")
        cells[key] = max(cells.get(key, -math.inf), r.mean)
    if not cells:
        return None
    gens = sorted({g for g, _ in cells}, key=_gen_order)
    norms = sorted({n for _, n in cells})
    scale, label = _scale(metric)
    grid = np.full((len(gens), len(norms)), np.nan)
    for (g, n), v in cells.items():
        grid[gens.index(g), norms.index(n)] = v * scale
    fig = _figure(max(5.5, 1.35 * len(norms) + 3.2), max(3.0, 0.45 * len(gens) + 2.0))
    ax = fig.add_subplot()
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto")
    finite = grid[np.isfinite(grid)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(len(gens)):
        for j in range(len(norms)):
            v = grid[i, j]
            text = "–" if math.isnan(v) else (f"{v:.1f}" if scale == 100 else f"{v:.3g}")
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if not math.isnan(v) and v < mid else "black")
    ax.set_xticks(range(len(norms)), norms, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(gens)), gens, fontsize=8)
    ax.set_xlabel("NORM: support before GEN / proxies / queries")
    ax.set_ylabel("GEN (proxies per class)")
    ax.set_title(f"{title}\n{shots}-shot, best over AGG; grey: not in the grid", fontsize=10)
    fig.colorbar(image, ax=ax, label=label)
    return fig


def _spec_of(row) -> str:
    spec = getattr(row, "spec", None)
    return spec if isinstance(spec, str) else str(row.method)


GEN_ORDER = ("mean", "kmeans", "kmedoids", "random", "fps", "all", "ls", "none")


def _gen_order(gen: str):
    """mean first, then the multi-proxy generators by k, then the rest."""
    name, _, opts = gen.partition(":")
    k = re.search(r"(?:^|,)k=(\d+)", opts)
    rank = GEN_ORDER.index(name) if name in GEN_ORDER else len(GEN_ORDER)
    return (rank, name, int(k.group(1)) if k else 0, opts)


def kmeans_family(spec: str) -> tuple[tuple, int] | None:
    """(the spec with k taken out, k) for k-means heads; mean imprinting counts as k = 1."""
    parts = stages(spec)
    if parts is None:
        return None
    name, _, opts = parts[1].partition(":")
    if name == "mean" and not opts:
        return (parts[0], "", parts[2], parts[3], parts[4]), 1
    if name != "kmeans":
        return None
    k = re.search(r"(?:^|,)k=(\d+)", opts)
    if not k:
        return None
    rest = ",".join(o for o in opts.split(",") if not o.startswith("k="))
    return (parts[0], rest, parts[2], parts[3], parts[4]), int(k.group(1))


def kmeans_sweep(summary: pd.DataFrame, metric: str, title: str):
    """The k of the largest k-means sweep (same other stages, at least 3 values of k counting
    mean imprinting as k = 1): one line per shot count, band ± 1 std over seeds."""
    families: dict[tuple, dict[int, str]] = {}
    spec_of = {}
    for r in summary.itertuples(index=False):
        spec_of[r.method] = _spec_of(r)
    for method, spec in spec_of.items():
        fam = kmeans_family(spec)
        if fam:
            families.setdefault(fam[0], {})[fam[1]] = method
    families = {f: ks for f, ks in families.items() if len(ks) >= 3 and max(ks) > 1}
    if not families:
        return None
    family, ks = max(families.items(), key=lambda kv: len(kv[1]))
    scale, ylabel = _scale(metric)
    shots = ordered_shots(summary["shots"])
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    for i, (s, color) in enumerate(zip(shots, _colors(len(shots)))):
        pts = []
        for k, method in sorted(ks.items()):
            row = summary[(summary["method"] == method) & (summary["shots"] == s)]
            if len(row):
                pts.append((k, row["mean"].iloc[0] * scale, row["std"].iloc[0] * scale))
        if not pts:
            continue
        k_arr, mean, std = (np.array(v) for v in zip(*pts))
        ax.plot(k_arr, mean, marker=MARKERS[i % len(MARKERS)], color=color, label=f"{s}-shot")
        ax.fill_between(k_arr, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    ticks = sorted(ks)
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.minorticks_off()
    ax.set_xlabel("k (proxies per class; k = 1 is mean imprinting)")
    ax.set_ylabel(ylabel)
    pre, rest, post, inf, agg = family
    gen = "kmeans:k=K" + (f",{rest}" if rest else "")
    ax.set_title(f"{title}\nk-means sweep {pre}/{gen}/{post}/{inf}/{agg}; band: ± 1 std over seeds", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, title="shots",
              title_fontsize=8)
    return fig


def critical_difference(comparison: Comparison):
    """Demšar's diagram: average ranks on an axis, methods joined by a bar when the post-hoc
    test finds no significant difference (scikit-posthocs draws it)."""
    import scikit_posthocs as sp

    k = len(comparison.ranks)
    fig = _figure(10.0, 1.5 + 0.3 * k)
    ax = fig.add_subplot()
    drawn = sp.critical_difference_diagram(comparison.ranks, comparison.pvalues, ax=ax, alpha=comparison.alpha,
                                           label_fmt_left="{label} ({rank:.2f})",
                                           label_fmt_right="({rank:.2f}) {label}", label_props={"fontsize": 9})
    if comparison.cd is not None:
        # Below the lowest label: the library's own place for it, above the axis, overlaps the ticks.
        y = min(t.get_position()[1] for t in drawn["labels"]) - 1.2
        x0 = float(comparison.ranks.iloc[0])
        ax.plot([x0, x0 + comparison.cd], [y, y], color="black", linewidth=2.5)
        for x in (x0, x0 + comparison.cd):
            ax.plot([x, x], [y - 0.2, y + 0.2], color="black", linewidth=1.5)
        ax.text(x0 + comparison.cd / 2, y - 0.35, f"critical difference (Nemenyi) = {comparison.cd:.2f}",
                ha="center", va="top", fontsize=9)
        bottom, top = ax.get_ylim()
        ax.set_ylim(min(bottom, y - 1.2), top)
    test = ("Nemenyi" if comparison.posthoc == "nemenyi" else "Wilcoxon signed-rank, Holm-corrected")
    ax.set_title(f"average rank of {comparison.metric} over {comparison.blocks.shape[0]} cells (1 = best, left); "
                 f"Friedman p = {comparison.friedman_p:.2g}\nbars join methods not significantly different "
                 f"({test}, α = {comparison.alpha:g})", fontsize=10)
    return fig


def diagnostics_scatter(diag: pd.DataFrame, accuracy: pd.DataFrame, metric: str, columns: list[str]):
    """Each diagnostic against the mean accuracy of one method at one shot count, a point per
    (backbone, class subset); Kendall's tau per class subset across backbones in each title."""
    method = accuracy["method"].iloc[0]
    shots = ordered_shots(accuracy["shots"])[-1]
    acc = (accuracy[(accuracy["method"] == method) & (accuracy["shots"] == shots)]
           .groupby(["backbone", "classes"])[metric].mean().rename("y").reset_index())
    data = diag.merge(acc, on=["backbone", "classes"])
    columns = [c for c in columns if c in data.columns and pd.api.types.is_numeric_dtype(data[c])]
    if data.empty or not columns:
        return None
    scale, ylabel = _scale(metric)
    ncols = min(4, len(columns))
    nrows = math.ceil(len(columns) / ncols)
    fig = _figure(3.3 * ncols + 1.6, 2.9 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    subsets = list(dict.fromkeys(data["classes"]))
    colors = dict(zip(subsets, _colors(len(subsets))))
    for ax, col in zip(axes.flat, columns):
        taus = []
        for subset in subsets:
            part = data[data["classes"] == subset]
            ax.scatter(part[col], part["y"] * scale, color=colors[subset], label=subset, s=28)
            if len(part) >= 3:
                taus.append(f"{subset} {kendall_tau(part[col], part['y']):+.2f}")
            else:
                taus.append(f"{subset} n/a")
        ax.set_title(f"{col}\nKendall τ: " + ", ".join(taus), fontsize=8)
        ax.set_xlabel(col, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(columns):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", title="classes", fontsize=8, title_fontsize=8)
    fig.suptitle(f"diagnostics against {metric} of {method} at {shots}-shot "
                 f"(τ across backbones; n/a below 3 backbones)", fontsize=10)
    return fig
