"""Small real data made by the tests themselves."""

from __future__ import annotations

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
