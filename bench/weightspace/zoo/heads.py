"""The head zoo: heads that ``bench run ... save_heads=true`` saved, with their query accuracy.

A run folder holds ``results.csv`` (one row per backbone, dataset, task, classes, shots, seed,
method, with the query accuracy ``acc``) and ``heads/<classes>-<shots>shot-seed<seed>/<method
slug>.safetensors``. ``HeadZoo.load(run_dirs)`` pairs every row with its head file; a row whose
file is missing is an error (the run was not made with ``save_heads=true``, or was cut short).

An **episode** is (backbone, dataset, task, classes, shots, seed): the heads of one episode were
built from the same support set by different methods, which is what label-free head selection
chooses between.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from bench.errors import BenchError
from bench.naming import head_path

EPISODE_FIELDS = ("backbone", "dataset", "task", "classes", "shots", "seed")


@dataclass
class HeadWeights:
    """What an encoder reads of a head: proxies (P, D), each proxy's class column (P,) in
    0..C-1 (as ImprintedHead stores ``proxy_labels``) and the classes' label values (C,)."""

    proxies: torch.Tensor
    proxy_labels: torch.Tensor
    classes: torch.Tensor


@dataclass
class HeadRecord:
    path: Path
    run: str
    backbone: str
    dataset: str
    task: str
    classes: str
    shots: str
    seed: int
    method: str
    acc: float

    @property
    def episode(self) -> tuple:
        return (self.backbone, self.dataset, self.task, self.classes, self.shots, self.seed)

    def weights(self) -> HeadWeights:
        from bench.imprint import ImprintedHead

        head = ImprintedHead.load(self.path)
        return HeadWeights(head.proxies.float(), head.proxy_labels, head.classes)


class HeadZoo:
    def __init__(self, records: list[HeadRecord]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __getitem__(self, i: int) -> HeadRecord:
        return self.records[i]

    @classmethod
    def load(cls, run_dirs: Iterable[str | Path]) -> HeadZoo:
        records: list[HeadRecord] = []
        for run in map(Path, run_dirs):
            records += _read_run(run)
        if not records:
            raise BenchError("no heads found; make a head zoo with `bench run ... save_heads=true` "
                             "(or scripts/build_head_zoo.py) and pass its run folders")
        return cls(records)

    def targets(self) -> torch.Tensor:
        return torch.tensor([r.acc for r in self.records])

    def episodes(self) -> dict[tuple, list[int]]:
        """Episode -> indices of its heads, in zoo order."""
        out: dict[tuple, list[int]] = {}
        for i, r in enumerate(self.records):
            out.setdefault(r.episode, []).append(i)
        return out

    def describe(self) -> str:
        eps = self.episodes()
        methods = sorted({r.method for r in self.records})
        backbones = sorted({r.backbone for r in self.records})
        acc = self.targets()
        return (f"{len(self)} heads, {len(eps)} episodes, {len(methods)} methods, {len(backbones)} backbone(s); "
                f"query accuracy {float(acc.min()):.3f}-{float(acc.max()):.3f} (mean {float(acc.mean()):.3f})")


def _read_run(run: Path) -> list[HeadRecord]:
    table = run / "results.csv"
    if not table.is_file():
        raise BenchError(f"{run} is not a bench run folder (no results.csv); pass runs/<name> of a `bench run`")
    if not (run / "heads").is_dir():
        raise BenchError(f"run {run} saved no heads; rerun it with `bench run ... save_heads=true`")
    with table.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    needed = set(EPISODE_FIELDS) | {"method", "acc"}
    if rows and not needed <= set(rows[0]):
        raise BenchError(f"{table} lacks column(s) {sorted(needed - set(rows[0]))}")
    out = []
    for row in rows:
        path = head_path(run, row["classes"], row["shots"], int(row["seed"]), row["method"])
        if not path.is_file():
            raise BenchError(f"head file {path} for method '{row['method']}' is missing; rerun {run} "
                             "with save_heads=true")
        out.append(HeadRecord(path, run.name, row["backbone"], row["dataset"], row["task"], row["classes"],
                              str(row["shots"]), int(row["seed"]), row["method"], float(row["acc"])))
    return out
