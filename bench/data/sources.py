"""Dataset sources: images, integer labels and class names, without any transform.

Every source knows its labels without decoding an image (episodes are drawn from labels
alone) and describes itself for the cache key. Sources:

- ``digits``: scikit-learn's bundled 8x8 digits (real, offline, 10 classes), split into a
  fixed stratified train/test partition;
- ``imagefolder``: ``root/<class name>/<image>`` on disk;
- ``hf``: a Hugging Face ``datasets`` dataset, from the hub by name, or from disk
  (``load_from_disk`` folders, local ``imagefolder`` folders or parquet files).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from bench.errors import BenchError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


class CorruptImage(BenchError):
    """An image that cannot be decoded (the message names the file and index)."""


@dataclass
class Source:
    """Base: subclasses fill ``labels`` and ``class_names`` and implement ``load``."""

    name: str
    split: str
    labels: np.ndarray = field(repr=False)
    class_names: list[str] = field(repr=False)

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
        self.root = Path(root)
        if not self.root.is_dir():
            raise BenchError(f"image folder {self.root} does not exist")
        if (self.root / split).is_dir():  # root/<split>/<class>/<image> layouts
            self.root = self.root / split
        classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not classes:
            raise BenchError(f"image folder {self.root} has no class subfolders (root/<class>/<image>)")
        files, labels = [], []
        for label, cls in enumerate(classes):
            for f in sorted((self.root / cls).iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(f)
                    labels.append(label)
        if not files:
            raise BenchError(f"image folder {self.root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.files = files
        super().__init__(f"imagefolder:{self.root.resolve()}", split, np.asarray(labels, np.int64), classes)

    def load(self, index: int) -> Image.Image:
        path = self.files[index]
        try:
            with Image.open(path) as img:
                img.load()
                return img.copy()
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise CorruptImage(f"cannot decode image {path} (index {index}): {err}") from err

    def key_fields(self) -> dict[str, Any]:
        # File names and sizes catch added, removed or replaced files without reading them all.
        import hashlib

        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.relative_to(self.root)}|{f.stat().st_size}".encode())
        return {**super().key_fields(), "files_sha256": h.hexdigest()}


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
            elif p.is_dir():
                ds = datasets.load_dataset("imagefolder", data_dir=str(p), split=split)
            elif p.suffix == ".parquet" or "*" in path:
                ds = datasets.load_dataset("parquet", data_files={split: path}, split=split)
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
        feature = ds.features[label_key]
        names = list(getattr(feature, "names", None) or [])
        labels = np.asarray(ds[label_key], dtype=np.int64)
        if not names:
            names = [str(c) for c in range(int(labels.max()) + 1)]
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
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise CorruptImage(f"cannot decode image at index {index} of {self.name}: {err}") from err

    def key_fields(self) -> dict[str, Any]:
        return {**super().key_fields(), "hf_fingerprint": self._fingerprint}


_SOURCES: dict[str, Callable[..., Source]] = {
    "digits": DigitsSource,
    "imagefolder": ImageFolderSource,
    "hf": HFSource,
}


def known_sources() -> list[str]:
    return ["digits", "imagefolder:<root>", "hf:<name or path>"]


def build_source(name: str, split: str = "train", **options: Any) -> Source:
    """``digits``, ``imagefolder:<root>`` or ``hf:<name or path>``."""
    family, _, arg = name.partition(":")
    if family not in _SOURCES:
        raise BenchError(f"unknown dataset '{name}'; known: {', '.join(known_sources())}")
    if family == "digits":
        return DigitsSource(split, **options)
    if not arg:
        raise BenchError(f"dataset '{name}' needs a path or name after the colon, e.g. {family}:/data/x")
    return _SOURCES[family](arg, split=split, **options)
