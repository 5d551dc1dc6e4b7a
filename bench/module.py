"""ImprintingModule: many training-free heads in one LightningModule.

``fit`` imprints: ``training_step`` only embeds and collects the support set (a torchmetrics
state, gathered across ranks), and at the end of the epoch every head is built from the
whole support set, identically on every rank. There is no optimizer and no gradient.
``test`` scores every head on the queries with one torchmetrics ``MetricCollection`` per head.
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from bench.errors import BenchError
from bench.imprint import MethodSpec, Reference, SupportSet, build_head_grid, expand_grid, score_heads
from bench.metrics import flatten_metrics, head_metrics


class SupportCollector(Metric):
    """Support embeddings, labels and dataset indices, concatenated across batches and ranks.

    ``compute`` returns them sorted by dataset index with duplicates removed, so the heads
    see the same support in the same order on 1 or N processes.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("indices", default=[], dist_reduce_fx="cat")

    def update(self, embeddings: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        self.embeddings.append(embeddings.detach().float())
        self.labels.append(labels.long())
        self.indices.append(indices.long())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # After a cross-rank sync the list states arrive already concatenated as tensors.
        if isinstance(self.indices, list) and not self.indices:
            raise BenchError("the support set is empty; the episode selected no samples")
        idx = dim_zero_cat(self.indices)
        uniq, first = _first_occurrence(idx)
        return dim_zero_cat(self.embeddings)[first], dim_zero_cat(self.labels)[first], uniq


def _first_occurrence(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique values and the position of one occurrence of each."""
    order = torch.argsort(idx, stable=True)
    sorted_idx = idx[order]
    keep = torch.ones_like(sorted_idx, dtype=torch.bool)
    keep[1:] = sorted_idx[1:] != sorted_idx[:-1]
    return sorted_idx[keep], order[keep]


class ImprintingModule(L.LightningModule):
    """Holds an optional frozen backbone and one :class:`ImprintedHead` per method spec.

    Feed it batches of (inputs, labels, dataset indices): inputs are images when a backbone
    is given, embeddings otherwise (the cached path).
    """

    def __init__(
        self,
        methods: Sequence[str | MethodSpec],
        backbone: nn.Module | None = None,
        seed: int = 0,
        reference: Reference | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        specs = [m for m in methods if isinstance(m, MethodSpec)]
        texts = [m for m in methods if not isinstance(m, MethodSpec)]
        self.specs = specs + (expand_grid(texts).specs if texts else [])
        if not self.specs:
            raise BenchError("ImprintingModule needs at least one method")
        self.backbone = backbone
        if backbone is not None:
            backbone.eval().requires_grad_(False)
        self.seed = seed
        self.reference = reference
        self.support = SupportCollector()
        self.heads = nn.ModuleDict()
        self.test_metrics = nn.ModuleDict()
        self.results: dict[str, dict[str, float]] = {}

    @staticmethod
    def head_key(spec: MethodSpec) -> str:
        # ModuleDict keys cannot contain '.'; method names can (e.g. lam=0.01).
        return spec.name.replace(".", "_")

    def configure_optimizers(self) -> None:
        return None  # training-free: fit only collects the support set

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone is None:
            return x.float()
        self.backbone.eval()
        return self.backbone(x).flatten(1).float()

    def on_fit_start(self) -> None:
        self.support.reset()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y, idx = batch
        self.support.update(self.embed(x), y, idx)

    def on_train_epoch_end(self) -> None:
        emb, labels, _ = self.support.compute()
        episode = SupportSet(emb, labels, self.seed, reference=self.reference)
        self.heads = nn.ModuleDict()
        self.test_metrics = nn.ModuleDict()
        # One grid build: specs that share stages (normalised support, proxies) compute them once.
        for spec, (head,) in zip(self.specs, build_head_grid(self.specs, [episode])):
            key = self.head_key(spec)
            self.heads[key] = head
            self.test_metrics[key] = head_metrics(head.num_classes).to(self.device)
        self.support.reset()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        if not self.heads:
            raise BenchError("no heads to test: call trainer.fit(module, datamodule) first")
        x, y, _ = batch
        emb = self.embed(x)
        heads = list(self.heads.items())
        for (key, head), scores in zip(heads, score_heads([h for _, h in heads], emb)):
            self.test_metrics[key].update(scores, head.targets(y))

    def on_test_epoch_end(self) -> None:
        self.results = {}
        for spec in self.specs:
            key = self.head_key(spec)
            head = self.heads[key]
            metrics = flatten_metrics(self.test_metrics[key].compute(), head.classes.tolist())
            self.results[spec.name] = {**metrics, **head.summary()}
            self.test_metrics[key].reset()

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        emb = self.embed(x)
        heads = list(self.heads.items())
        scores = score_heads([h for _, h in heads], emb)
        return {name: head.classes[s.argmax(1)] for (name, head), s in zip(heads, scores)}


class TrainingFreeDDPStrategy(DDPStrategy):
    """DDP that does not wrap the model in ``DistributedDataParallel`` during ``fit``.

    A training-free fit has no gradients to reduce, and torch's DDP refuses modules without
    trainable parameters. Everything else (launchers, cluster environments, process groups,
    ``all_gather``, torchmetrics sync) is Lightning's DDP unchanged.
    """

    strategy_name = "ddp_training_free"

    def configure_ddp(self) -> None:
        pass


def trainer_for_imprinting(**kwargs: Any) -> L.Trainer:
    """A Trainer configured for ImprintingModule: one epoch, no checkpoints, no sampler
    injection (EpisodeDataModule shards without duplicates), and DDP without the wrapper."""
    strategy = kwargs.pop("strategy", "auto")
    if strategy in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"):
        start_method = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork",
                        "ddp_notebook": "fork"}[strategy]
        strategy = TrainingFreeDDPStrategy(start_method=start_method)
    defaults = {
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "use_distributed_sampler": False,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
    }
    return L.Trainer(strategy=strategy, **{**defaults, **kwargs})


__all__ = ["ImprintingModule", "SupportCollector", "TrainingFreeDDPStrategy", "trainer_for_imprinting"]
