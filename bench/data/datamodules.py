"""LightningDataModules: images for extraction, cached embeddings for imprinting."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset, get_worker_info

from bench.data.episodes import Episode
from bench.data.sources import CorruptImage, Source
from bench.data.splits import check_same_classes
from bench.errors import BenchError


class IndexedImages(Dataset):
    """(image tensor, label, dataset index). A broken image yields None with ``skip_corrupt``;
    with ``report_corrupt`` it yields the error message instead of raising, so that a process
    of a multi-process run can tell the others before stopping (see ``collate_skipping``)."""

    def __init__(self, source: Source, transform: Callable, skip_corrupt: bool = False,
                 report_corrupt: bool = False) -> None:
        self.source, self.transform, self.skip_corrupt = source, transform, skip_corrupt
        self.report_corrupt = report_corrupt

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            image = self.transform(self.source.load(index))
        except CorruptImage as err:
            if self.skip_corrupt or self.report_corrupt:
                return None if self.skip_corrupt else str(err), int(self.source.labels[index]), index
            raise
        return image, int(self.source.labels[index]), index


class StreamedImages(IterableDataset):
    """A streaming source split across ranks and DataLoader workers by stream position:
    slot r of n takes positions r, r + n, ... (n = world size x workers), skipping positions
    already extracted."""

    def __init__(self, source: Any, transform: Callable, rank: int, world_size: int,
                 todo: set[int] | None = None, skip_corrupt: bool = False, report_corrupt: bool = False) -> None:
        self.source, self.transform, self.rank, self.world_size = source, transform, rank, world_size
        self.todo, self.skip_corrupt, self.report_corrupt = todo, skip_corrupt, report_corrupt

    def __iter__(self):
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        slots, slot = self.world_size * workers, self.rank * workers + wid

        def keep(i: int) -> bool:
            return i % slots == slot and (self.todo is None or i in self.todo)

        for index, raw in self.source.iterate(keep):
            label = int(self.source.labels[index])
            try:
                image = self.transform(self.source.decode(raw, index))
            except CorruptImage as err:
                if not (self.skip_corrupt or self.report_corrupt):
                    raise
                image = None if self.skip_corrupt else str(err)
            yield image, label, index


def collate_skipping(batch: list) -> dict[str, Any]:
    """Stack the good samples; report the indices of skipped ones so they can be counted, and
    the messages of undecodable ones (``report_corrupt``)."""
    good = [b for b in batch if isinstance(b[0], torch.Tensor)]
    skipped = torch.tensor([b[2] for b in batch if b[0] is None], dtype=torch.long)
    errors = [b[0] for b in batch if isinstance(b[0], str)]
    if not good:
        return {"images": None, "labels": None, "indices": torch.empty(0, dtype=torch.long), "skipped": skipped,
                "errors": errors}
    return {
        "images": torch.stack([b[0] for b in good]),
        "labels": torch.tensor([b[1] for b in good], dtype=torch.long),
        "indices": torch.tensor([b[2] for b in good], dtype=torch.long),
        "skipped": skipped,
        "errors": errors,
    }


class ImageDataModule(L.LightningDataModule):
    """Serves one source with the backbone's transform, in dataset order, for prediction."""

    def __init__(self, source: Source, transform: Callable, batch_size: int = 256,
                 num_workers: int = 0, skip_corrupt: bool = False, indices: list[int] | None = None,
                 pin_memory: bool = False) -> None:
        super().__init__()
        self.source, self.transform = source, transform
        self.batch_size, self.num_workers, self.skip_corrupt = batch_size, num_workers, skip_corrupt
        self.indices, self.pin_memory = indices, pin_memory

    def predict_dataloader(self) -> DataLoader:
        data: Dataset
        if getattr(self.source, "streaming", False):
            rank = self.trainer.global_rank if self.trainer else 0
            world = self.trainer.world_size if self.trainer else 1
            todo = set(self.indices) if self.indices is not None else None
            data = StreamedImages(self.source, self.transform, rank, world, todo, self.skip_corrupt, True)
        else:
            data = IndexedImages(self.source, self.transform, self.skip_corrupt, report_corrupt=True)
            if self.indices is not None:  # resume: only what earlier runs did not extract
                data = Subset(data, self.indices)
        return DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_skipping,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )


class RankShardSampler(Sampler[int]):
    """Rank r of w takes positions r, r + w, ...: every sample once, no padding.

    Lightning's DistributedSampler pads ranks to equal length with repeated samples, which
    would count some queries twice; imprinting needs each sample exactly once.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


class TensorRows(Dataset):
    def __init__(self, embeddings: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        self.embeddings, self.labels, self.indices = embeddings, labels, indices

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.embeddings[i], self.labels[i], self.indices[i]


class EpisodeDataModule(L.LightningDataModule):
    """Support (``train_dataloader``) and queries (``test_dataloader``) of one episode, read
    from cached embeddings. Use with ``Trainer(use_distributed_sampler=False)``: the module
    shards samples across ranks itself, without duplicates."""

    def __init__(self, pool: Any, queries: Any, episode: Episode, batch_size: int = 1024) -> None:
        super().__init__()
        if episode.query_split == "test" and queries is not None:
            check_same_classes(getattr(pool, "class_names", None), getattr(queries, "class_names", None))
        self.pool, self.queries, self.episode, self.batch_size = pool, queries, episode, batch_size

    def _rows(self, entry: Any, positions: np.ndarray) -> TensorRows:
        pos = torch.as_tensor(positions, dtype=torch.long)
        return TensorRows(entry.embeddings[pos].float(), entry.labels[pos], entry.indices[pos])

    def _loader(self, rows: TensorRows) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        return DataLoader(rows, batch_size=self.batch_size,
                          sampler=RankShardSampler(len(rows), rank, world))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._rows(self.pool, self.episode.support))

    def test_dataloader(self) -> DataLoader:
        entry = self.queries if self.episode.query_split == "test" else self.pool
        return self._loader(self._rows(entry, self.episode.query))


class ImageEpisodeDataModule(L.LightningDataModule):
    """Support and queries of one episode as images, for an ImprintingModule that holds its
    backbone (the end-to-end path, no cache). Batches are (images, labels, dataset indices)."""

    def __init__(self, pool: Source, queries: Source | None, episode: Episode, transform: Callable,
                 batch_size: int = 256, num_workers: int = 0) -> None:
        super().__init__()
        if episode.query_split == "test" and queries is not None:
            check_same_classes(pool.class_names, queries.class_names)
        self.pool, self.queries, self.episode, self.transform = pool, queries, episode, transform
        self.batch_size, self.num_workers = batch_size, num_workers

    def _loader(self, source: Source, positions: np.ndarray) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        data = Subset(IndexedImages(source, self.transform), [int(i) for i in positions])
        return DataLoader(data, batch_size=self.batch_size, num_workers=self.num_workers,
                          sampler=RankShardSampler(len(data), rank, world))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.pool, self.episode.support)

    def test_dataloader(self) -> DataLoader:
        source = self.queries if self.episode.query_split == "test" else self.pool
        if source is None:
            raise BenchError("the episode's queries come from a test split, but no test source was given")
        return self._loader(source, self.episode.query)
