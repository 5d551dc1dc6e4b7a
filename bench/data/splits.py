"""A query split must be fit to score against its pool split.

With ``queries: test`` the support is drawn from one split (the pool) and the queries come from
another. Two things make that number wrong while the run still succeeds:

- the pool holds query samples (``train_split=all`` where ``all`` includes the test images, the
  same split twice, or the same images copied into both folders). A query that is also a
  support candidate is scored as seen: all-shot 1-NN gives 100% where the held-out figure is
  92%. Samples are compared by the ids a source gives them (an original index, a resolved
  file path) and by a digest of their stored content, which catches copies under other names.
  Any shared sample is refused: which figure the user meant cannot be guessed.
- the query split has no labels at all (a Hugging Face test split of -1s): nothing could be
  scored, and the run would stop later with a less helpful message.

Two splits of an image folder or a Hugging Face dataset number their classes on their own, so
the same id can name different classes. The query split's labels are matched to the pool's by
class name (:func:`match_classes`): for cached embeddings by ``bench.pipeline.align_query_labels``,
for images by :func:`align_query_source`. The episode data modules refuse splits that name their
classes differently until they are matched.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np

from bench.data.sources import Source
from bench.errors import BenchError

FIX = ("choose splits that are apart (e.g. dataset.train_split=train with dataset.test_split=test), remove the "
       "shared images from one of them, or use queries: holdout to draw queries from the pool split alone")


def check_split_names(dataset: str, train_split: str, test_split: str) -> None:
    """The same split as pool and queries: refused without loading anything (``--dry-run``)."""
    if train_split == test_split:
        raise BenchError(f"dataset.train_split and dataset.test_split of {dataset} are both '{train_split}': its "
                         f"queries would all be support candidates too (the splits share every sample); {FIX}")


def _shared(pool: np.ndarray | None, queries: np.ndarray | None) -> np.ndarray | None:
    """Which queries the pool holds, or None where either side cannot tell."""
    if pool is None or queries is None:
        return None
    return np.isin(queries, pool)


def check_query_split(pool: Source, queries: Source) -> list[str]:
    """Refuse a query split that shares samples with the pool or has no label; return notes
    (what could not be checked)."""
    if len(queries) and queries.unlabelled == len(queries):
        raise BenchError(f"split '{queries.split}' of {queries.name} has no label on any of its {len(queries)} "
                         f"samples (-1 or missing), so its queries cannot be scored; use queries: holdout to set "
                         f"queries apart from the pool split '{pool.split}', or another dataset.test_split")
    by_id = _shared(pool.sample_ids(), queries.sample_ids())
    by_content = _shared(pool.content_digests(), queries.content_digests())
    if by_id is None and by_content is None:
        if pool.name == queries.name and pool.split == queries.split:
            check_split_names(pool.name, pool.split, queries.split)
        return [f"{queries.name} names no sample and digests no content before extraction, so whether the pool "
                f"split '{pool.split}' holds query images of split '{queries.split}' was not checked"]
    shared = np.zeros(len(queries), dtype=bool)
    ways = []
    for way, found in (("sample id", by_id), ("identical content", by_content)):
        if found is not None and found.any():
            shared |= found
            ways.append(way)
    if shared.any():
        first = int(np.flatnonzero(shared)[0])
        raise BenchError(
            f"the pool split '{pool.split}' and the query split '{queries.split}' of {queries.name} share "
            f"{int(shared.sum())} of its {len(queries)} query samples (by {' and by '.join(ways)}; e.g. "
            f"{queries.where(first)}): a query that is also a support candidate is scored as seen, so the accuracy "
            f"would be too high; {FIX}")
    return []


def match_classes(pool_names: Sequence[str], query_names: Sequence[str],
                  labels: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """A query split's labels in the pool's class ids, matched by class name, and the query
    classes the pool lacks. Their samples, like samples without a label, get -1 (no episode
    draws them); nothing is relabelled to another class."""
    for split, names in (("pool", pool_names), ("query", query_names)):
        if len(set(names)) < len(names):  # an entry cached before names had to be unique
            twice = sorted({n for n in names if list(names).count(n) > 1})
            raise BenchError(f"the {split} split names classes {twice} more than once, so its classes cannot be "
                             "matched by name; rebuild its embeddings (extract.rebuild=true)")
    index = {name: i for i, name in enumerate(pool_names)}
    mapping = np.asarray([index.get(name, -1) for name in query_names], dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    out = np.full(len(labels), -1, dtype=np.int64)
    labelled = labels >= 0
    out[labelled] = mapping[labels[labelled]]
    return out, [name for name in query_names if name not in index]


def align_query_source(pool: Source, queries: Source) -> tuple[Source, list[str]]:
    """The query source with its labels in the pool's class ids (see :func:`match_classes`),
    and the query classes the pool lacks. Draw episodes from its labels."""
    if pool.class_names == queries.class_names:
        return queries, []
    labels, dropped = match_classes(pool.class_names, queries.class_names, queries.labels)
    aligned = copy.copy(queries)
    aligned.labels, aligned.class_names = labels, list(pool.class_names)
    return aligned, dropped


def check_same_classes(pool_names: Sequence[str] | None, query_names: Sequence[str] | None) -> None:
    """Refuse a query split whose class ids mean other classes than the pool's."""
    if pool_names and query_names and list(pool_names) != list(query_names):
        raise BenchError("the query split names its classes differently from the pool split, so the same class id "
                         "means another class in each; match them by name first (bench.data.splits."
                         "align_query_source for images, bench.pipeline.align_query_labels for cached embeddings) "
                         "and draw the episode from the matched labels")
