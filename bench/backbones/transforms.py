"""Image transforms described by plain dicts, so that the cache key can name them exactly.

A transform spec is a mapping such as ``{"size": 8, "channels": 1, "mean": [0.3], "std": [0.4]}``
(resize the shorter side to ``size`` and centre-crop it, convert to 1 or 3 channels, scale to
[0, 1], normalise). Backbones whose library ships its own transform (torchvision weights) use
that object, and the cache key uses its ``repr``, which lists every parameter.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from PIL import Image
from torchvision.transforms import v2

from bench.errors import BenchError

KNOWN = {"size", "crop", "channels", "mean", "std", "interpolation"}


def build_transform(spec: dict[str, Any]) -> Callable[[Image.Image], Any]:
    unknown = set(spec) - KNOWN
    if unknown:
        raise BenchError(f"unknown transform option(s) {sorted(unknown)}; known: {sorted(KNOWN)}")
    import torch

    channels = int(spec.get("channels", 3))
    if channels not in (1, 3):
        raise BenchError(f"transform channels must be 1 or 3, got {channels}")
    mode = "L" if channels == 1 else "RGB"
    size = int(spec.get("size", 224))
    crop = int(spec.get("crop", size))
    interp = getattr(v2.InterpolationMode, str(spec.get("interpolation", "bilinear")).upper())
    steps = [
        v2.Lambda(lambda img: img.convert(mode) if isinstance(img, Image.Image) else img),
        v2.PILToTensor(),
        v2.Resize(size, interpolation=interp, antialias=True),
        v2.CenterCrop(crop),
        v2.ToDtype(torch.float32, scale=True),
    ]
    if "mean" in spec or "std" in spec:
        steps.append(v2.Normalize(spec.get("mean", [0.0] * channels), spec.get("std", [1.0] * channels)))
    return v2.Compose(steps)


def describe_transform(spec_or_transform: Any) -> str:
    """A stable string for the cache key."""
    if isinstance(spec_or_transform, dict):
        return json.dumps(spec_or_transform, sort_keys=True)
    return repr(spec_or_transform)
