"""Seeded few-shot episodes: which samples are support and which are queries.

An episode depends only on the labels, the class list, shots, queries and seed. Each class
draws from its own ``numpy`` PCG64 stream seeded by ``(seed, class)``, so:

- the same seed gives the same episode on any machine and any number of processes;
- adding or removing a class does not change the samples drawn for the others;
- queries are drawn before support, so for one seed the query set is the same at every
  shot count and shot counts compare on equal footing (support for more shots is a superset);
- ``queries="holdout"`` sets a seeded share of each class apart once (a stream seeded by the
  class alone, not by the episode's seed), so the queries are the same for every episode and
  disjoint from every episode's support: a test split carved from a dataset that has none.
- ``validation`` sets a seeded share (or count) of each class's pool apart per episode, drawn
  from the episode's stream after the queries and before the support (after the held-out part is
  excluded), so it is disjoint from both, the same at every shot count for one seed, and support
  for more shots is still a superset of support for fewer;
- ``shots=0`` draws the queries (and validation) as usual and an empty support;
- ``ways=N`` (:func:`draw_ways`) draws N classes of a subset from a stream seeded by the seed
  alone, so every shot count and every process count sees the same classes for one seed.

Indices are returned sorted, which is the order in which heads see support embeddings
everywhere (single process or gathered across ranks), so heads are identical either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np

from bench.errors import BenchError

Shots = Union[int, str]  # an int >= 0 or "all"
Queries = Union[int, str]  # an int, "rest", "test" or "holdout"
ClassSubset = Union[str, Sequence[int]]


@dataclass(frozen=True)
class Episode:
    classes: tuple[int, ...]
    support: np.ndarray  # sorted indices into the support pool's labels
    query: np.ndarray  # sorted indices into the query pool (same pool, or the test split)
    query_split: str  # "train" (the same pool as the support) or "test"
    shots: Shots
    queries: Queries
    seed: int
    # sorted pool indices set apart to choose settings on, never scored (empty without validation)
    validation: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ways: int | None = None  # N of an N-way episode (classes drawn per episode), None for the whole subset


def check_subset_name(subset: ClassSubset, named: dict[str, Sequence[int]], where: str = "") -> None:
    """A subset given by name must be all, even, odd or one of the suite's class_splits."""
    known = ("all", "even", "odd", *named)
    if isinstance(subset, str) and subset not in known:
        raise BenchError(f"{where}unknown class subset '{subset}'; known: {', '.join(known)}")


def select_classes(
    subset: ClassSubset, available: Sequence[int], named: dict[str, Sequence[int]] | None = None
) -> list[int]:
    """Resolve 'all', 'even', 'odd', a named split (e.g. 'base', 'novel') or an explicit list."""
    avail = sorted(int(c) for c in available)
    named = named or {}
    if isinstance(subset, str):
        if subset == "all":
            chosen = avail
        elif subset == "even":
            chosen = [c for c in avail if c % 2 == 0]
        elif subset == "odd":
            chosen = [c for c in avail if c % 2 == 1]
        else:
            check_subset_name(subset, named)
            chosen = sorted(int(c) for c in named[subset])
    else:
        chosen = sorted(int(c) for c in subset)
    missing = sorted(set(chosen) - set(avail))
    if missing:
        raise BenchError(
            f"classes {missing} of subset '{subset}' do not occur in the labels "
            f"(present: {avail[:20]}{' ...' if len(avail) > 20 else ''})"
        )
    if len(chosen) < 2:
        raise BenchError(f"class subset '{subset}' has {len(chosen)} class(es); an episode needs 2+")
    return chosen


# The holdout split's random stream: seeded by the class only, so every episode sets apart the
# same queries, whatever its seed.
HOLDOUT_STREAM = 0x401D


def holdout_count(n: int, holdout: float | int) -> int:
    """Queries set apart from a class of n pool samples: a share (at least 1) or a count."""
    return max(1, int(round(n * holdout))) if isinstance(holdout, float) else int(holdout)


def split_holdout(candidates: np.ndarray, cls: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(held-out queries, the rest in ascending order) of one class's pool indices: a stream
    seeded by the class alone, so every episode, and the reference statistics, agree on them."""
    stream = np.random.Generator(np.random.PCG64(np.random.SeedSequence([HOLDOUT_STREAM, cls])))
    order = candidates[stream.permutation(len(candidates))]
    return order[:count], np.sort(order[count:])


def holdout_indices(labels: np.ndarray, classes: Sequence[int], holdout: float | int) -> np.ndarray:
    """The pool indices that ``queries: holdout`` sets apart for ``classes``."""
    pool = _by_class(labels, classes)
    parts = [split_holdout(pool[c], c, holdout_count(len(pool[c]), holdout))[0] for c in classes]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


# The N-way class draw's random stream: seeded by (stream, seed) only, never by shots or rank.
WAYS_STREAM = 0x3A75


def draw_ways(classes: Sequence[int], ways: int, seed: int, subset: str = "") -> list[int]:
    """The ``ways`` classes (sorted) of an N-way episode drawn from ``classes`` for ``seed``."""
    classes = sorted(int(c) for c in classes)
    if isinstance(ways, bool) or not isinstance(ways, (int, np.integer)) or not 2 <= ways <= len(classes):
        raise BenchError(f"ways={ways!r} must be an int from 2 to the {len(classes)} classes of subset "
                         f"'{subset}'; lower ways or use a larger subset")
    stream = np.random.Generator(np.random.PCG64(np.random.SeedSequence([WAYS_STREAM, int(seed)])))
    return sorted(classes[i] for i in stream.permutation(len(classes))[:ways])


def validation_count(n: int, validation: float | int | None) -> int:
    """Validation samples set apart from a class of n candidates: a share (at least 1) or a count."""
    if not validation:
        return 0
    return max(1, int(round(n * validation))) if isinstance(validation, float) else int(validation)


def _by_class(labels: np.ndarray, classes: Sequence[int]) -> dict[int, np.ndarray]:
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    out = {}
    for c in classes:
        lo, hi = np.searchsorted(sorted_labels, [c, c + 1])
        out[c] = order[lo:hi]  # ascending indices, since the sort is stable
    return out


def _check_arg(name: str, value, words: tuple[str, ...], least: int = 1) -> None:
    kind = "a positive int" if least == 1 else f"an int >= {least}"
    if isinstance(value, str):
        if value not in words:
            raise BenchError(f"{name}={value!r} must be {kind} or one of {', '.join(words)}")
    elif isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise BenchError(f"{name}={value!r} must be {kind} or one of {', '.join(words)}")


def sample_episode(
    labels: Sequence[int] | np.ndarray,
    classes: Sequence[int],
    shots: Shots,
    queries: Queries,
    seed: int,
    test_labels: Sequence[int] | np.ndarray | None = None,
    holdout: float | int = 0.25,
    names: Sequence[str] | None = None,
    validation: float | int | None = None,
    ways: int | None = None,
) -> Episode:
    """Draw one episode. Never shrinks silently: too few samples is an error listing every
    short class with its count. With ``queries="holdout"``, ``holdout`` is the share (a float
    in (0, 1)) or count (an int) of each class set apart as queries; ``validation`` likewise sets
    a share or count of each class apart as the episode's validation part. ``ways`` only labels
    the episode: the caller draws its classes (:func:`draw_ways`)."""
    _check_arg("shots", shots, ("all",), least=0)
    _check_arg("queries", queries, ("rest", "test", "holdout"))
    if shots == "all" and queries == "rest":
        raise BenchError("shots='all' leaves no samples for queries='rest'; use queries=N or 'test'")
    labels = np.asarray(labels).astype(np.int64, copy=False)
    classes = sorted(int(c) for c in classes)
    pool = _by_class(labels, classes)
    test_pool = None
    if queries == "test":
        if test_labels is None:
            raise BenchError("queries='test' needs a test split, and the dataset provides none; use "
                             "queries: holdout to set seeded queries apart from the pool")
        test_pool = _by_class(np.asarray(test_labels).astype(np.int64, copy=False), classes)

    if queries == "holdout":
        held = {c: holdout_count(len(pool[c]), holdout) for c in classes}
    else:
        held = {c: 0 for c in classes}
    need_q = queries if isinstance(queries, (int, np.integer)) else 0
    need_s = shots if shots != "all" else 1
    valid = {c: validation_count(len(pool[c]) - held[c], validation) for c in classes}
    short = []
    for c in classes:
        label = f"class {c} ({names[c]})" if names is not None and 0 <= c < len(names) else f"class {c}"
        have = len(pool[c])
        need = need_s + need_q + (1 if queries == "rest" else 0) + held[c] + valid[c]
        if have < need:
            short.append(f"{label}: {have} < {need}")
        if test_pool is not None and len(test_pool[c]) == 0:
            short.append(f"{label}: no test samples")
    if short:
        raise BenchError(
            f"not enough samples for shots={shots}, queries={queries}"
            + (f", validation={validation}" if validation else "") + ": "
            + "; ".join(short)
            + (". Lower shots/queries/validation or drop these classes." if validation
               else ". Lower shots/queries or drop these classes.")
        )

    support, query, val = [], [], []
    for c in classes:
        candidates = pool[c]
        if queries == "holdout":
            held_out, candidates = split_holdout(candidates, c, held[c])
            query.append(held_out)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, c])))
        perm = candidates[rng.permutation(len(candidates))]
        if test_pool is not None:
            query.append(test_pool[c])
        elif queries not in ("rest", "holdout"):
            query.append(perm[:need_q])
            perm = perm[need_q:]
        val.append(perm[:valid[c]])
        perm = perm[valid[c]:]
        take = len(perm) if shots == "all" else shots
        support.append(perm[:take])
        if queries == "rest":
            query.append(perm[take:])
    return Episode(
        classes=tuple(classes),
        support=np.sort(np.concatenate(support)).astype(np.int64, copy=False),
        query=np.sort(np.concatenate(query)),
        query_split="test" if test_pool is not None else "train",
        shots=shots,
        queries=queries,
        seed=int(seed),
        validation=np.sort(np.concatenate(val)).astype(np.int64, copy=False),
        ways=None if ways is None else int(ways),
    )
