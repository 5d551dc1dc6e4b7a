"""Choosing a method's setting without looking at the test set (the run config's ``select:``).

A family is a named grid of methods, e.g. ``{name: kmeans, methods: "l2/kmeans:k=[1,5,10,20]/l2/l2/max"}``,
or the name of one of :data:`bench.imprint.presets.FAMILIES` alone (``select: [dinov2-knn]``).
Its members are ordinary specs of the run's grid (each also gets its own rows); in addition, every
member's head is scored on the episode's validation part (pool samples set apart by the task's
``validation``, disjoint from support and queries), and per episode and family two rows are added:

- ``<family>@val``: the test metrics of the member with the best validation accuracy (ties: the
  first listed), with ``selection = "validation"`` and ``selected`` = that member's name. The
  choice reads validation scores only, so the row is an honest estimate.
- ``<family>@oracle``: the member with the best test accuracy, ``selection = "oracle"``. It is
  the optimistic upper bound of picking on the test set; reports label it and never star it.

Plain rows carry ``selection = ""`` and ``selected = ""``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from bench.errors import BenchError
from bench.imprint import MethodSpec, expand_grid, score_heads
from bench.imprint.gen import class_positions
from bench.imprint.presets import FAMILIES
from bench.imprint.registry import get
from bench.report.schema import MEMBER

SELECTIONS = ("validation", "oracle")
# A family member the run did not list among its methods gets selection MEMBER in its own rows:
# results.csv keeps them, tables, figures and W&B charts leave them out (16 Tip-Adapter settings
# would otherwise crowd every table around the one row the family stands for).


def shown(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows a report shows: all but the unlisted family members' (see :data:`MEMBER`)."""
    return [r for r in rows if r.get("selection") != MEMBER]


@dataclass(frozen=True)
class Family:
    name: str
    members: tuple[MethodSpec, ...]


def families(select: Sequence[Any]) -> list[Family]:
    """Families from the config's ``select`` entries (``name`` and ``methods``), grids expanded."""
    out, names = [], set()
    for entry in select:
        if entry.name in names:
            raise BenchError(f"select: family '{entry.name}' is listed twice; give each family its own name")
        names.add(entry.name)
        methods = entry.methods
        if methods is None:
            if entry.name not in FAMILIES:
                raise BenchError(f"select: '{entry.name}' is not a named family ({', '.join(FAMILIES)}); give its "
                                 "members as {name: " + entry.name + ", methods: <grid>}")
            methods = [FAMILIES[entry.name]]
        out.append(Family(entry.name, tuple(expand_grid(list(methods)).specs)))
    return out


def with_members(specs: Sequence[MethodSpec], fams: Sequence[Family]) -> list[MethodSpec]:
    """The run's specs followed by the families' members that are not already among them."""
    out = list(specs)
    for fam in fams:
        out += [m for m in fam.members if m not in out]
    return out


def check_selection(fams: Sequence[Family], validation: Any) -> None:
    """Selection needs a validation part in the task: refused before any work otherwise."""
    if fams and not validation:
        raise BenchError(f"select: families {[f.name for f in fams]} are chosen on a validation part, but the task "
                         "has none; set `validation: 0.2` in the task (or task.validation=0.2 on the command line)")


def training_free(spec: MethodSpec) -> bool:
    """False for fitted heads (a GEN whose registry fact says so, e.g. logreg)."""
    return get("gen", spec.gen.name).training_free


def validation_accuracy(heads: Sequence[Any], embeddings: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Each head's top-1 accuracy on the validation samples (pool embeddings and labels)."""
    classes = heads[0].classes
    target = class_positions(classes, labels.to(classes.device).long(), "validation labels")
    scores = score_heads(heads, embeddings.float())
    return [float((s.argmax(1) == target).double().mean()) for s in scores]


def selection_rows(fams: Sequence[Family], specs: Sequence[MethodSpec], rows: Mapping[int, dict[str, Any]],
                   val_acc: dict[int, float], metric: str = "acc") -> list[dict[str, Any]]:
    """One episode's ``@val`` and ``@oracle`` rows. ``rows[i]`` is spec i's test row and
    ``val_acc[i]`` its validation accuracy (for every family member)."""
    index = {spec: i for i, spec in enumerate(specs)}
    out = []
    for fam in fams:
        members = [index[m] for m in fam.members]
        # max() keeps the first of equal values: ties go to the first listed member
        by_val = max(members, key=lambda i: val_acc[i])
        by_test = max(members, key=lambda i: rows[i][metric])
        for suffix, kind, pick in (("val", "validation", by_val), ("oracle", "oracle", by_test)):
            row = {k: v for k, v in rows[pick].items() if k != "_order"}
            # spec names the family, not the pick: the pick changes per episode, and a method's spec must not
            row.update(method=f"{fam.name}@{suffix}", spec=f"{fam.name}@{suffix}", selection=kind,
                       selected=specs[pick].name)
            if kind == "validation":
                row["validation_acc"] = val_acc[pick]
            out.append(row)
    return out
