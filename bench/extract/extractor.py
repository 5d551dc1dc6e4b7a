"""Distributed embedding extraction through ``Trainer.predict``.

Each rank runs the frozen backbone on its part of the dataset (Lightning's own distributed
sampler, no repeats when predicting) and :class:`ShardWriter` writes what it computes to
shard files with the dataset indices. When all ranks are done, rank 0 merges the shards in
dataset order into one cache entry, written atomically. From deciding what to extract to the
end of the merge, rank 0 holds the key's file lock, so concurrent runs of one key take turns
and the later one finds the entry, or resumes from the shards of a run that was killed.
"""

from __future__ import annotations

import mmap
import resource
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from filelock import Timeout
from lightning.pytorch.callbacks import BasePredictionWriter
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bench.backbones.registry import Backbone
from bench.data.datamodules import ImageDataModule
from bench.data.sources import Source
from bench.errors import BenchError
from bench.provenance import device_name
from bench.runtime import atomic_path, available_cpus
from bench.extract.cache import DTYPES, CacheEntry, EmbeddingCache, cache_key, open_entry


class EmbeddingExtractor(L.LightningModule):
    """A frozen backbone in a LightningModule; ``predict_step`` returns embeddings + indices.

    Precision (e.g. ``bf16-mixed`` autocast) comes from the Trainer. ``channels_last`` helps
    convolutional backbones on GPUs; ``compile`` wraps the backbone in ``torch.compile``.
    """

    def __init__(self, model: torch.nn.Module, dtype: str = "float32", channels_last: bool = False,
                 compile: bool = False) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise BenchError(f"embedding dtype '{dtype}' is not one of {', '.join(DTYPES)}")
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.forward_fn = torch.compile(self.model) if compile else self.model
        self.channels_last = channels_last
        self.out_dtype = DTYPES[dtype]
        self.failures: list[str] = []  # undecodable images this process met

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        if batch.get("errors"):
            if self.trainer.world_size == 1:
                raise BenchError(f"{batch['errors'][0]}; fix or remove it, or set extract.skip_corrupt=true")
            # Under DDP the other processes are told after the epoch, so all stop with this message
            # instead of waiting at a collective for a process that died.
            self.failures += batch["errors"]
        if batch["images"] is None:
            emb = torch.empty(0, 0)
        else:
            images = batch["images"]
            if self.channels_last and images.ndim == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            emb = self.forward_fn(images).flatten(1).float()
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
    """Buffers a rank's predictions and writes shards of at most ``shard_size`` rows as it goes,
    so no rank holds the whole dataset and an interrupted run keeps what it finished.

    Shard names carry the rank and a per-run tag, so a resumed run never overwrites the shards
    of the run before; each shard's metadata names the cache key and the dataset length, so a
    merge can refuse shards of another config or of a dataset that changed size.
    """

    def __init__(self, shard_dir: Path, key: str, num_samples: int, shard_size: int = 65536) -> None:
        super().__init__(write_interval="batch")
        self.shard_dir, self.key, self.num_samples, self.shard_size = Path(shard_dir), key, num_samples, shard_size
        self.tag = uuid.uuid4().hex[:8]
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
        name = f"rank{rank:04d}-{self.tag}-{self._count:06d}"
        meta = {"key": self.key, "num_samples": str(self.num_samples)}
        try:
            with atomic_path(self.shard_dir / f"{name}.safetensors") as tmp:
                save_file(shard, str(tmp), metadata=meta)
        except OSError as err:
            raise BenchError(
                f"could not write shard {name} to {self.shard_dir}: {err.strerror or err}. Free space "
                "and rerun: the shards already written are kept and only the rest is extracted"
            ) from err
        self._count += 1
        self._buf, self._rows = [], 0


def _shard_files(shard_dir: Path) -> list[Path]:
    return sorted(shard_dir.glob("rank*.safetensors"))


def scan_shards(shard_dir: Path, key: str, num_samples: int) -> torch.Tensor:
    """Dataset indices already covered (extracted or skipped) by valid shards in ``shard_dir``."""
    done = []
    for f in _shard_files(shard_dir):
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata() or {}
            if meta.get("key") != key:
                raise BenchError(
                    f"shard {f} belongs to another extraction (key {meta.get('key')}, expected {key}); "
                    f"shards of two configs must not share {shard_dir}: remove it"
                )
            if int(meta.get("num_samples", -1)) != num_samples:
                raise BenchError(
                    f"shard {f} was written for a dataset of {meta.get('num_samples')} samples, but the "
                    f"dataset now has {num_samples}: it changed between runs, so the shards cannot be "
                    f"merged. Remove {shard_dir} to extract from scratch"
                )
            done.append(h.get_tensor("indices"))
            done.append(h.get_tensor("skipped"))
    return torch.unique(torch.cat(done)) if done else torch.empty(0, dtype=torch.long)


def merge_shards(cache: EmbeddingCache, shard_dir: Path, key: str, fields: dict[str, Any], num_samples: int,
                 **extra: Any) -> CacheEntry:
    """Merge every rank's shards into one entry in dataset order, one shard in memory at a time.

    Every dataset index must be covered exactly once (extracted or skipped as corrupt); an index
    written twice (a shard of a crashed rank that was also redone) is kept once.
    """
    files = _shard_files(shard_dir)
    index_parts, skip_parts, dim, dtype = [], [], None, None
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            skip_parts.append(h.get_tensor("skipped"))
            if "embeddings" in h.keys():
                index_parts.append(h.get_tensor("indices"))
                sl = h.get_slice("embeddings")
                dim = sl.get_shape()[1]
                dtype = {"F32": torch.float32, "F16": torch.float16}[sl.get_dtype()]
    if dim is None:
        raise BenchError("extraction produced no embeddings (every image was skipped?)")
    indices = torch.unique(torch.cat(index_parts))
    skipped = torch.unique(torch.cat(skip_parts)) if skip_parts else torch.empty(0, dtype=torch.long)
    covered = torch.cat([indices, skipped])
    if len(covered) != num_samples or not torch.equal(torch.sort(covered).values, torch.arange(num_samples)):
        counts = torch.bincount(covered, minlength=num_samples)
        raise BenchError(
            f"shards in {shard_dir} do not cover the dataset exactly once: "
            f"{int((counts == 0).sum())} missing, {int((counts > 1).sum())} both extracted and skipped"
        )

    def fill(maps) -> None:
        maps["indices"][:] = indices.numpy()
        for f in files:
            t = load_file(str(f))  # one shard in memory at a time
            if "embeddings" not in t:
                continue
            pos = torch.searchsorted(indices, t["indices"]).numpy()
            maps["embeddings"][pos] = t["embeddings"].numpy()
            maps["labels"][pos] = t["labels"].numpy()
            release_pages(maps["embeddings"])

    return cache.write_streaming(key, fields, len(indices), dim, dtype, fill, skipped=skipped.tolist(), **extra)


def release_pages(array: np.ndarray) -> None:
    """Write a memory map's dirty pages to disk and drop them from this process's memory, so
    peak memory stays at one shard however large the entry is."""
    mm = getattr(array, "_mmap", None)  # numpy keeps the mmap object here
    if mm is None:
        return
    array.flush()
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


def entry_fields(backbone: Backbone, source: Source, dtype: str) -> dict[str, Any]:
    return {**backbone.key_fields(), **source.key_fields(), "dtype": dtype}


LOCK_POLL_S = 5.0  # rank 0 reports to the other ranks this often while it waits for the lock


class ExtractionPlan(L.Callback):
    """Decides on global rank 0, under the entry's file lock, what this run extracts, and tells
    every rank, once the Trainer's processes are up.

    Deciding inside the process group keeps the ranks in agreement even when another run
    finishes the same entry meanwhile. Rank 0 tries the lock for a few seconds at a time and
    broadcasts after each try, so a wait of any length never runs into a collective's timeout.
    Under the lock it clears what killed runs left, then either finds the entry or lists the
    dataset indices that no shard covers yet. An entry that exists already is served without
    the lock, so a read-only cache serves multi-process runs too.
    """

    def __init__(self, cache: EmbeddingCache, key: str, num_samples: int, datamodule: ImageDataModule,
                 rebuild: bool = False) -> None:
        self.cache, self.key, self.num_samples, self.datamodule, self.rebuild = (
            cache, key, num_samples, datamodule, rebuild)
        self.lock = None
        self.held = False
        self.state: str | None = None  # "hit" or "extract"
        self.entry: CacheEntry | None = None

    def setup(self, trainer, pl_module, stage) -> None:
        announced = False
        while True:
            msg = self._decide() if trainer.is_global_zero else None
            msg = trainer.strategy.broadcast(msg, src=0)
            if msg[0] != "wait":
                break
            if trainer.is_global_zero and not announced:
                print(f"waiting for another run that is extracting the same entry (lock {self.lock.lock_file}); "
                      "if it stops, this run continues from its shards", flush=True)
                announced = True
        if msg[0] == "error":
            raise BenchError(msg[1])
        if not trainer.strategy.reduce_boolean_decision(msg[1] == self.key, all=True):
            raise BenchError(
                f"the processes of this run computed different cache keys for {self.cache.root} (rank 0: "
                f"{msg[1]}, this rank: {self.key}): the dataset changed while they started; rerun")
        self.state = msg[0]
        if self.state == "hit":
            trainer.limit_predict_batches = 0
            return
        todo, done = msg[2], msg[3]
        if done and trainer.is_global_zero:
            print(f"resuming extraction: {done} of {self.num_samples} samples already in "
                  f"{self.cache.shard_dir(self.key)}", flush=True)
        self.datamodule.indices = todo.tolist() if done else None
        if len(todo) == 0:
            trainer.limit_predict_batches = 0

    def _decide(self) -> tuple:
        """On rank 0: ("wait",), ("error", message), ("hit", key) or ("extract", key, todo, done)."""
        try:
            final = self.cache.path_for(self.key)
            if not self.rebuild and final.exists():  # complete once it exists: no lock needed to read it
                self.entry = open_entry(final)
                _tidy(self.cache, self.key)
                return ("hit", self.key)
            if self.lock is None:
                self.lock = self.cache.lock(self.key)
            try:
                self.lock.acquire(timeout=LOCK_POLL_S)
                self.held = True
            except Timeout:
                return ("wait",)
            except OSError as err:
                raise BenchError(f"cannot lock {self.lock.lock_file}: {err.strerror or err}; the cache folder "
                                 "must be writable to add entries: choose another with cache_dir=...") from err
            shard_dir = self.cache.shard_dir(self.key)
            self.cache.clear_temporaries(self.key)
            if self.rebuild:
                self.cache.remove(self.cache.path_for(self.key), self.key)
                self.cache.remove(shard_dir, self.key)
            if final.exists():  # another run finished it while we waited
                self.entry = open_entry(final)
                self.cache.remove(shard_dir, self.key)
                return ("hit", self.key)
            shard_dir.mkdir(exist_ok=True)
            done = scan_shards(shard_dir, self.key, self.num_samples)
            missing = torch.ones(self.num_samples, dtype=torch.bool)
            missing[done] = False
            return ("extract", self.key, torch.nonzero(missing).flatten(), len(done))
        except BenchError as err:
            return ("error", str(err))

    def release(self) -> None:
        if self.held:
            self.held = False
            self.lock.release()


def _tidy(cache: EmbeddingCache, key: str) -> None:
    """Remove shards and temporaries that a run killed after its merge left next to an entry,
    if no other run holds the lock and the folder is writable; never blocks."""
    if not (cache.shard_dir(key).exists() or any(cache.root.glob(f".tmp-{key}-*"))):
        return
    try:
        with cache.locked(key, timeout=0):
            cache.clear_temporaries(key)
            cache.remove(cache.shard_dir(key), key)
    except (BenchError, Timeout):
        pass


def workers_for(num_workers: int | str, accelerator: str, devices: Any) -> int:
    """DataLoader workers per process. ``auto``: none on the CPU, where workers would compete
    with the model for the same cores; on accelerators, the CPUs per device minus one, at most 8."""
    if num_workers != "auto":
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise BenchError(f"extract.num_workers must be 'auto' or an int >= 0, got {num_workers!r}")
        return num_workers
    if accelerator == "cpu":
        return 0
    count = len(devices) if isinstance(devices, list) else devices if isinstance(devices, int) else 1
    return max(0, min(8, available_cpus() // max(count, 1) - 1))


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): the CUDA allocator's peak on a GPU (since the extraction
    started), else the process's peak resident set size (since the process started)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_max_rss"  # Linux counts KiB


def extraction_stats(device: torch.device, images: int, seconds: float) -> dict[str, Any]:
    """One split's extraction in this run, as run.json records it (rank 0's view: the images of
    every rank over rank 0's wall time, rank 0's peak memory)."""
    memory, kind = peak_memory(device)
    return {"from_cache": False, "images": images, "seconds": round(seconds, 3),
            "images_per_second": round(images / seconds, 2) if images and seconds > 0 else None,
            "peak_memory_bytes": memory, "peak_memory": kind, "device": device_name(device)}


def cached_stats() -> dict[str, Any]:
    """A split served from the cache: nothing was extracted, so nothing was measured."""
    return {"from_cache": True, "images": 0, "seconds": None, "images_per_second": None,
            "peak_memory_bytes": None, "peak_memory": None, "device": None}


def extract(
    backbone: Backbone,
    source: Source,
    cache: EmbeddingCache,
    *,
    trainer_kwargs: dict[str, Any] | None = None,
    batch_size: int = 256,
    num_workers: int | str = 0,
    dtype: str = "float32",
    skip_corrupt: bool = False,
    rebuild: bool = False,
    shard_size: int = 65536,
    callbacks: list | None = None,
    channels_last: bool = False,
    compile: bool = False,
    stats: dict[str, Any] | None = None,
) -> CacheEntry:
    """Return the cache entry for (backbone, source, dtype), extracting what is missing.

    ``stats``, when given, is filled with how the entry was obtained (see :func:`extraction_stats`):
    from the cache, or extracted at some images per second with some peak memory.

    Shards of an interrupted run (same key) are kept: a rerun extracts only the indices they do
    not cover, then merges everything. The merged entry equals an uninterrupted run's. Runs of
    the same key take turns through the key's file lock; a run that waited finds the entry, or
    the shards of a run that died, and goes on from there.
    """
    fields = entry_fields(backbone, source, dtype)
    key = cache_key(fields)
    kwargs = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
              "enable_model_summary": False, **(trainer_kwargs or {})}
    num_workers = workers_for(num_workers, kwargs["accelerator"], kwargs["devices"])
    dm = ImageDataModule(source, backbone.transform, batch_size, num_workers, skip_corrupt,
                         pin_memory=kwargs.get("accelerator") != "cpu" and torch.cuda.is_available())
    dm.allow_zero_length_dataloader_with_multiple_devices = True  # a resumed run may leave a rank nothing
    plan = ExtractionPlan(cache, key, len(source), dm, rebuild)
    writer = ShardWriter(cache.shard_dir(key), key, len(source), shard_size)
    trainer = L.Trainer(callbacks=[plan, writer, *(callbacks or [])], **kwargs)
    if trainer.world_size == 1 and not rebuild:
        # One process needs no agreement: a finished entry is served without the lock, so a
        # read-only cache works.
        entry = cache.lookup(key)
        if entry is not None:
            _tidy(cache, key)
            if stats is not None:
                stats.update(cached_stats())
            return entry

    module = EmbeddingExtractor(backbone.model, dtype, channels_last=channels_last, compile=compile)
    status: tuple[str, str] | None = None
    entry = None
    try:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        clock = time.perf_counter()
        trainer.predict(module, datamodule=dm, return_predictions=False)
        seconds = time.perf_counter() - clock
        if stats is not None:
            todo = dm.indices if dm.indices is not None else range(len(source))
            stats.update(cached_stats() if plan.state == "hit" else
                         extraction_stats(device, len(todo), seconds))
        if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(bool(module.failures), all=False):
            first = module.failures[0] if module.failures else "another process of this run met an undecodable image"
            raise BenchError(f"{first}; fix or remove it, or set extract.skip_corrupt=true (the shards written so far "
                             "are kept, and a rerun extracts only what is missing)")
        trainer.strategy.barrier("bench-extract-written")  # every rank's last shard is on disk
        if trainer.is_global_zero:
            try:
                if plan.state == "extract":
                    if cache_key(entry_fields(backbone, source, dtype)) != key:  # memo hits: only stats
                        cache.remove(cache.shard_dir(key), key)
                        raise BenchError(
                            f"the dataset {source.name} ({source.split}) changed while it was extracted, so "
                            "its embeddings would mix old and new files; nothing was cached. Rerun once the "
                            "files stay put")
                    entry = merge_shards(cache, cache.shard_dir(key), key, fields, len(source),
                                         class_names=source.class_names, world_size=trainer.world_size)
                    cache.remove(cache.shard_dir(key), key)
                else:
                    entry = plan.entry
                status = ("ok", "")
            except Exception as err:
                status = ("error", str(err) if isinstance(err, BenchError) else f"rank 0 failed to merge: {err!r}")
                raise
            finally:
                plan.release()
                if trainer.world_size > 1:  # tell the other ranks, which wait for the merge
                    trainer.strategy.broadcast(status, src=0)
        else:
            status = trainer.strategy.broadcast(status, src=0)
            if not status or status[0] != "ok":
                raise BenchError(status[1] if status else "rank 0 stopped during the merge; rerun to resume")
    finally:
        plan.release()
    entry = entry or open_entry(cache.path_for(key))
    skipped = entry.manifest.get("skipped", [])
    if skipped and trainer.is_global_zero:
        print(f"skipped {len(skipped)} corrupt image(s): dataset indices {skipped[:20]}"
              + (" ..." if len(skipped) > 20 else ""))
    return entry
