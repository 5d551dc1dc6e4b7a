"""Dataset sources: images, integer labels and class names, without any transform.

Every source knows its labels without decoding an image (episodes are drawn from labels
alone) and describes itself for the cache key. A source is one class and one decorator, as
GEN/NORM/AGG methods and backbone families are::

    @register_source("stripes", form="stripes:<n>", summary="grey stripes, one width per class")
    class Stripes(Source):
        def __init__(self, n: str, split: str = "train", size: int = 8) -> None:
            super().__init__(f"stripes:{n}", split, labels, class_names)

        def load(self, index: int) -> Image.Image: ...

A dataset name is ``family`` or ``family:arg``. The class's ``__init__`` says what the registry
needs: its first parameter takes ``arg`` (a source without one, like ``digits``, starts with
``split``), and its other keyword parameters are the options ``dataset.options`` may set. So
a source registered from a plugin (the run config's ``plugins``) is known to errors,
``--dry-run`` and runs alike. Built in:

- ``digits``: scikit-learn's bundled 8x8 digits (real, offline, 10 classes), split into a
  fixed stratified train/test partition;
- ``imagefolder``: ``root/<class name>/<image>`` on disk;
- ``hf``: a Hugging Face ``datasets`` dataset, from the hub by name, or from disk
  (``load_from_disk`` folders, local ``imagefolder`` folders or parquet files);
- ``tv``: torchvision's datasets (MNIST, FashionMNIST, CIFAR-10/100, SVHN, USPS, Flowers102,
  DTD, Food101, OxfordIIITPet, StanfordCars, FGVCAircraft, ImageNet from a local root);
- ``synthetic``: random images made from their index, for throughput measurements.

Labels: class ids 0..K-1 index ``class_names``, which are unique (two splits are matched by
class name); -1 marks a sample without a label, which no episode draws. A source may name its
samples (``sample_ids``) and digest their content (``content_digests``), so that a pool split
that holds the query split is refused (``bench.data.splits``).
"""

from __future__ import annotations

import inspect
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from bench.data.hashing import (
    array_digest,
    bytes_digests,
    combine_file_digests,
    file_digests,
    hex_to_sample_digests,
    labels_digest,
    memoised_sample_digests,
)
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
    """Class ids 0..K-1 (-1: no label) and class names for a label column.

    With class names (a ClassLabel), the values are the ids; -1 or a missing value is a sample
    without a label (the datasets convention), any other id outside the names is an error.
    Otherwise each distinct value (ints of any size, or strings) is a class, numbered in sorted
    order and named by its value, so {0, 3_000_000_000} makes two classes, not three billion;
    -1 and missing values are samples without a label. What cannot be read as one class per
    sample is refused rather than guessed: floats, bools, lists (multi-label), other negative ints,
    ints mixed with strings.
    """
    # A plain list keeps its Python types (numpy would turn [0, "a"] into two strings).
    arr = np.asarray(values, dtype=object) if isinstance(values, list) else np.asarray(values)
    if arr.ndim != 1 or (arr.dtype.kind == "O" and any(isinstance(v, (list, tuple, dict, np.ndarray)) for v in arr)):
        raise BenchError(f"{what}: needs one label per sample (a class id or name), but holds lists of labels "
                         "(a multi-label column); pick a single-label column with dataset.options.label_key")
    if arr.dtype.kind == "O":
        missing = np.fromiter((v is None for v in arr), dtype=bool, count=len(arr))
        present = [v for v in arr[~missing]]
        kinds = {"str" if isinstance(v, str) else "int" if isinstance(v, (int, np.integer)) and not isinstance(
            v, (bool, np.bool_)) else type(v).__name__ for v in present}
    else:
        missing = np.zeros(len(arr), dtype=bool)
        present = arr
        kinds = {"int"} if arr.dtype.kind in "iu" else {"str"} if arr.dtype.kind in "US" else {arr.dtype.name}
    if len(kinds) > 1 or kinds - {"int", "str"}:
        got = " and ".join(sorted(kinds))
        raise BenchError(f"{what}: labels must be ints or strings, one kind per column; got {got}")
    ids = np.full(len(arr), -1, dtype=np.int64)
    if names:
        known = np.asarray([int(v) for v in present], dtype=np.int64) if arr.dtype.kind == "O" else \
            present.astype(np.int64)
        bad = known[(known < -1) | (known >= len(names))]
        if len(bad):
            raise BenchError(f"{what}: {len(bad)} label(s) outside the {len(names)} class names (e.g. {int(bad[0])}; "
                             "-1 marks a sample without a label); fix the labels or the column's class names")
        ids[~missing] = known
        return ids, list(names)
    if kinds == {"int"}:
        # Python ints in an object column may exceed int64; they sort as numbers all the same.
        ints = np.asarray([int(v) for v in present], dtype=object) if arr.dtype.kind == "O" else present
        negative = ints < -1
        if negative.any():
            raise BenchError(f"{what}: negative label(s) {sorted(set(ints[negative].tolist()))[:5]}: only -1 means "
                             "'no label', so these are neither a class nor a missing label for sure; map them to "
                             "class ids >= 0, or to -1")
        labelled = ints != -1
        distinct, inverse = (np.unique(ints[labelled], return_inverse=True) if arr.dtype.kind != "O" else
                             _unique_objects(ints[labelled].tolist()))
        ids[np.flatnonzero(~missing)[labelled]] = inverse
        return ids, [str(v) for v in distinct]
    text = [v.decode() if isinstance(v, bytes) else str(v) for v in present]
    distinct, inverse = _unique_objects(text)
    ids[~missing] = inverse
    return ids, distinct


def _unique_objects(values: list) -> tuple[list, np.ndarray]:
    """np.unique for values numpy cannot hold in a typed array (ints beyond int64, strings)."""
    distinct = sorted(set(values))
    index = {v: i for i, v in enumerate(distinct)}
    return distinct, np.fromiter((index[v] for v in values), dtype=np.int64, count=len(values))


class CorruptImage(BenchError):
    """An image that cannot be decoded (the message names the file and index)."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


@dataclass
class Source:
    """Base: subclasses pass their name, split, labels and class names and implement ``load``.

    The labels are checked here, for every source: one int per sample, ids 0..K-1 into unique
    class names, or -1 for a sample without a label (counted in ``notes``).
    """

    name: str
    split: str
    labels: np.ndarray = field(repr=False)
    class_names: list[str] = field(repr=False)
    # what the user should know about how the source read the data; printed and in run.json
    notes: list[str] = field(default_factory=list, repr=False)
    # True where class ids number the dataset's own label values (strings, sparse ints): the
    # mapping is then printed, since a task's class ids refer to it
    renumbered = False

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels)
        where = f"{self.name} ({self.split})"
        if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
            raise BenchError(f"labels of {where} must be one int class id per sample, got {labels.dtype} "
                             f"of shape {labels.shape}")
        self.labels = labels.astype(np.int64, copy=False)
        self.class_names = [str(n) for n in self.class_names]
        bad = self.labels[(self.labels < -1) | (self.labels >= len(self.class_names))]
        if len(bad):
            raise BenchError(f"{len(bad)} label(s) of {where} outside class ids 0..{len(self.class_names) - 1} "
                             f"(e.g. {int(bad[0])}); -1 marks a sample without a label")
        twice = [n for n, c in Counter(self.class_names).items() if c > 1]
        if twice:
            ids = [i for i, n in enumerate(self.class_names) if n == twice[0]]
            raise BenchError(f"{where} names class '{twice[0]}' twice (ids {ids}): class names must be unique, "
                             "since two splits are matched by class name")
        if self.unlabelled:
            self.notes.append(f"{self.unlabelled} of {len(self)} samples of {where} have no label (-1 or missing); "
                              "they are left out of every episode")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def unlabelled(self) -> int:
        return int((self.labels < 0).sum())

    def load(self, index: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def key_fields(self) -> dict[str, Any]:
        """What the cache key holds about the data. A source whose images can change under the
        same name should add a digest of their content (as image folders do)."""
        return {"dataset": self.name, "split": self.split, "num_samples": len(self),
                "labels": labels_digest(self.labels, self.class_names)}

    def sample_ids(self) -> np.ndarray | None:
        """Names of the samples that two splits of this dataset share when they hold the same
        sample (an original index, a resolved file path), or None."""
        return None

    def content_digests(self) -> np.ndarray | None:
        """A 64-bit digest of each sample's stored content (uint64), or None where reading it
        is not cheap enough to do before extraction."""
        return None

    def where(self, index: int) -> str:
        """A sample, as a message names it."""
        return f"index {index}"


# -- the registry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceKind:
    name: str
    factory: Callable[..., Source]
    form: str  # how a dataset of this kind is written, e.g. imagefolder:<root>
    summary: str

    def _params(self) -> list[inspect.Parameter]:
        return [p for p in inspect.signature(self.factory).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)]

    @property
    def takes_arg(self) -> bool:
        """Whether names of this kind carry an argument after the colon (a path, a name, a size)."""
        params = self._params()
        return bool(params) and params[0].name != "split"

    @property
    def options(self) -> tuple[str, ...]:
        """The options ``dataset.options`` may set: the keyword parameters after the argument."""
        params = self._params()[1 if self.takes_arg else 0:]
        return tuple(p.name for p in params if p.name != "split" and p.kind != p.POSITIONAL_ONLY)


SOURCES: dict[str, SourceKind] = {}


def register_source(name: str, *, form: str | None = None, summary: str = "") -> Callable[[Callable], Callable]:
    """Register a :class:`Source` subclass (or a function that returns a Source) as the dataset
    kind ``name``. Its ``__init__`` takes the name's argument first (unless the kind has none),
    then ``split``, then its options. ``form`` shows how names are written (default: ``name``,
    or ``name:<arg>`` after the argument's parameter)."""
    if not name or any(c in name for c in ":/, "):
        raise BenchError(f"dataset source name {name!r} must be non-empty and free of : / , and spaces")

    def deco(factory: Callable) -> Callable:
        old = SOURCES.get(name)
        # A plugin file imported again (each run stage loads the plugins) registers the same class.
        if old is not None and (old.factory.__module__, old.factory.__qualname__) != (
                factory.__module__, factory.__qualname__):
            raise BenchError(f"dataset source '{name}' is already registered by {old.factory.__module__}")
        params = inspect.signature(factory).parameters
        if "split" not in params:
            raise BenchError(f"dataset source '{name}': {factory.__qualname__} must take a 'split' parameter "
                             "(train, test, ...), after the name's argument if it has one")
        first = next(iter(params))
        SOURCES[name] = SourceKind(name, factory, form or (name if first == "split" else f"{name}:<{first}>"),
                                   summary)
        return factory

    return deco


def known_sources() -> list[str]:
    """How each registered kind's dataset names are written."""
    return [kind.form for kind in SOURCES.values()]


def check_dataset_name(name: str) -> tuple[SourceKind, str]:
    """(kind, argument) of a dataset name, or a clear error."""
    family, colon, arg = name.partition(":")
    kind = SOURCES.get(family)
    if kind is None:
        raise BenchError(f"unknown dataset '{name}'; known: {', '.join(known_sources())} (a plugin in `plugins` "
                         "may register more)")
    if kind.takes_arg and not arg:
        raise BenchError(f"dataset '{name}' needs an argument after the colon: {kind.form}")
    if not kind.takes_arg and colon:
        raise BenchError(f"dataset '{name}' takes nothing after its name: write {kind.form}")
    return kind, arg


def check_source(name: str, options: dict[str, Any]) -> tuple[SourceKind, str]:
    """:func:`check_dataset_name`, and the options the kind takes, without loading anything."""
    kind, arg = check_dataset_name(name)
    unknown = sorted(set(options) - set(kind.options))
    if unknown:
        raise BenchError(f"dataset.options {unknown} do not apply to {kind.name} datasets; "
                         f"they accept: {', '.join(kind.options) or 'none'}")
    return kind, arg


def build_source(name: str, split: str = "train", **options: Any) -> Source:
    """A source by dataset name (see :func:`known_sources`), e.g. ``imagefolder:/data/x``."""
    kind, arg = check_source(name, options)
    source = kind.factory(arg, split=split, **options) if kind.takes_arg else kind.factory(split=split, **options)
    if not isinstance(source, Source):
        raise BenchError(f"dataset source '{kind.name}' returned {type(source).__name__}, not a Source")
    return source


def split_files(path: str, split: str) -> str:
    """Parquet files of one split: ``{split}`` in the path names them; a path without it is one
    split only ('train'), so asking it for another split cannot silently reuse the same files."""
    if "{split}" in path:
        return path.replace("{split}", split)
    if split != "train":
        raise BenchError(f"parquet files {path} are one split ('train'), so there is no '{split}' split; write the "
                         f"path with {{split}} (e.g. /data/{{split}}-*.parquet) for split files{_HOLDOUT_HINT}")
    return path


# -- built-in sources ---------------------------------------------------------------------------


@register_source("digits", summary="scikit-learn's bundled 8x8 digits: 10 classes, fixed stratified train/test")
class DigitsSource(Source):
    """sklearn's digits: 1797 grey 8x8 images. ``split``: 'train' (2/3), 'test' (1/3) or 'all',
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
        self.original = np.flatnonzero(keep)  # the index in scikit-learn's order: one sample, one id
        super().__init__("digits", split, target[keep], [str(c) for c in range(10)])

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index], mode="L")

    def sample_ids(self) -> np.ndarray:
        return self.original

    def content_digests(self) -> np.ndarray:
        return bytes_digests((img.tobytes() for img in self.images), len(self.images))


@register_source("imagefolder", form="imagefolder:<root>", summary="root/<class>/<image> (or root/<split>/<class>/"
                 "<image>) on disk; classes are the sorted folder names")
class ImageFolderSource(Source):
    """``root/<class>/<file>``: classes are the sorted subfolder names."""

    def __init__(self, root: str | Path, split: str = "train") -> None:
        base = Path(root)
        if not base.is_dir():
            raise BenchError(f"image folder {base} does not exist")
        folders = _visible_dirs(base)
        splits = sorted(p.name for p in folders if p.name in SPLIT_NAMES)
        notes = []
        if splits:  # root/<split>/<class>/<image>
            if split not in splits:
                raise BenchError(f"image folder {base} has split folders {splits} but no '{split}'"
                                 + (_HOLDOUT_HINT if split != "train" else ""))
            self.root = base / split
            others = sorted(p.name for p in folders if p.name not in SPLIT_NAMES)
            if others:  # said, not silently left out: a class folder put beside the splits by mistake?
                notes.append(f"folders {others} of {base} sit beside its split folders {splits}; they are not read")
        elif split == "train":  # root/<class>/<image>: the whole folder is one split
            self.root = base
        else:
            raise BenchError(f"image folder {base} holds class folders directly (root/<class>/<image>), so it has "
                             f"no '{split}' split{_HOLDOUT_HINT}")
        files, labels, classes, nested = [], [], [], []
        for folder in sorted(_visible_dirs(self.root), key=lambda p: p.name):
            images = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if _visible_dirs(folder):
                nested.append(folder.name)
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
        if nested:
            notes.append(f"class folders {nested[:5]}{' ...' if len(nested) > 5 else ''} of {self.root} hold "
                         "subfolders; only the images directly in a class folder are read")
        self.files = files
        self._digests: list[str] | None = None
        super().__init__(f"imagefolder:{self.root.resolve()}", split, np.asarray(labels, np.int64), classes)
        self.notes += notes

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
        # image again (bench.data.hashing says where the memo lives). They are looked up on
        # every call: the extractor asks again afterwards to notice files that changed meanwhile.
        self._digests = file_digests(self.files, self.root)
        return {**super().key_fields(), "files_digest": combine_file_digests(self.files, self.root, self._digests)}

    def content_digests(self) -> np.ndarray:
        # No sample ids: one file is one content, so the digests find a file that both splits
        # list, and copies of it under other names too.
        if self._digests is None:  # the key's digests serve when it was computed first
            self._digests = file_digests(self.files, self.root)
        return hex_to_sample_digests(self._digests)

    def where(self, index: int) -> str:
        return str(self.files[index])


def _image_bytes(value: Any) -> bytes:
    """The stored bytes of one Hugging Face image value (encoded bytes, or the file they name)."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            return Path(value["path"]).read_bytes()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return np.ascontiguousarray(np.asarray(value)).tobytes()  # an array column: its pixels


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
        names = list(getattr(ds.features[label_key], "names", None) or [])
        labels, classes = label_ids(ds[label_key], names,
                                    f"column '{label_key}' of Hugging Face dataset {path} ({split})")
        self.renumbered = not names and classes != [str(i) for i in range(len(classes))]
        self.ds = ds
        self.image_key = image_key
        super().__init__(f"hf:{path}", split, labels, classes)
        self._fingerprint = getattr(ds, "_fingerprint", "")

    @staticmethod
    def _pick_split(dsd, split: str, path: str):
        # A slice like train[:1000] reads the same rows from a save_to_disk copy as load_dataset does
        # from the hub, so a local stand-in of a suite member takes the member's split unchanged.
        name, bracket, rest = split.partition("[")
        if name not in dsd:
            raise BenchError(f"{path} has no split '{name}'; splits: {list(dsd)}")
        if not bracket:
            return dsd[name]
        start, colon, stop = rest.rstrip("]").partition(":")
        if not rest.endswith("]") or not colon or not all(v.strip().lstrip("-").isdigit() for v in (start, stop) if v):
            raise BenchError(f"split '{split}' of {path}: write a slice as name[start:stop] with ints, "
                             "e.g. train[:1000]")
        rows = range(len(dsd[name]))[slice(int(start) if start else None, int(stop) if stop else None)]
        return dsd[name].select(rows)

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

    def content_digests(self) -> np.ndarray:
        """Digests of the stored image bytes, read through Arrow without decoding any image."""

        def compute() -> np.ndarray:
            table = self.ds.with_format("arrow")
            out = np.empty(len(self), dtype=np.uint64)
            step = 4096
            for start in range(0, len(self), step):
                column = table[start:start + step].column(self.image_key)
                values = column.to_pylist()
                out[start:start + len(values)] = bytes_digests((_image_bytes(v) for v in values), len(values))
            return out

        token = f"{self._fingerprint}|{self.image_key}|{len(self)}" if self._fingerprint else ""
        return memoised_sample_digests(token, compute)


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
        names = list(getattr(features.get(label_key), "names", None) or [])
        labels, classes = label_ids(np.asarray([ex[label_key] for ex in ds.select_columns([label_key])], dtype=object),
                                    names, f"column '{label_key}' of Hugging Face dataset {path} ({split})")
        self.renumbered = not names and classes != [str(i) for i in range(len(classes))]
        self.stream = ds.cast_column(image_key, datasets.Image(decode=False))
        self.image_key, self.path, self.revision = image_key, path, revision
        super().__init__(f"hf-stream:{path}", split, labels, classes)

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


@register_source("hf", form="hf:<name or path>", summary="a Hugging Face datasets dataset: a hub name, a "
                 "save_to_disk folder, an image folder or parquet files (streaming: true for a stream)")
def hf_source(path: str, split: str = "train", image_key: str = "image", label_key: str = "label",
              revision: str | None = None, streaming: bool = False) -> Source:
    """A Hugging Face dataset with random access, or read as a stream (``streaming``)."""
    return (HFStreamingSource if streaming else HFSource)(path, split, image_key, label_key, revision)


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
# where a file-based torchvision dataset lists its images (a path, or a (path, label) pair)
_TV_FILES = ("_image_files", "_images", "_samples", "samples")


@register_source("tv", form="tv:<Name>", summary="a torchvision dataset from a local root (download: true with a "
                 "network): " + ", ".join(TV_DATASETS))
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
        self._digests: np.ndarray | None = None
        super().__init__(f"tv:{name}", split, labels, self._unique_names(classes))

    def _unique_names(self, classes: list) -> list[str]:
        """Class names, each once: ImageNet gives synonym tuples whose first names repeat ('crane'
        is a bird and a machine); a repeated name gets its WordNet id (or class id) added."""
        names = [c if isinstance(c, str) else c[0] for c in classes]
        counts = Counter(names)
        wnids = getattr(self.ds, "wnids", None)
        return [n if counts[n] == 1 else f"{n} ({wnids[i] if wnids else i})" for i, n in enumerate(names)]

    def load(self, index: int) -> Image.Image:
        try:
            img = self.ds[int(index)][0]
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
            raise CorruptImage(f"cannot decode image at index {index} of {self.name}: {_why(err)}", index) from err
        return img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))

    def _files(self) -> list[str] | None:
        for attr in _TV_FILES:
            items = getattr(self.ds, attr, None)
            if items is not None and len(items) == len(self):
                return [str(item[0] if isinstance(item, (tuple, list)) else item) for item in items]
        return None

    def _content(self, fresh: bool) -> np.ndarray | None:
        data = getattr(self.ds, "data", None)
        if data is not None and len(data) == len(self):  # images held in memory (MNIST, CIFAR, ...)
            if self._digests is None:
                rows = data.numpy() if hasattr(data, "numpy") else np.asarray(data)
                self._digests = bytes_digests((np.ascontiguousarray(r).tobytes() for r in rows), len(rows))
            return self._digests
        files = self._files()
        if files is not None and (fresh or self._digests is None):  # files: looked up again for each key
            self._digests = hex_to_sample_digests(file_digests(files, self.ds.root))
        return self._digests

    def content_digests(self) -> np.ndarray | None:
        return self._content(fresh=False)

    def key_fields(self) -> dict[str, Any]:
        # A local copy replaced by another of the same size is a new key.
        digests = self._content(fresh=True)
        content = {"content": array_digest(digests)} if digests is not None else {}
        return {**super().key_fields(), **content}

    def where(self, index: int) -> str:
        files = self._files()
        return files[index] if files is not None else f"index {index}"


@register_source("synthetic", form="synthetic:<n>", summary="n random RGB images made from their index (nothing "
                 "stored), for throughput and memory measurements")
class SyntheticSource(Source):
    """``synthetic:<n>``: n random RGB images made on the fly from their index (nothing stored),
    for throughput and memory measurements at any dataset size. The train split draws from one
    stream, every other split from another."""

    def __init__(self, n: str | int, split: str = "train", size: int = 64, classes: int = 10) -> None:
        self.size = int(size)
        n = int(n)
        self.stream = 0 if split == "train" else 1 << 40
        super().__init__(f"synthetic:{n}", split, np.arange(n, dtype=np.int64) % classes,
                         [str(c) for c in range(classes)])

    def load(self, index: int) -> Image.Image:
        rng = np.random.default_rng(int(index) + self.stream)
        return Image.fromarray(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8))

    def key_fields(self) -> dict[str, Any]:
        return {**super().key_fields(), "size": self.size}

    def sample_ids(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64) + self.stream  # an image is its seed
