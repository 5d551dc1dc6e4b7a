"""Built-in backbone families: the embedded ``tiny-digits``, ``checkpoint:`` files written by
:func:`save_checkpoint`, and ``torchvision:`` models."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from bench.backbones.base import Backbone, check_channels, frozen_backbone, load_state_file
from bench.backbones.registry import register_backbone
from bench.backbones.tiny import TinyCNN
from bench.errors import BenchError

IMAGENET = {"size": 256, "crop": 224, "channels": 3,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


TINY_ASSET = "tiny_digits.safetensors"


def tiny_asset_path() -> Path:
    return Path(str(resources.files("bench") / "assets" / TINY_ASSET))


@register_backbone("tiny-digits", summary="the embedded CNN for 8x8 grey digits, pretrained on classes 0-4")
def _tiny_digits(arg: str, transform: dict | None = None) -> Backbone:
    if arg:
        raise BenchError(f"tiny-digits takes no argument, got 'tiny-digits:{arg}'")
    bb = _checkpoint(str(tiny_asset_path()), transform)
    bb.name = "tiny-digits"
    return bb


@register_backbone("checkpoint", form="checkpoint:<path.safetensors>",
                   summary="a checkpoint written by bench.backbones.save_checkpoint")
def _checkpoint(path: str, transform: dict | None = None) -> Backbone:
    """A local safetensors checkpoint of our own: header metadata names the architecture."""
    p = Path(path)
    if not p.is_file():
        raise BenchError(f"backbone checkpoint {p} does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(p))
    except Exception as err:  # safetensors raises several types for a bad file
        raise BenchError(f"cannot read backbone checkpoint {p}: {err}") from err
    arch = meta.get("arch")
    if arch == "tiny-cnn":
        model: nn.Module = TinyCNN(int(meta.get("width", 16)), int(meta.get("in_channels", 1)))
        dim = model.dim
    elif arch and arch.startswith("torchvision:"):
        model, dim = _torchvision_trunk(arch.split(":", 1)[1], weights=None)
    else:
        raise BenchError(
            f"{p} does not say which architecture it holds (metadata 'arch' is {arch!r}); "
            "save checkpoints with bench.backbones.save_checkpoint"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BenchError(
            f"{p} does not fit architecture {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    tspec = transform or json.loads(meta.get("transform", "null")) or IMAGENET
    check_channels(model, tspec, f"checkpoint {p.name}")
    return frozen_backbone(f"checkpoint:{p.name}", model, tspec, dim, meta.get("layer", "pooled"))


def save_checkpoint(model: nn.Module, path: str | Path, arch: str, transform: dict, **meta: Any) -> None:
    """Write a checkpoint that ``checkpoint:<path>`` can load, with deterministic bytes."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in sorted(model.state_dict().items())}
    header = {"arch": arch, "transform": json.dumps(transform, sort_keys=True)}
    header.update({k: str(v) for k, v in meta.items()})
    Path(path).write_bytes(canonical_safetensors(save(state, metadata=header)))


def canonical_safetensors(blob: bytes) -> bytes:
    """Rewrite a safetensors header with sorted keys.

    safetensors writes its JSON header in hash-map order, which changes between runs; the
    data offsets are relative to the end of the header, so only the header needs rewriting.
    """
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors does
    return len(text).to_bytes(8, "little") + text + blob[8 + n :]


def _torchvision_trunk(arch: str, weights: Any) -> tuple[nn.Module, int]:
    """A torchvision classifier with its last linear layer replaced by the identity."""
    import torchvision

    try:
        model = torchvision.models.get_model(arch, weights=weights)
    except ValueError as err:
        known = ", ".join(sorted(torchvision.models.list_models(torchvision.models))[:12])
        raise BenchError(f"unknown torchvision model '{arch}' ({err}); e.g. {known}, ...") from err
    last_name, last = None, None
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name, last = mod_name, module
    if last is None:
        raise BenchError(f"torchvision:{arch} has no linear classifier to remove")
    parent = model.get_submodule(last_name.rsplit(".", 1)[0]) if "." in last_name else model
    setattr(parent, last_name.rsplit(".", 1)[-1], nn.Identity())
    return model, last.in_features


@register_backbone("torchvision", form="torchvision:<arch>", summary="a torchvision classifier without its last layer")
def _torchvision(arch: str, weights: str | None = "DEFAULT", transform: dict | None = None) -> Backbone:
    """torchvision models. ``weights``: 'DEFAULT' or an enum name (downloaded, or read from
    the torch hub cache), a local .safetensors / .pth state dict, or None (random init)."""
    import torchvision

    local = weights is not None and Path(str(weights)).suffix in (".safetensors", ".pth", ".pt")
    tv_weights = None
    if weights is not None and not local:
        try:
            tv_weights = torchvision.models.get_model_weights(arch).verify(weights)
        except (ValueError, KeyError) as err:
            raise BenchError(f"unknown weights '{weights}' for torchvision:{arch}: {err}") from err
    try:
        model, dim = _torchvision_trunk(arch, tv_weights)
    except (OSError, RuntimeError) as err:  # no network and nothing in the hub cache
        raise BenchError(
            f"could not load {weights} weights for torchvision:{arch} ({err}). Without a "
            "network, put the file in the torch hub cache, pass weights: /path/to/weights.pth, "
            "or weights: null for random init"
        ) from err
    if local:
        path = Path(str(weights))
        state = load_state_file(path, f"torchvision:{arch}")
        state = {k: v for k, v in state.items() if k in model.state_dict()}  # drop the classifier
        missing, _ = model.load_state_dict(state, strict=False)
        if missing:
            raise BenchError(f"{path} lacks weights for torchvision:{arch}: {missing[:5]}")
    if transform is not None:
        check_channels(model, transform, f"torchvision:{arch}")
    tfm = transform if transform is not None else tv_weights.transforms() if tv_weights is not None else IMAGENET
    return frozen_backbone(f"torchvision:{arch}", model, tfm, dim, "penultimate")
