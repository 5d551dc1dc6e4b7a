"""Small real data made by the tests themselves."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def write_image_folder(root: Path, classes=("cat", "dog", "emu"), per_class: int = 6, size: int = 12,
                       seed: int = 0) -> Path:
    """root/<class>/<i>.png with class-dependent colours, so classes are separable."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((size, size, 3), dtype=np.float64)
            base[..., c % 3] = 160 + 40 * (c // 3)
            img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


def copy_cache(cache: Path, to: Path) -> Path:
    """A writable copy of a cache's complete entries (a few hundred KB for digits): for a test that
    may write into a cache shared read-only (conftest's quickstart_cache)."""
    to.mkdir(parents=True, exist_ok=True)
    for entry in cache.iterdir():
        if not entry.name.startswith("."):
            shutil.copytree(entry, to / entry.name)
    return to
