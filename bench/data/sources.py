"""Dataset sources: images, integer labels and class names, without any transform.

Every source knows its labels without decoding an image (episodes are drawn from labels
alone) and describes itself for the cache key. Sources:

- ``digits``: scikit-learn's bundled 8x8 digits (real, offline, 10 classes), split into a
  fixed stratified train/test partition;
- ``imagefolder``: ``root/<class name>/<image>`` on disk;
- ``hf``: a Hugging Face ``datasets`` dataset, from the hub by name, or from disk
  (``load_from_disk`` folders, local ``imagefolder`` folders or parquet files);
- ``tv``: torchvision's datasets (MNIST, FashionMNIST, CIFAR-10/100, SVHN, USPS, Flowers102,
  DTD, Food101, OxfordIIITPet, StanfordCars, FGVCAircraft, ImageNet from a local root).
"""

from __future__ import annotations

import inspect
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from bench.data.hashing import files_digest
from bench.errors import BenchError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


SPLIT_NAMES = {"train", "test", "val", "valid", "validation"}
_HOLDOUT_HINT = ("; use queries: holdout in the task to set seeded queries apart from the pool "
                 "(or queries: rest, or a number per class)")


def _visible_dirs(folder: Path) -> list[Path]:
    """Subfolders, leaving out hidden ones (.ipynb_checkpoints, .git, ...) as torchvision does."""
    return [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]


def _why(err: BaseException) -> str:
    if isinstance(err, Image.DecompressionBombError):
        return (f"{err} It is refused as a possible decompression bomb; if you trust the file, raise "
                "PIL.Image.MAX_IMAGE_PIXELS")
    return str(err)


def label_ids(values: Any, names: list[str] | None, what: str) -> tuple[np.ndarray, list[str]]:
    """Class ids 0..K-1 and class names for a label column.

    With class names (a ClassLabel), the values are the ids, and -1 (a missing label) is an
    error. Otherwise the sorted distinct values (ints of any size or sign, or strings) become
    ids 0..K-1, named by the values, so {0, 3_000_000_000} makes two classes, not three billion.
    """
    arr = np.asarray(values)
    if names:
        ids = arr.astype(np.int64)
        bad = ids[(ids < 0) | (ids >= len(names))]
        if len(bad):
            raise BenchError(f"{what}: {len(bad)} label(s) outside the {len(names)} class names (e.g. {int(bad[0])}; "
                             "-1 marks an unlabelled sample); keep only labelled samples")
        return ids, list(names)
    if arr.dtype.kind not in "iuUSO" or (arr.dtype.kind == "O" and not all(isinstance(v, (str, int)) for v in arr)):
        raise BenchError(f"{what}: labels must be ints or strings, got {arr.dtype}")
    distinct, ids = np.unique(arr.astype(str) if arr.dtype.kind == "O" else arr, return_inverse=True)
    return ids.astype(np.int64), [str(v) for v in distinct.tolist()]


class CorruptImage(BenchError):
    """An image that cannot be decoded (the message names the file and index)."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


@dataclass
class Source:
    """Base: subclasses fill ``labels`` and ``class_names`` and implement ``load``."""

    name: str
    split: str
    labels: np.ndarray = field(repr=False)
    class_names: list[str] = field(repr=False)

    notes = ()  # what the user should know about how the source read the data (not a field)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def key_fields(self) -> dict[str, Any]:
        return {"dataset": self.name, "split": self.split, "num_samples": len(self)}


class DigitsSource(Source):
    """sklearn's digits: 1797 grey 8x8 images. ``split``: 'train' (2/3) or 'test' (1/3),
    stratified with a fixed seed so that every machine sees the same partition."""

    def __init__(self, split: str = "train") -> None:
        from sklearn.datasets import load_digits

        if split not in ("train", "test", "all"):
            raise BenchError(f"digits split '{split}' is not one of train, test, all")
        data = load_digits()
        images = (data.images * (255.0 / 16.0)).round().astype(np.uint8)
        target = data.target.astype(np.int64)
        rng = np.random.Generator(np.random.PCG64(1234))
        is_test = np.zeros(len(target), dtype=bool)
        for c in range(10):
            idx = np.flatnonzero(target == c)
            is_test[rng.permutation(idx)[: len(idx) // 3]] = True
        keep = np.ones_like(is_test) if split == "all" else (is_test if split == "test" else ~is_test)
        self.images = images[keep]
        super().__init__("digits", split, target[keep], [str(c) for c in range(10)])

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index], mode="L")


class ImageFolderSource(Source):
    """``root/<class>/<file>``: classes are the sorted subfolder names."""

    def __init__(self, root: str | Path, split: str = "train") -> None:
        base = Path(root)
        if not base.is_dir():
            raise BenchError(f"image folder {base} does not exist")
        splits = sorted(p.name for p in _visible_dirs(base) if p.name in SPLIT_NAMES)
        if splits:  # root/<split>/<class>/<image>
            if split not in splits:
                raise BenchError(f"image folder {base} has split folders {splits} but no '{split}'"
                                 + (_HOLDOUT_HINT if split != "train" else ""))
            self.root = base / split
        elif split == "train":  # root/<class>/<image>: the whole folder is one split
            self.root = base
        else:
            raise BenchError(f"image folder {base} holds class folders directly (root/<class>/<image>), so it has "
                             f"no '{split}' split{_HOLDOUT_HINT}")
        files, labels, classes, notes = [], [], [], []
        for folder in sorted(_visible_dirs(self.root), key=lambda p: p.name):
            images = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not images:  # a class with nothing to embed: said, not silently dropped
                notes.append(f"class folder '{folder.name}' of {self.root} holds no images; it is not a "
                                  f"class of split '{split}'")
                continue
            files += images
            labels += [len(classes)] * len(images)
            classes.append(folder.name)
        if not classes:
            raise BenchError(f"image folder {self.root} has no class subfolders with images "
                             f"(root/<class>/<image>, images: {', '.join(sorted(IMAGE_SUFFIXES))})")
        self.files = files
        super().__init__(f"imagefolder:{self.root.resolve()}", split, np.asarray(labels, np.int64), classes)
        self.notes = tuple(notes)

    def load(self, index: int) -> Image.Image:
        path = self.files[index]
        try:
            with Image.open(path) as img:
                img.load()
                return img.copy()
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
            raise CorruptImage(f"cannot decode image {path} (index {index}): {_why(err)}", index) from err

    def key_fields(self) -> dict[str, Any]:
        # Every file's bytes, not its name and size: an image replaced by another of the same
        # size must be a new key. Digests are memoised by path and stat, so a re-run reads no
        # image again (bench.data.hashing says where the memo lives).
        return {**super().key_fields(), "files_digest": files_digest(self.files, self.root)}


class HFSource(Source):
    """A Hugging Face dataset. ``path`` is a hub name, a ``save_to_disk`` folder, a local
    image folder or parquet file(s). ``image_key`` / ``label_key`` name the columns."""

    def __init__(
        self,
        path: str,
        split: str = "train",
        image_key: str = "image",
        label_key: str = "label",
        revision: str | None = None,
    ) -> None:
        import datasets

        p = Path(path)
        try:
            if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
                ds = datasets.load_from_disk(str(p))
                if isinstance(ds, datasets.DatasetDict):
                    ds = self._pick_split(ds, split, path)
                elif split != "train":
                    raise BenchError(f"Hugging Face dataset {path} was saved without splits, so it has no "
                                     f"'{split}' split (it serves as 'train'){_HOLDOUT_HINT}")
            elif p.is_dir():
                ds = datasets.load_dataset("imagefolder", data_dir=str(p), split=split)
            elif p.suffix == ".parquet" or "*" in path:
                ds = datasets.load_dataset("parquet", data_files={split: split_files(path, split)}, split=split)
            else:
                ds = datasets.load_dataset(path, split=split, revision=revision)
        except FileNotFoundError as err:
            raise BenchError(f"Hugging Face dataset '{path}' not found: {err}") from err
        except ValueError as err:
            raise BenchError(f"cannot load split '{split}' of Hugging Face dataset '{path}': {err}") from err
        except ConnectionError as err:
            raise BenchError(
                f"Hugging Face dataset '{path}' needs the network ({err}); use a local copy "
                "(save_to_disk folder, image folder or parquet file)"
            ) from err
        for key in (image_key, label_key):
            if key not in ds.column_names:
                raise BenchError(
                    f"Hugging Face dataset '{path}' has no column '{key}'; columns: {ds.column_names}"
                )
        labels, names = label_ids(ds[label_key], list(getattr(ds.features[label_key], "names", None) or []),
                                  f"column '{label_key}' of Hugging Face dataset {path} ({split})")
        self.ds = ds
        self.image_key = image_key
        super().__init__(f"hf:{path}", split, labels, names)
        self._fingerprint = getattr(ds, "_fingerprint", "")

    @staticmethod
    def _pick_split(dsd, split: str, path: str):
        if split not in dsd:
            raise BenchError(f"{path} has no split '{split}'; splits: {list(dsd)}")
        return dsd[split]

    def load(self, index: int) -> Image.Image:
        try:
            img = self.ds[int(index)][self.image_key]
            if isinstance(img, dict) and "bytes" in img:
                img = Image.open(io.BytesIO(img["bytes"]))
            if not isinstance(img, Image.Image):
                img = Image.fromarray(np.asarray(img))
            img.load()
            return img
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
            raise CorruptImage(f"cannot decode image at index {index} of {self.name}: {_why(err)}", index) from err

    def key_fields(self) -> dict[str, Any]:
        return {**super().key_fields(), "hf_fingerprint": self._fingerprint}


# torchvision datasets: how each names its splits and where it keeps its labels.
TV_DATASETS: dict[str, dict[str, Any]] = {
    "MNIST": {"split": "train_flag", "labels": "targets"},
    "FashionMNIST": {"split": "train_flag", "labels": "targets"},
    "KMNIST": {"split": "train_flag", "labels": "targets"},
    "CIFAR10": {"split": "train_flag", "labels": "targets"},
    "CIFAR100": {"split": "train_flag", "labels": "targets"},
    "USPS": {"split": "train_flag", "labels": "targets"},
    "SVHN": {"split": {"train": "train", "test": "test"}, "labels": "labels"},
    "Flowers102": {"split": {"train": "train", "val": "val", "test": "test"}, "labels": "_labels"},
    "DTD": {"split": {"train": "train", "val": "val", "test": "test"}, "labels": "_labels"},
    "Food101": {"split": {"train": "train", "test": "test"}, "labels": "_labels"},
    "OxfordIIITPet": {"split": {"train": "trainval", "test": "test"}, "labels": "_labels"},
    "StanfordCars": {"split": {"train": "train", "test": "test"}, "labels": "_samples"},
    "FGVCAircraft": {"split": {"train": "trainval", "val": "val", "test": "test"}, "labels": "_labels"},
    "ImageNet": {"split": {"train": "train", "test": "val", "val": "val"}, "labels": "targets"},
}


class HFStreamingSource(Source):
    """A Hugging Face dataset read as a stream (``hf:<name or files>`` with ``streaming: true``),
    for datasets larger than disk or memory.

    Labels come from one streaming pass over the label column only; images are decoded only by
    the process (and DataLoader worker) that embeds them. There is no random access: extraction
    walks the stream in order, and each rank takes every world_size-th sample.
    """

    streaming = True

    def __init__(self, path: str, split: str = "train", image_key: str = "image", label_key: str = "label",
                 revision: str | None = None) -> None:
        import datasets

        p = Path(path)
        try:
            if p.suffix == ".parquet" or "*" in path:
                ds = datasets.load_dataset("parquet", data_files={split: split_files(path, split)}, split=split,
                                           streaming=True)
            elif p.is_dir():
                ds = datasets.load_dataset("imagefolder", data_dir=str(p), split=split, streaming=True)
            else:
                ds = datasets.load_dataset(path, split=split, revision=revision, streaming=True)
        except (FileNotFoundError, ValueError, ConnectionError) as err:
            raise BenchError(f"cannot stream split '{split}' of Hugging Face dataset '{path}': {err}") from err
        features = ds.features or {}
        for key in (image_key, label_key):
            if features and key not in features:
                raise BenchError(f"Hugging Face dataset '{path}' has no column '{key}'; columns: {list(features)}")
        labels, names = label_ids([ex[label_key] for ex in ds.select_columns([label_key])],
                                  list(getattr(features.get(label_key), "names", None) or []),
                                  f"column '{label_key}' of Hugging Face dataset {path} ({split})")
        self.stream = ds.cast_column(image_key, datasets.Image(decode=False))
        self.image_key, self.path, self.revision = image_key, path, revision
        super().__init__(f"hf-stream:{path}", split, labels, names)

    def iterate(self, keep) -> Iterator[tuple[int, Any]]:
        """(index, undecoded image) for the stream positions where ``keep(index)`` is true."""
        for i, ex in enumerate(self.stream):
            if keep(i):
                yield i, ex[self.image_key]

    def decode(self, value: Any, index: int) -> Image.Image:
        try:
            if isinstance(value, dict):
                img = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
            else:
                img = value
            img.load()
            return img
        except (OSError, UnidentifiedImageError, ValueError, KeyError, Image.DecompressionBombError) as err:
            raise CorruptImage(f"cannot decode image at stream position {index} of {self.name}: {_why(err)}",
                               index) from err

    def load(self, index: int) -> Image.Image:
        raise BenchError(f"{self.name} is a stream without random access; iterate it instead")

    def key_fields(self) -> dict[str, Any]:
        return {**super().key_fields(), "revision": self.revision}


class TorchvisionSource(Source):
    """A torchvision dataset by class name (``tv:CIFAR10``), read from ``root``.

    ``download`` fetches it when there is a network; without one, point ``root`` at a local
    copy in torchvision's layout. ImageNet is never downloaded (torchvision needs the archives).
    """

    def __init__(self, name: str, split: str = "train", root: str = "~/.cache/bench/datasets",
                 download: bool = False) -> None:
        import torchvision

        if name not in TV_DATASETS:
            raise BenchError(f"unknown torchvision dataset '{name}'; known: {', '.join(TV_DATASETS)}")
        info = TV_DATASETS[name]
        kwargs: dict[str, Any] = {"root": str(Path(root).expanduser())}
        if info["split"] == "train_flag":
            if split not in ("train", "test"):
                raise BenchError(f"tv:{name} has splits train and test, not '{split}'")
            kwargs["train"] = split == "train"
        else:
            if split not in info["split"]:
                raise BenchError(f"tv:{name} has splits {list(info['split'])}, not '{split}'")
            kwargs["split"] = info["split"][split]
        if name != "ImageNet":
            kwargs["download"] = download
        try:
            self.ds = getattr(torchvision.datasets, name)(**kwargs)
        except (RuntimeError, FileNotFoundError) as err:
            raise BenchError(
                f"tv:{name} ({split}) is not under {kwargs['root']}: {err}. Pass dataset.options.download=true "
                "with a network, or dataset.options.root=<folder holding a local copy>"
            ) from err
        raw = getattr(self.ds, info["labels"])
        if info["labels"] == "_samples":
            raw = [label for _, label in raw]
        labels = np.asarray(raw.tolist() if hasattr(raw, "tolist") else list(raw), dtype=np.int64)
        classes = getattr(self.ds, "classes", None) or [str(c) for c in range(int(labels.max()) + 1)]
        classes = [c if isinstance(c, str) else c[0] for c in classes]
        super().__init__(f"tv:{name}", split, labels, list(classes))

    def load(self, index: int) -> Image.Image:
        try:
            img = self.ds[int(index)][0]
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
            raise CorruptImage(f"cannot decode image at index {index} of {self.name}: {_why(err)}", index) from err
        return img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))


class SyntheticSource(Source):
    """``synthetic:<n>``: n random RGB images made on the fly from their index (nothing stored),
    for throughput and memory measurements at any dataset size."""

    def __init__(self, n: str | int, split: str = "train", size: int = 64, classes: int = 10) -> None:
        self.size = int(size)
        n = int(n)
        super().__init__(f"synthetic:{n}", split, np.arange(n, dtype=np.int64) % classes,
                         [str(c) for c in range(classes)])

    def load(self, index: int) -> Image.Image:
        rng = np.random.default_rng(int(index) + (0 if self.split == "train" else 1 << 40))
        return Image.fromarray(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8))

    def key_fields(self) -> dict[str, Any]:
        return {**super().key_fields(), "size": self.size}


_SOURCES: dict[str, Callable[..., Source]] = {
    "digits": DigitsSource,
    "imagefolder": ImageFolderSource,
    "hf": HFSource,
    "tv": TorchvisionSource,
    "synthetic": SyntheticSource,
}


def known_sources() -> list[str]:
    return ["digits", "imagefolder:<root>", "hf:<name or path>", "tv:<torchvision dataset>"]


def split_files(path: str, split: str) -> str:
    """Parquet files of one split: ``{split}`` in the path names them; a path without it is one
    split only ('train'), so asking it for another split cannot silently reuse the same files."""
    if "{split}" in path:
        return path.replace("{split}", split)
    if split != "train":
        raise BenchError(f"parquet files {path} are one split ('train'), so there is no '{split}' split; write the "
                         f"path with {{split}} (e.g. /data/{{split}}-*.parquet) for split files{_HOLDOUT_HINT}")
    return path


def check_dataset_name(name: str) -> tuple[str, str]:
    """(family, argument) of a dataset name, or a clear error."""
    family, _, arg = name.partition(":")
    if family not in _SOURCES:
        raise BenchError(f"unknown dataset '{name}'; known: {', '.join(known_sources())}")
    if family != "digits" and not arg:
        raise BenchError(f"dataset '{name}' needs a path or name after the colon, e.g. {family}:/data/x")
    return family, arg


def build_source(name: str, split: str = "train", **options: Any) -> Source:
    """``digits``, ``imagefolder:<root>``, ``hf:<name or path>``, ``tv:<Name>`` or ``synthetic:<n>``."""
    family, arg = check_dataset_name(name)
    factory = HFStreamingSource if family == "hf" and options.get("streaming") else _SOURCES[family]
    options = {k: v for k, v in options.items() if not (family == "hf" and k == "streaming")}
    params = list(inspect.signature(factory.__init__).parameters)[1:]  # after self
    accepted = [p for p in (params if family == "digits" else params[1:]) if p != "split"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise BenchError(f"dataset.options {unknown} do not apply to {family} datasets; "
                         f"they accept: {', '.join(accepted + (['streaming'] if family == 'hf' else [])) or 'none'}")
    if family == "digits":
        return DigitsSource(split, **options)
    return factory(arg, split=split, **options)
