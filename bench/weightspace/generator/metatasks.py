"""Meta-training data for the head generator: N-way tasks drawn from the meta-train classes of
embedding sources, each with a trained target head.

A *source* is a space of labelled embeddings made by one backbone:

- ``digits``: scikit-learn's digits through the shipped tiny backbone (cached extraction);
- ``cache:<entry folder>``: any embedding-cache entry (e.g. a zoo backbone's embeddings);
- ``gmm:<family>``: a procedural family of Gaussian-mixture classes. A family plays the part of
  a backbone: its within-class covariance is one anisotropic matrix shared by every class (as a
  backbone's feature geometry is), and its class means spread along other directions. Each
  class id is a mixture of 1-3 modes drawn from the family's seed and the id; each task draws
  its own spread and overlap. Class ids are unbounded, so the family gives volume.

Each source's classes are split into meta-train and meta-test (:class:`ClassSplit`); tasks are
drawn only from meta-train classes, and the split travels with the checkpoint so that the
generator refuses meta-train classes at use time. A task is a pure function of (source,
classes, seed, per-class pool size): its pool is redrawn on demand, so a meta-training set
stores seeds and trained heads, never embeddings.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from bench.errors import BenchError
from bench.runtime import atomic_path, quiet_lightning
from bench.weightspace.generator.target_heads import WEIGHT_DECAYS, canonical_rows, fit_logistic_heads

NORMS = ("l2", "none")
GMM_TEST_OFFSET = 1_000_000  # procedural meta-test class ids start here


def normalize(x: torch.Tensor, norm: str) -> torch.Tensor:
    """The embedding normalisation heads are trained and generated in (NORM_pre = NORM_inf)."""
    if norm == "l2":
        return F.normalize(x.float(), dim=-1)
    if norm == "none":
        return x.float()
    raise BenchError(f"normalisation '{norm}' is not one of {', '.join(NORMS)}")


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from several integers/strings, the same on every machine."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def parse_classes(text: str | Sequence[int]) -> list[int]:
    """``"0-4,7"`` -> [0, 1, 2, 3, 4, 7]; a list passes through (sorted, unique)."""
    if not isinstance(text, str):
        return sorted({int(c) for c in text})
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            out.update(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError:
            raise BenchError(f"class list '{text}': '{part}' is not an int or a range like 0-4") from None
    if not out:
        raise BenchError(f"class list '{text}' is empty")
    return sorted(out)


# ---- sources ---------------------------------------------------------------------------------
class MetaSource:
    """Labelled embeddings of one backbone. ``draw`` returns a task's pool."""

    dataset: str  # what a run's config calls the dataset (leakage is checked per dataset)
    backbone: str  # the backbone's weights sha256 (``Backbone.fingerprint``)
    backbone_name: str
    dim: int
    classes: list[int] | None  # the classes it has; None for an unbounded procedural family

    def draw(self, classes: Sequence[int], per_class: int, generator: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x (n, D), y (n,) class ids, index (n,) sample ids) for ``per_class`` samples of
        each class, in class order."""
        raise NotImplementedError

    def class_size(self, c: int) -> int:
        return 1 << 30

    def info(self) -> dict:
        return {"dataset": self.dataset, "backbone": self.backbone, "backbone_name": self.backbone_name,
                "dim": self.dim}


class CachedSource(MetaSource):
    """Embeddings from the embedding cache (or any tensors with a backbone fingerprint)."""

    def __init__(self, embeddings: torch.Tensor, labels: torch.Tensor, dataset: str, backbone: str,
                 backbone_name: str) -> None:
        self.embeddings = embeddings.float()
        self.labels = labels.long()
        self.dataset, self.backbone, self.backbone_name = dataset, backbone, backbone_name
        self.dim = int(embeddings.shape[1])
        self.classes = sorted(set(self.labels.tolist()))
        self._by_class = {c: (self.labels == c).nonzero()[:, 0] for c in self.classes}

    @classmethod
    def from_entry(cls, entry) -> CachedSource:
        fields = entry.manifest["fields"]
        return cls(torch.as_tensor(entry.embeddings), torch.as_tensor(entry.labels), str(fields["dataset"]),
                   str(fields["weights_sha256"]), str(fields["backbone"]))

    def class_size(self, c: int) -> int:
        return len(self._by_class.get(int(c), ()))

    def draw(self, classes, per_class, generator):
        idx = []
        for c in classes:
            pool = self._by_class.get(int(c))
            if pool is None:
                raise BenchError(f"class {c} is not in {self.dataset} ({self.backbone_name}); it has {self.classes}")
            if per_class > len(pool):
                raise BenchError(f"class {c} of {self.dataset} has {len(pool)} samples, {per_class} were asked for")
            idx.append(pool[torch.randperm(len(pool), generator=generator)[:per_class]])
        index = torch.cat(idx)
        return self.embeddings[index], self.labels[index], index


@dataclass(frozen=True)
class GaussianFamily(MetaSource):
    """A procedural embedding family (see the module docstring). Everything about a class is a
    function of (family seed, class id); everything about a task of the task's generator."""

    name: str
    dim: int = 64
    seed: int = 0
    noise_decay: float = 1.0  # within-class variance of basis direction j ~ (j + 1) ** -noise_decay
    signal: float = 0.5  # class-mean spread relative to the within-class noise
    relu: bool = False  # rectify, as post-ReLU backbone features are
    max_modes: int = 3
    spread_range: tuple[float, float] = (0.7, 1.4)  # task-level noise scale
    overlap_range: tuple[float, float] = (0.6, 1.4)  # task-level class-mean scale
    _params: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(mix_seed("gmm-family", self.seed))
        basis, _ = torch.linalg.qr(torch.randn(self.dim, self.dim, generator=g))
        noise_var = (torch.arange(self.dim) + 1.0) ** -self.noise_decay
        noise_var = noise_var / noise_var.mean()
        # Class means vary most where the noise is not largest: a permuted spectrum.
        signal_var = noise_var[torch.randperm(self.dim, generator=g)] * self.signal**2
        offset = torch.randn(self.dim, generator=g) * 0.5 + 1.0
        self._params.update(basis=basis, noise_sd=noise_var.sqrt(), signal_sd=signal_var.sqrt(), offset=offset)

    @property
    def dataset(self) -> str:  # type: ignore[override]
        return f"gmm:{self.name}"

    @property
    def backbone_name(self) -> str:  # type: ignore[override]
        return f"gmm-family:{self.name}"

    @property
    def backbone(self) -> str:  # type: ignore[override]
        h = hashlib.sha256(b"bench-gmm-family/1")
        h.update(json.dumps({k: getattr(self, k) for k in ("dim", "seed", "noise_decay", "signal", "relu",
                                                           "max_modes", "spread_range", "overlap_range")},
                            sort_keys=True).encode())
        return h.hexdigest()

    @property
    def classes(self) -> None:  # type: ignore[override]
        return None

    def _class(self, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(mix_seed("gmm-class", self.seed, int(c)))
        sd = self._params["signal_sd"]
        mean = torch.randn(self.dim, generator=g) * sd
        modes = 1 + int(torch.randint(self.max_modes, (1,), generator=g))
        offsets = torch.randn(modes, self.dim, generator=g) * sd * 0.5
        weights = torch.rand(modes, generator=g) + 0.5
        return mean, offsets, weights / weights.sum()

    def draw(self, classes, per_class, generator):
        p = self._params
        lo, hi = self.spread_range
        spread = math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * float(torch.rand(1, generator=generator)))
        lo, hi = self.overlap_range
        scale = math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * float(torch.rand(1, generator=generator)))
        xs = []
        for c in classes:
            mean, offsets, weights = self._class(c)
            mode = torch.multinomial(weights, per_class, replacement=True, generator=generator)
            z = scale * (mean + offsets[mode]) + spread * p["noise_sd"] * torch.randn(per_class, self.dim,
                                                                                     generator=generator)
            xs.append(p["offset"] + z @ p["basis"].T)
        x = torch.cat(xs)
        if self.relu:
            x = x.clamp(min=0)
        y = torch.tensor(list(classes), dtype=torch.long).repeat_interleave(per_class)
        index = y * 0 - 1  # procedural samples have no dataset index
        return x, y, index


# Families by name. ``a`` is the default meta-training family; ``b`` differs in every random
# draw, its spectrum and rectification, for testing on a family the generator never saw.
FAMILIES = {
    "a": dict(seed=1, noise_decay=1.0, relu=False),
    "b": dict(seed=2, noise_decay=0.7, relu=True),
}


def build_meta_source(name: str, *, dim: int = 64, cache_dir: str | Path = ".cache/embeddings") -> MetaSource:
    """``digits`` (tiny backbone), ``cache:<entry folder>`` or ``gmm:<family>``."""
    kind, _, arg = name.partition(":")
    if kind == "digits":
        from bench.backbones import build_backbone
        from bench.data.sources import build_source
        from bench.extract import EmbeddingCache, extract
        quiet_lightning()
        entry = extract(build_backbone("tiny-digits"), build_source("digits", split="all"),
                        EmbeddingCache(cache_dir), trainer_kwargs={"enable_progress_bar": False})
        return CachedSource.from_entry(entry)
    if kind == "cache":
        from bench.extract import open_entry

        return CachedSource.from_entry(open_entry(arg))
    if kind == "gmm":
        if arg not in FAMILIES:
            raise BenchError(f"unknown Gaussian-mixture family '{arg}'; known: {', '.join(FAMILIES)}")
        return GaussianFamily(arg, dim=dim, **FAMILIES[arg])
    raise BenchError(f"unknown meta-task source '{name}'; use digits, cache:<entry folder> or gmm:<family>")


# ---- class splits ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassSplit:
    """Meta-train and meta-test classes of one source; they may not share a class."""

    train: tuple[int, ...]
    test: tuple[int, ...]

    def __post_init__(self) -> None:
        shared = sorted(set(self.train) & set(self.test))
        if shared:
            raise BenchError(f"classes {shared[:20]} are both meta-train and meta-test; meta-test classes "
                             "must never appear in meta-training: remove them from one of the two lists")
        if not self.train:
            raise BenchError("the meta-train class list is empty")

    @classmethod
    def default(cls, source: MetaSource, train: str | Sequence[int] | None = None,
                test: str | Sequence[int] | None = None) -> ClassSplit:
        """Digits: base 0-4 (the tiny backbone's pretraining classes) for meta-training, novel
        5-9 for meta-test. Procedural: ids 0-1999 and 1,000,000-1,000,999. Other caches: the
        first half of the classes and the rest."""
        if source.classes is None:
            tr = parse_classes(train) if train is not None else list(range(2000))
            te = parse_classes(test) if test is not None else list(range(GMM_TEST_OFFSET, GMM_TEST_OFFSET + 1000))
        else:
            half = len(source.classes) // 2
            tr = parse_classes(train) if train is not None else source.classes[:half]
            te = parse_classes(test) if test is not None else sorted(set(source.classes) - set(tr))
            missing = sorted(set(tr) - set(source.classes))
            if missing:
                raise BenchError(f"meta-train classes {missing} are not in {source.dataset}; it has {source.classes}")
        return cls(tuple(tr), tuple(te))


def check_no_leak(sources: Iterable[tuple[dict, ClassSplit]]) -> None:
    """Across every source of one meta-training run: a class that is meta-test anywhere for a
    (dataset, backbone) may not be meta-train anywhere for the same pair."""
    train: dict[tuple[str, str], set[int]] = {}
    test: dict[tuple[str, str], set[int]] = {}
    for info, split in sources:
        key = (info["dataset"], info["backbone"])
        train.setdefault(key, set()).update(split.train)
        test.setdefault(key, set()).update(split.test)
    for key, tr in train.items():
        shared = sorted(tr & test[key])
        if shared:
            raise BenchError(f"classes {shared[:20]} of dataset {key[0]} are meta-test in one source entry and "
                             "meta-train in another; meta-test classes must never appear in meta-training")


# ---- meta-training sets ----------------------------------------------------------------------
@dataclass
class MetaTaskSet:
    """Tasks (classes, seed, pool size per class) with their trained heads as canonical rows."""

    sources: list[dict]  # source info + "meta_train_classes" / "meta_test_classes"
    norm: str
    source_index: torch.Tensor  # (T,) long
    classes: torch.Tensor  # (T, Cmax) long, -1 where a task has fewer classes
    seeds: torch.Tensor  # (T,) long
    per_class: torch.Tensor  # (T,) long
    rows: torch.Tensor  # (T, Cmax, D + 1) canonical head rows (target_heads.canonical_rows)
    scale: torch.Tensor  # (T,) the scale divided out of each head
    weight_decay: torch.Tensor  # (T,)
    train_accuracy: torch.Tensor  # (T,)

    def __len__(self) -> int:
        return len(self.seeds)

    @property
    def num_classes(self) -> torch.Tensor:
        return (self.classes >= 0).sum(1)

    def task_classes(self, i: int) -> list[int]:
        return [c for c in self.classes[i].tolist() if c >= 0]

    def pool(self, i: int, sources: Sequence[MetaSource]) -> tuple[torch.Tensor, torch.Tensor]:
        """Task ``i``'s pool: normalised embeddings (n, D) and class positions (n,)."""
        x, y, _ = draw_task(sources[int(self.source_index[i])], self.task_classes(i), int(self.seeds[i]),
                            int(self.per_class[i]))
        return normalize(x, self.norm), y

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).contiguous() for k in ("source_index", "classes", "seeds", "per_class", "rows",
                                                           "scale", "weight_decay", "train_accuracy")}

    def save(self, path: str | Path) -> None:
        """One safetensors file (tensors + JSON header), written under a temporary name."""
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file(self.tensors(), str(tmp), metadata={"sources": json.dumps(self.sources), "norm": self.norm,
                                                          "format": "bench-metatasks/1"})

    @classmethod
    def load(cls, path: str | Path) -> MetaTaskSet:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise BenchError(f"meta-task file {path} does not exist")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "bench-metatasks/1":
                raise BenchError(f"{path} is not a meta-task file (format {meta.get('format')!r})")
            t = {k: f.get_tensor(k) for k in f.keys()}
        return cls(json.loads(meta["sources"]), meta["norm"], **t)


def draw_task(source: MetaSource, classes: Sequence[int], seed: int, per_class: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A task's pool (x, class positions, sample index) from its seed; classes sorted."""
    classes = sorted(int(c) for c in classes)
    x, y, index = source.draw(classes, per_class, torch.Generator().manual_seed(int(seed)))
    return x, torch.searchsorted(torch.tensor(classes), y), index


def sample_tasks(source: MetaSource, split: ClassSplit, n_tasks: int, ways: tuple[int, int],
                 per_class: tuple[int, int], seed: int) -> list[tuple[list[int], int, int]]:
    """(classes, task seed, pool size per class) for ``n_tasks`` tasks of meta-train classes."""
    g = torch.Generator().manual_seed(mix_seed("tasks", seed, source.dataset))
    pool = torch.tensor(split.train)
    lo_w, hi_w = ways[0], min(ways[1], len(pool))
    if lo_w < 2 or lo_w > hi_w:
        raise BenchError(f"ways {ways} do not fit {len(pool)} meta-train classes of {source.dataset} (need 2 or more)")
    out = []
    test = set(split.test)
    for _ in range(n_tasks):
        n = int(torch.randint(lo_w, hi_w + 1, (1,), generator=g))
        classes = sorted(pool[torch.randperm(len(pool), generator=g)[:n]].tolist())
        assert not test.intersection(classes)  # ClassSplit guarantees it; a task must never break it
        cap = min([per_class[1], *(source.class_size(c) for c in classes)])
        k = int(torch.randint(min(per_class[0], cap), cap + 1, (1,), generator=g))
        out.append((classes, int(torch.randint(2**62, (1,), generator=g)), k))
    return out


def build_metatasks(
    entries: Sequence[tuple[MetaSource, ClassSplit, int]],
    *,
    ways: tuple[int, int] = (2, 10),
    per_class: tuple[int, int] = (40, 100),
    norm: str = "l2",
    seed: int = 0,
    weight_decays: tuple[float, ...] = WEIGHT_DECAYS,
    chunk: int = 256,
    progress: bool = True,
) -> MetaTaskSet:
    """Draw tasks from each (source, split, number of tasks) and fit their trained heads."""
    from tqdm.auto import tqdm

    if norm not in NORMS:
        raise BenchError(f"normalisation '{norm}' is not one of {', '.join(NORMS)}")
    dims = {s.dim for s, _, _ in entries}
    if len(dims) != 1:
        raise BenchError(f"meta-task sources have different embedding dimensions {sorted(dims)}; one generator "
                         "serves one embedding dimension")
    infos = []
    for src, split, _ in entries:
        info = {**src.info(), "meta_train_classes": list(split.train), "meta_test_classes": list(split.test)}
        if src.classes is not None:
            # Which samples meta-training may read: a digest of their dataset indices.
            idx = torch.cat([src._by_class[c] for c in split.train]).sort().values  # type: ignore[attr-defined]
            info["meta_train_samples_sha256"] = hashlib.sha256(idx.numpy().tobytes()).hexdigest()
        infos.append(info)
    check_no_leak(zip(infos, (s for _, s, _ in entries)))

    tasks = []
    for si, (src, split, n) in enumerate(entries):
        tasks += [(si, *t) for t in sample_tasks(src, split, n, ways, per_class, mix_seed(seed, si))]
    dim = dims.pop()
    T, cmax = len(tasks), max(len(t[1]) for t in tasks)
    out = dict(source_index=torch.tensor([t[0] for t in tasks]), classes=torch.full((T, cmax), -1),
               seeds=torch.tensor([t[2] for t in tasks]), per_class=torch.tensor([t[3] for t in tasks]),
               rows=torch.zeros(T, cmax, dim + 1), scale=torch.zeros(T), weight_decay=torch.zeros(T),
               train_accuracy=torch.zeros(T))
    for i, t in enumerate(tasks):
        out["classes"][i, : len(t[1])] = torch.tensor(t[1])
    # Tasks with the same number of classes are fitted together, ``chunk`` at a time.
    groups = []
    for c in sorted({len(t[1]) for t in tasks}):
        ids = [i for i, t in enumerate(tasks) if len(t[1]) == c]
        groups += [(c, ids[j: j + chunk]) for j in range(0, len(ids), chunk)]
    g = torch.Generator().manual_seed(mix_seed("heads", seed))
    for c, ids in tqdm(groups, desc="trained heads", disable=not progress):
        pools = [draw_task(entries[tasks[i][0]][0], tasks[i][1], tasks[i][2], tasks[i][3]) for i in ids]
        n = max(len(p[1]) for p in pools)
        x = torch.zeros(len(ids), n, dim)
        y = torch.full((len(ids), n), -1)
        for j, (px, py, _) in enumerate(pools):
            x[j, : len(py)], y[j, : len(py)] = normalize(px, norm), py
        fit = fit_logistic_heads(x, y, c, weight_decays=weight_decays, generator=g)
        rows, scale = canonical_rows(fit.weights, fit.bias)
        idx = torch.tensor(ids)
        out["rows"][idx, :c] = rows
        out["scale"][idx] = scale
        out["weight_decay"][idx] = fit.weight_decay
        out["train_accuracy"][idx] = fit.train_accuracy
    return MetaTaskSet(infos, norm, **out)
