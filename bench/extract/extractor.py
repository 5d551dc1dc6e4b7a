"""Distributed embedding extraction through ``Trainer.predict``.

Each rank runs the frozen backbone on its part of the dataset (Lightning's own distributed
sampler, no repeats when predicting) and :class:`ShardWriter` writes what it computes to
shard files with the dataset indices. When all ranks are done, rank 0 merges the shards in
dataset order into one cache entry, written atomically.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from safetensors.torch import load_file, save_file

from bench.backbones.registry import Backbone
from bench.data.datamodules import ImageDataModule
from bench.data.sources import Source
from bench.errors import BenchError
from bench.extract.cache import DTYPES, CacheEntry, EmbeddingCache, cache_key, open_entry


class EmbeddingExtractor(L.LightningModule):
    """A frozen backbone in a LightningModule; ``predict_step`` returns embeddings + indices."""

    def __init__(self, model: torch.nn.Module, dtype: str = "float32") -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise BenchError(f"embedding dtype '{dtype}' is not one of {', '.join(DTYPES)}")
        self.model = model
        self.out_dtype = DTYPES[dtype]

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        if batch["images"] is None:
            emb = torch.empty(0, 0)
        else:
            emb = self.model(batch["images"]).flatten(1)
            if not torch.isfinite(emb).all():
                bad = batch["indices"][~torch.isfinite(emb).all(1).cpu()].tolist()
                raise BenchError(
                    f"the backbone produced NaN/Inf embeddings for dataset indices {bad[:10]}; "
                    "try trainer.precision=32-true"
                )
        return {
            "embeddings": emb.to(self.out_dtype).cpu(),
            "labels": batch["labels"].cpu() if batch["labels"] is not None else torch.empty(0, dtype=torch.long),
            "indices": batch["indices"].cpu(),
            "skipped": batch["skipped"].cpu(),
        }


class ShardWriter(BasePredictionWriter):
    """Buffers a rank's predictions and writes ``rank<r>-<n>.safetensors`` shards of at most
    ``shard_size`` rows, so no rank holds the whole dataset."""

    def __init__(self, shard_dir: Path, shard_size: int = 65536) -> None:
        super().__init__(write_interval="batch")
        self.shard_dir, self.shard_size = Path(shard_dir), shard_size
        self._buf: list[dict[str, torch.Tensor]] = []
        self._rows = 0
        self._count = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        self._buf.append(prediction)
        self._rows += len(prediction["indices"]) + len(prediction["skipped"])
        if self._rows >= self.shard_size:
            self._flush(trainer.global_rank)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self._flush(trainer.global_rank)

    def _flush(self, rank: int) -> None:
        if not self._buf:
            return
        parts = [p for p in self._buf if len(p["indices"])]
        shard = {
            "indices": torch.cat([p["indices"] for p in self._buf]),
            "skipped": torch.cat([p["skipped"] for p in self._buf]),
        }
        if parts:
            shard["embeddings"] = torch.cat([p["embeddings"] for p in parts]).contiguous()
            shard["labels"] = torch.cat([p["labels"] for p in parts])
        tmp = self.shard_dir / f".rank{rank:04d}-{self._count:06d}.tmp"
        save_file(shard, str(tmp))
        tmp.rename(self.shard_dir / f"rank{rank:04d}-{self._count:06d}.safetensors")
        self._count += 1
        self._buf, self._rows = [], 0


def merge_shards(shard_dir: Path, num_samples: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Concatenate every rank's shards, order by dataset index, check each index once."""
    embs, labels, idxs, skipped = [], [], [], []
    for f in sorted(shard_dir.glob("rank*.safetensors")):
        t = load_file(str(f))
        skipped.append(t["skipped"])
        if "embeddings" in t:
            embs.append(t["embeddings"])
            labels.append(t["labels"])
            idxs.append(t["indices"])
    if not embs:
        raise BenchError("extraction produced no embeddings (every image was skipped?)")
    emb, lab, idx = torch.cat(embs), torch.cat(labels), torch.cat(idxs)
    skip = torch.cat(skipped) if skipped else torch.empty(0, dtype=torch.long)
    order = torch.argsort(idx)
    emb, lab, idx = emb[order], lab[order], idx[order]
    seen = torch.cat([idx, skip])
    if len(seen) != num_samples or not torch.equal(torch.sort(seen).values, torch.arange(num_samples)):
        counts = torch.bincount(seen, minlength=num_samples)
        raise BenchError(
            f"shards in {shard_dir} do not cover the dataset exactly once: "
            f"{int((counts == 0).sum())} missing, {int((counts > 1).sum())} repeated"
        )
    return emb, lab, idx, sorted(skip.tolist())


def entry_fields(backbone: Backbone, source: Source, dtype: str) -> dict[str, Any]:
    return {**backbone.key_fields(), **source.key_fields(), "dtype": dtype}


def extract(
    backbone: Backbone,
    source: Source,
    cache: EmbeddingCache,
    *,
    trainer_kwargs: dict[str, Any] | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    dtype: str = "float32",
    skip_corrupt: bool = False,
    rebuild: bool = False,
    shard_size: int = 65536,
    callbacks: list | None = None,
) -> CacheEntry:
    """Return the cache entry for (backbone, source, dtype), extracting it if needed."""
    fields = entry_fields(backbone, source, dtype)
    key = cache_key(fields)
    final = cache.path_for(key)
    if final.exists() and rebuild:
        shutil.rmtree(final)
    if final.exists():
        return open_entry(final)

    kwargs = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
              "enable_model_summary": False, **(trainer_kwargs or {})}
    shard_dir = cache.root / f".shards-{key}"
    writer = ShardWriter(shard_dir, shard_size)
    trainer = L.Trainer(callbacks=[writer, *(callbacks or [])], **kwargs)
    if trainer.is_global_zero:
        shutil.rmtree(shard_dir, ignore_errors=True)  # leftovers of an interrupted run
        shard_dir.mkdir(parents=True)
    trainer.strategy.barrier("bench-extract-start")
    dm = ImageDataModule(source, backbone.transform, batch_size, num_workers, skip_corrupt)
    try:
        trainer.predict(EmbeddingExtractor(backbone.model, dtype), datamodule=dm, return_predictions=False)
        trainer.strategy.barrier("bench-extract-written")
        if trainer.is_global_zero:
            emb, lab, idx, skipped = merge_shards(shard_dir, len(source))
            if skipped:
                print(f"skipped {len(skipped)} corrupt image(s): dataset indices {skipped[:20]}"
                      + (" ..." if len(skipped) > 20 else ""))
            cache.write(key, fields, emb, lab, idx, class_names=source.class_names, skipped=skipped,
                        world_size=trainer.world_size)
    finally:
        if trainer.is_global_zero:
            shutil.rmtree(shard_dir, ignore_errors=True)
    trainer.strategy.barrier("bench-extract-merged")
    return open_entry(final)
