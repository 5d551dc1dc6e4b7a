"""Evaluation metrics (torchmetrics), shared by the imprint stage, the library and the
LightningModule.

Every head reports top-1 accuracy, balanced (macro) accuracy, macro F1 and per-class accuracy.
:class:`HeadGridMetrics` computes them for many heads at once from one confusion matrix per
head (a torchmetrics state summed across processes); it equals torchmetrics'
``MulticlassAccuracy``/``MulticlassF1Score`` (tested), at a fraction of the cost of one metric
collection per head, which matters when a benchmark scores thousands of heads.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from bench.imprint.head import ImprintedHead


def head_metrics(num_classes: int) -> MetricCollection:
    """top-1 accuracy, balanced (macro) accuracy, macro F1 and per-class accuracy for one head.

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


class HeadGridMetrics(Metric):
    """The same four metrics for H heads scored on the same queries.

    ``update(preds (H, N), target (N,))`` with class positions 0..C-1; ``compute()`` returns
    ``acc``, ``balanced_acc``, ``macro_f1`` of shape (H,) and ``per_class_acc`` (H, C).
    Conventions follow torchmetrics: a class that is neither a target nor a prediction is left
    out of the macro averages, and a score whose denominator is 0 is 0.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_heads: int, num_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_heads, self.num_classes = num_heads, num_classes
        self.add_state("confmat", torch.zeros(num_heads, num_classes, num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        h, c = self.num_heads, self.num_classes
        cells = (torch.arange(h, device=preds.device)[:, None] * c + target[None, :]) * c + preds
        self.confmat += torch.bincount(cells.flatten(), minlength=h * c * c).view(h, c, c)

    def compute(self) -> dict[str, torch.Tensor]:
        cm = self.confmat.double()
        tp = cm.diagonal(dim1=1, dim2=2)  # (H, C)
        support = cm.sum(2)  # queries per true class: tp + fn
        predicted = cm.sum(1)  # tp + fp
        # As torchmetrics: a class that is neither a target nor a prediction leaves the averages.
        present = (support + predicted) > 0
        recall = tp / support.clamp_min(1)
        f1 = 2 * tp / (support + predicted).clamp_min(1)  # 2tp / (2tp + fp + fn)
        n_present = present.sum(1).clamp_min(1)
        return {
            "acc": tp.sum(1) / cm.sum((1, 2)).clamp_min(1),
            "balanced_acc": (recall * present).sum(1) / n_present,
            "macro_f1": (f1 * present).sum(1) / n_present,
            "per_class_acc": recall,
        }


def flatten_metrics(values: dict[str, Any], classes: Iterable[int]) -> dict[str, float]:
    """Scalars as floats; per-class accuracy as one ``acc_class_<label>`` key per class.
    Values are tensors, floats, or lists (one value per class)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            value = value.item() if value.numel() == 1 else value.tolist()
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, list):
            for c, v in zip(classes, value):
                out[f"{key.replace('per_class_acc', 'acc_class')}_{c}"] = float(v)
        else:
            out[key] = float(value)
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
