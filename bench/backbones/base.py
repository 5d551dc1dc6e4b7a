"""What every backbone family shares: the :class:`Backbone` record, freezing a model with its
weights fingerprint, and loading a weights file safely.

Families register in :mod:`bench.backbones.registry`. Built-in families live in ``builtin.py``,
optional ones (timm, open_clip, Hugging Face) in ``families.py``.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file
from torch import nn

from bench.backbones.transforms import build_transform, describe_transform, transform_channels
from bench.errors import BenchError


@dataclass
class TextTower:
    """The text side of a vision-language backbone: class prompts to embeddings in the image
    embedding space. ``tokenizer`` names the tokenizer and ``fingerprint`` hashes every weight of
    the joint model (image and text), so together they key cached text embeddings."""

    encode: Callable[[list[str]], torch.Tensor]  # a batch of texts -> (N, D) features, unnormalised
    tokenizer: str
    fingerprint: str
    model: nn.Module | None = None  # the module holding the text weights, moved by encode_text(device=...)

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 256,
                    device: torch.device | str | None = None) -> torch.Tensor:
        """(N, D) float32 text embeddings (not normalised), computed in batches; ``device`` moves the
        text weights there first (80 templates x 1000 classes take minutes on a CPU)."""
        if not texts:
            raise BenchError("encode_text needs at least one text")
        if device is not None and self.model is not None:
            self.model.to(device)
        parts = [self.encode(list(texts[i:i + batch_size])).float().cpu() for i in range(0, len(texts), batch_size)]
        return torch.cat(parts)


@dataclass
class Backbone:
    name: str
    model: nn.Module
    transform: Callable[[Any], torch.Tensor]
    transform_desc: str
    dim: int
    fingerprint: str
    layer: str  # which layer / pooling the embedding comes from
    text: TextTower | None = None  # vision-language backbones (open_clip, HF CLIP/SigLIP) only

    def key_fields(self) -> dict[str, Any]:
        """Everything about the backbone that changes the embeddings."""
        return {
            "backbone": self.name,
            "weights_sha256": self.fingerprint,
            "transform": self.transform_desc,
            "layer": self.layer,
        }


def frozen_backbone(name: str, model: nn.Module, transform: dict[str, Any] | Callable[[Any], torch.Tensor],
                    dim: int, layer: str) -> Backbone:
    """``model`` frozen (eval mode, no gradients) as a :class:`Backbone`, with its weights'
    fingerprint. ``transform``: a spec mapping (see ``transforms.py``) or a library's own
    transform object, whose ``repr`` the cache key then uses."""
    tfm = build_transform(transform) if isinstance(transform, dict) else transform
    return Backbone(name, freeze(model), tfm, describe_transform(transform), dim, weights_fingerprint(model), layer)


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over every tensor of the state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_state_file(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file, or from a .pt/.pth/.bin file holding only tensors.

    Pickles are never unpickled beyond tensors (``weights_only=True``), so a file that pickles
    code or other objects is refused with a message saying how to convert it.
    """
    if not path.is_file():
        raise BenchError(f"weights file {path} for {what} does not exist")
    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(
            path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise BenchError(
            f"{path} is not a plain state dict of tensors, so it is not loaded ({str(err).splitlines()[0][:120]}); "
            "bench loads weights with weights_only=True and never unpickles other objects: save "
            "model.state_dict() with safetensors.torch.save_file (or torch.save) and pass that file"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BenchError(f"{path} does not hold a state dict (a mapping of names to tensors) for {what}")
    return state


def check_channels(model: nn.Module, transform: dict[str, Any], what: str) -> None:
    """Refuse a transform whose channel count the model's first convolution cannot take (an
    RGB transform for a 1-channel model, or the reverse), before any image is embedded. The
    transform's own values are checked first: a bad size is named as such, not as a mismatch."""
    build_transform(transform)
    channels = transform_channels(transform)
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first.in_channels != channels:
        raise BenchError(
            f"{what} takes {first.in_channels}-channel images but its transform makes {channels}-channel ones; "
            f"set backbone.transform.channels={first.in_channels} (images are converted, e.g. RGB to grey)"
        )
