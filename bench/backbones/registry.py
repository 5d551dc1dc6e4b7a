"""Backbone registry: one function per family returns a frozen embedding model.

Names look like ``tiny-digits`` (the embedded default), ``torchvision:resnet18`` or
``checkpoint:/path/model.safetensors``. Every family returns a :class:`Backbone`: an
``nn.Module`` in eval mode with gradients off that maps a batch of images to one embedding
per image, the transform it expects, its embedding size and a fingerprint of its weights
(the cache key uses the weights themselves, not the name).
"""

from __future__ import annotations

from typing import Any

from bench.backbones import builtin, families  # noqa: F401  (each registers its families)
from bench.backbones.base import FAMILIES, Backbone, known_backbones, weights_fingerprint
from bench.backbones.builtin import canonical_safetensors, save_checkpoint, tiny_asset_path
from bench.errors import BenchError

__all__ = ["Backbone", "build_backbone", "canonical_safetensors", "known_backbones", "save_checkpoint",
           "tiny_asset_path", "weights_fingerprint"]


def build_backbone(name: str, **options: Any) -> Backbone:
    """Build a backbone by name; see the module docstring for the name forms."""
    family, _, arg = name.partition(":")
    if family not in FAMILIES:
        raise BenchError(f"unknown backbone '{name}'; known: {', '.join(known_backbones())}")
    return FAMILIES[family](arg, **options)
