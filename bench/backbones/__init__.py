"""Backbone registry: frozen embedding models with their transforms and weight fingerprints."""

from bench.backbones.registry import Backbone, build_backbone, known_backbones, save_checkpoint

__all__ = ["Backbone", "build_backbone", "known_backbones", "save_checkpoint"]
