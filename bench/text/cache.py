"""Per-class text embeddings for zero-shot heads, and their cache.

A class's embedding is CLIP's zero-shot weight: every prompt (one per template) embedded by the
text tower, each l2-normalised, averaged, and normalised again. They are cached like image
embeddings: one safetensors file per key (the joint model's weights fingerprint, the tokenizer,
the class names and the templates), written atomically, so a rerun or another task on the same
dataset embeds no text again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from bench.backbones.base import TextTower
from bench.errors import BenchError
from bench.runtime import atomic_path
from bench.text.templates import prompts

FORMAT = 1


def zeroshot_weights(tower: TextTower, class_names: list[str], templates: list[str],
                     device: torch.device | str | None = None) -> torch.Tensor:
    """(C, D) float32: per class, the mean of its l2-normalised prompt embeddings, l2-normalised."""
    if not class_names:
        raise BenchError("zero-shot heads need at least one class name")
    texts = [p for name in class_names for p in prompts(str(name), templates)]
    emb = F.normalize(tower.encode_text(texts, device=device).float(), dim=-1)
    return F.normalize(emb.reshape(len(class_names), len(templates), -1).mean(1), dim=-1)


def key_fields(tower: TextTower, class_names: list[str], templates: list[str]) -> dict[str, Any]:
    return {"format": FORMAT, "model": tower.fingerprint, "tokenizer": tower.tokenizer,
            "class_names": [str(c) for c in class_names], "templates": list(templates)}


class TextCache:
    """``root/text/<sha256 of the key>.safetensors``; the key also rides in the file's metadata,
    so a file is only ever read back for the key it was written for."""

    def __init__(self, root: str | Path) -> None:
        self.dir = Path(root) / "text"

    def path(self, fields: dict[str, Any]) -> tuple[Path, str]:
        text = json.dumps(fields, sort_keys=True)
        return self.dir / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.safetensors", text

    def lookup(self, fields: dict[str, Any]) -> torch.Tensor | None:
        path, text = self.path(fields)
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != text:
                return None  # a hash collision or a foreign file: recompute rather than trust it
        return load_file(str(path))["text"]

    def store(self, fields: dict[str, Any], weights: torch.Tensor) -> Path:
        path, text = self.path(fields)
        with atomic_path(path) as tmp:
            save_file({"text": weights.contiguous()}, str(tmp), metadata={"key": text})
        return path


def class_text_embeddings(tower: TextTower | Any, class_names: list[str], templates: list[str],
                          cache_dir: str | Path | None, stats: dict | None = None,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """(C, D) zero-shot class weights (:func:`zeroshot_weights`), from the cache when it holds
    them; ``stats["from_cache"]`` says which. ``tower``: a TextTower or a Backbone carrying one;
    ``device``: where the text tower runs on a cache miss."""
    if not isinstance(tower, TextTower):
        name = getattr(tower, "name", type(tower).__name__)
        tower = getattr(tower, "text", None)
        if tower is None:
            raise BenchError(f"backbone {name} has no text tower, so it cannot embed class names; use a "
                             "vision-language model (openclip:<arch>, a CLIP/SigLIP hf model)")
    fields = key_fields(tower, class_names, templates)
    cache = TextCache(cache_dir) if cache_dir is not None else None
    hit = cache.lookup(fields) if cache is not None else None
    if stats is not None:
        stats["from_cache"] = hit is not None
    if hit is not None:
        return hit
    weights = zeroshot_weights(tower, class_names, templates, device)
    if cache is not None:
        cache.store(fields, weights)
    return weights
