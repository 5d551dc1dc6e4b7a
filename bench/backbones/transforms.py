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


def _positive(spec: dict[str, Any], key: str, default: int) -> int:
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BenchError(f"transform {key}={value!r} is not valid: expected a positive int (pixels)")
    return value


def transform_channels(spec: dict[str, Any]) -> int:
    """The channel count a transform spec produces (1 or 3)."""
    channels = spec.get("channels", 3)
    if channels not in (1, 3) or isinstance(channels, bool):
        raise BenchError(f"transform channels={channels!r} is not valid: expected 1 or 3")
    return channels


def build_transform(spec: dict[str, Any]) -> Callable[[Image.Image], Any]:
    if not isinstance(spec, dict):
        raise BenchError(f"a transform must be a mapping such as {{size: 224, channels: 3}}, got {spec!r}")
    unknown = set(spec) - KNOWN
    if unknown:
        raise BenchError(f"unknown transform option(s) {sorted(unknown)}; known: {sorted(KNOWN)}")
    import torch

    channels = transform_channels(spec)
    mode = "L" if channels == 1 else "RGB"
    size = _positive(spec, "size", 224)
    crop = _positive(spec, "crop", size)
    modes = [m.name.lower() for m in v2.InterpolationMode]
    interp_name = str(spec.get("interpolation", "bilinear")).lower()
    if interp_name not in modes:
        raise BenchError(f"transform interpolation={interp_name!r} is not valid: expected one of {', '.join(modes)}")
    interp = v2.InterpolationMode[interp_name.upper()]
    for key in ("mean", "std"):
        value = spec.get(key)
        if value is not None and (not isinstance(value, list) or len(value) != channels):
            raise BenchError(f"transform {key}={value!r} is not valid: expected a list of {channels} numbers")
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
