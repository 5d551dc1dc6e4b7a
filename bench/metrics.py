"""Per-head evaluation metrics (torchmetrics), shared by the library and the LightningModule."""

from __future__ import annotations

from typing import Iterable

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from bench.imprint.head import ImprintedHead


def head_metrics(num_classes: int) -> MetricCollection:
    """top-1 accuracy, balanced (macro) accuracy, macro F1 and per-class accuracy.

    States are sums of counts, reduced across processes by torchmetrics.
    """
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "balanced_acc": MulticlassAccuracy(num_classes, average="macro"),
            "macro_f1": MulticlassF1Score(num_classes, average="macro"),
            "per_class_acc": MulticlassAccuracy(num_classes, average="none"),
        }
    )


def flatten_metrics(values: dict[str, torch.Tensor], classes: Iterable[int]) -> dict[str, float]:
    """Scalars as floats; per-class accuracy as one ``acc_class_<label>`` key per class."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if value.numel() == 1:
            out[key] = float(value)
        else:
            for c, v in zip(classes, value.tolist()):
                out[f"{key.replace('per_class_acc', 'acc_class')}_{c}"] = float(v)
    return out


@torch.no_grad()
def evaluate_head(
    head: ImprintedHead, queries: torch.Tensor, labels: torch.Tensor, batch_size: int = 4096
) -> dict[str, float]:
    """Score one head on an episode's queries. Labels are in the original label space."""
    target = head.targets(labels)
    metrics = head_metrics(head.num_classes).to(queries.device)
    for start in range(0, len(queries), batch_size):
        end = start + batch_size
        metrics.update(head(queries[start:end]), target[start:end].to(queries.device))
    return {**flatten_metrics(metrics.compute(), head.classes.tolist()), **head.summary()}
