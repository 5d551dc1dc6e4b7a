"""Backbones: frozen embedding models with their transforms and weight fingerprints, built by
name from a registry of families (``bench.backbones.registry``)."""

from bench.backbones.base import Backbone, frozen_backbone
from bench.backbones.registry import build_backbone, check_backbone, known_backbones, register_backbone

# The built-in families register themselves on import (after the registry they register in).
from bench.backbones import builtin, families  # noqa: E402,F401  isort: skip
from bench.backbones.builtin import save_checkpoint, tiny_asset_path  # noqa: E402  isort: skip

__all__ = ["Backbone", "build_backbone", "check_backbone", "frozen_backbone", "known_backbones",
           "register_backbone", "save_checkpoint", "tiny_asset_path"]
