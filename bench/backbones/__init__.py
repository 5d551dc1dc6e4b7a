"""Backbones: frozen embedding models with their transforms and weight fingerprints, built by
name from a registry of families (``bench.backbones.registry``)."""

# builtin and families register the built-in families when imported.
from bench.backbones import builtin, families  # noqa: F401
from bench.backbones.base import Backbone, frozen_backbone
from bench.backbones.builtin import save_checkpoint, tiny_asset_path
from bench.backbones.registry import build_backbone, check_backbone, known_backbones, register_backbone

__all__ = ["Backbone", "build_backbone", "check_backbone", "frozen_backbone", "known_backbones",
           "register_backbone", "save_checkpoint", "tiny_asset_path"]
