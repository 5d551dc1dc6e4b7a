"""``bench diagnose``: every diagnostic for every (backbone, dataset) of a config, next to the
few-shot accuracy of chosen methods, and rank correlations between the two across backbones."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch

from bench.backbones.registry import Backbone
from bench.config import BackboneConfig, RunConfig
from bench.data.sources import build_source
from bench.diagnostics.collapse import neural_collapse
from bench.diagnostics.geometry import geometric_complexity
from bench.diagnostics.transferability import h_score, linear_cka, logme, ncc_accuracy, ncti_scores
from bench.errors import BenchError
from bench.statistics import kendall_tau, mean_std, weighted_tau

# Diagnostics whose lower value is expected to mean better transfer (for reading the taus).
LOWER_IS_BETTER = {"nc1", "nc1_quotient", "cdnv", "cdnv_unbiased", "equinorm", "equiangularity",
                   "max_angle", "gc", "gc_normalized"}


def embedding_diagnostics(emb: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Neural collapse on raw and l2-normalised embeddings, plus transferability scores.
    A diagnostic without a value is NaN, and ``undefined`` says why ("" when all are defined)."""
    out: dict[str, Any] = {}
    why: list[str] = []
    for prefix, normalize in (("", False), ("l2_", True)):
        nc = neural_collapse(emb, labels, normalize=normalize)
        for key in ("nc1", "nc1_quotient", "equinorm", "equiangularity", "max_angle", "cdnv", "cdnv_unbiased"):
            out[prefix + key] = nc[key]
        why += [f"{prefix}{key}: {reason}" for key, reason in nc.get("undefined", {}).items()]
    out["undefined"] = "; ".join(why)
    out["ncc_accuracy"] = ncc_accuracy(emb, labels)
    out["logme"] = logme(emb, labels)["logme"]
    out["h_score"] = h_score(emb, labels)
    return out


def image_batches(backbone: Backbone, source, indices: Sequence[int], batch_size: int = 64):
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        yield torch.stack([backbone.transform(source.load(int(i))) for i in chunk])


def gc_for(backbone: Backbone, source, classes: Sequence[int], samples: int, probes: int, seed: int = 0,
           labels=None):
    """Geometric complexity on a fixed, seeded sample of the given classes' images. ``labels``
    (one per dataset index) replace the source's own, e.g. a query split's in the pool's ids."""
    import numpy as np

    pool = np.flatnonzero(np.isin(source.labels if labels is None else labels, list(classes)))
    rng = np.random.Generator(np.random.PCG64(seed))
    chosen = np.sort(rng.choice(pool, size=min(samples, len(pool)), replace=False))
    shape = tuple(next(image_batches(backbone, source, chosen[:1])).shape[1:])
    return geometric_complexity(backbone.model, image_batches(backbone, source, chosen), probes=probes, seed=seed,
                                input_space=f"{backbone.name} input tensor {shape} after its transform")


MIN_BACKBONES_FOR_TAU = 3


def tau_undefined(x: Sequence[float], y: Sequence[float], names: Sequence[str] | None = None) -> str:
    """Why Kendall's tau between x and y (one value per backbone) has no value; "" when it has one."""
    if len(x) < MIN_BACKBONES_FOR_TAU:
        return f"Kendall tau needs at least {MIN_BACKBONES_FOR_TAU} backbones, got {len(x)}"
    names = list(names) if names is not None else [str(i) for i in range(len(x))]
    missing = [n for n, a, b in zip(names, x, y) if not (math.isfinite(a) and math.isfinite(b))]
    if missing:
        return f"no value for {', '.join(missing)} (see the 'undefined' column of diagnostics.csv)"
    if len(set(x)) == 1 or len(set(y)) == 1:
        return "every backbone has the same value, so there is no ranking to correlate"
    return ""


def kendall(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Kendall's tau and weighted tau (scipy), NaN when undefined (see :func:`tau_undefined`)."""
    if tau_undefined(x, y):
        return float("nan"), float("nan")
    return kendall_tau(x, y), weighted_tau(x, y)


def correlations(diag_rows: Sequence[dict], acc_rows: Sequence[dict]) -> list[dict[str, Any]]:
    """Tau between every diagnostic and each method's mean accuracy, per class subset and shots,
    across backbones."""
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in acc_rows:
        acc[(r["backbone"], r["classes"], r["method"], str(r["shots"]))].append(float(r["acc"]))
    out = []
    subsets = sorted({r["classes"] for r in diag_rows})
    for subset in subsets:
        drows = [r for r in diag_rows if r["classes"] == subset]
        backbones = [r["backbone"] for r in drows]
        keys = sorted({(m, s) for (b, c, m, s) in acc if c == subset})
        metrics = [k for k, v in drows[0].items() if isinstance(v, float) and k not in ("backbone", "classes")]
        for method, shots in keys:
            accs = [mean_std(acc[(b, subset, method, shots)])[0] for b in backbones]
            for metric in metrics:
                values = [r[metric] for r in drows]
                tau, wtau = kendall(values, accs)
                out.append({"classes": subset, "method": method, "shots": shots, "diagnostic": metric,
                            "kendall_tau": tau, "weighted_tau": wtau, "backbones": len(backbones),
                            "lower_is_better": metric in LOWER_IS_BETTER,
                            "undefined": tau_undefined(values, accs, backbones)})
    return out


def diagnose(cfg: RunConfig, backbones: Sequence[BackboneConfig], methods: Sequence[str],
             gc_samples: int = 256, gc_probes: int = 16, pool_split: str | None = None) -> dict[str, list]:
    """Diagnostics and accuracies for every backbone; rank correlations when there are several."""
    from bench.pipeline import extract_stage, imprint_stage, quiet_lightning

    quiet_lightning()
    diag_rows, acc_rows, pools = [], [], {}
    for bb_cfg in backbones:
        run_cfg = cfg.model_copy(update={"backbone": bb_cfg, "methods": list(methods)})
        emb = extract_stage(run_cfg)
        rows, _, _ = imprint_stage(run_cfg, emb)
        acc_rows += rows
        # The labelled pool for diagnostics is kept apart from the support sets: the query split.
        split = pool_split or ("test" if emb.queries is not None else cfg.dataset.train_split)
        entry = emb.queries if split == "test" and emb.queries is not None else emb.pool
        source = build_source(emb.dataset or cfg.dataset.name or emb.suite.dataset, split=split, **cfg.dataset.options)
        pools[emb.backbone.name] = entry
        available = torch.unique(entry.labels[entry.labels >= 0]).tolist()  # -1: a query class the pool lacks
        for subset, classes in emb.suite.subsets(available):
            keep = torch.isin(entry.labels, torch.tensor(classes))
            row: dict[str, Any] = {"backbone": emb.backbone.name, "classes": subset, "pool_split": split,
                                   "num_samples": int(keep.sum())}
            row.update(embedding_diagnostics(entry.embeddings[keep].double(), entry.labels[keep]))
            # the entry's labels are in the pool's class ids (a query split numbers its own)
            by_index = torch.full((len(source),), -1, dtype=torch.long)
            by_index[entry.indices] = entry.labels.long()
            gc = gc_for(emb.backbone, source, classes, gc_samples, gc_probes, labels=by_index.numpy())
            row.update({"gc": gc["gc"], "gc_normalized": gc["gc_normalized"], "gc_probes": gc["probes"],
                        "gc_input_space": gc["input_space"]})
            diag_rows.append(row)
    result = {"diagnostics": diag_rows, "accuracy": acc_rows, "correlations": [], "cka": []}
    if len(backbones) > 1:
        for subset in sorted({r["classes"] for r in diag_rows}):
            drows = [r for r in diag_rows if r["classes"] == subset]
            ncti = ncti_scores({r["backbone"]: r for r in drows})
            for r in drows:
                r["ncti"] = ncti[r["backbone"]]
        result["correlations"] = correlations(diag_rows, acc_rows)
        names = list(pools)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                xa, xb = pools[a].embeddings[:2000].double(), pools[b].embeddings[:2000].double()
                if not torch.equal(pools[a].indices[:2000], pools[b].indices[:2000]):
                    raise BenchError(f"CKA needs the same samples for {a} and {b}")
                result["cka"].append({"a": a, "b": b, "linear_cka": linear_cka(xa, xb),
                                      "linear_cka_debiased": linear_cka(xa, xb, debiased=True)})
    return result


def write_diagnostics(result: dict[str, list], out_dir: Path) -> list[Path]:
    from bench.report.results import write_table

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("diagnostics", "correlations", "cka", "accuracy"):
        if result[name]:
            paths += write_table(result[name], out_dir, stem=name)
    return paths


def format_correlations(rows: Sequence[dict], top: int = 12) -> str:
    """The strongest rank correlations, then why the undefined ones have no value."""
    if not rows:
        return f"(one backbone: no rank correlations; Kendall tau needs at least {MIN_BACKBONES_FOR_TAU} backbones)"
    defined = [r for r in rows if not r.get("undefined")]
    lines = []
    if defined:
        lines.append(f"{'classes':8s} {'method':24s} {'shots':>5s} {'diagnostic':18s} {'tau':>6s} {'w.tau':>6s}")
        for r in sorted(defined, key=lambda r: -abs(r["kendall_tau"]))[:top]:
            lines.append(f"{r['classes']:8s} {r['method'][:24]:24s} {r['shots']!s:>5s} {r['diagnostic'][:18]:18s} "
                         f"{r['kendall_tau']:+6.2f} {r['weighted_tau']:+6.2f}")
    reasons: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        if r.get("undefined"):
            reasons[r["undefined"]].add(r["diagnostic"])
    for reason, diagnostics in reasons.items():
        count = sum(r.get("undefined") == reason for r in rows)
        if reason.startswith("Kendall tau needs"):
            lines.append(f"{reason}: no rank correlations ({count} undefined rows in correlations.csv)")
        else:
            lines.append(f"Kendall tau undefined for {', '.join(sorted(diagnostics))}: {reason}")
    return "\n".join(lines)
