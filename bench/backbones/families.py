"""Optional backbone families: timm, open_clip and Hugging Face transformers (vision-language models keep
their text tower as ``Backbone.text``).

Each is an extra (``pip install "imprint-bench[timm,openclip,hf]"``); asking for a family whose package is
missing names the extra. Weights come from the hub when there is a network (``weights:
DEFAULT`` or a pretrained tag), from a local file or folder, or are random (``weights: null``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.backbones.base import Backbone, TextTower, freeze, frozen_backbone, load_state_file, weights_fingerprint
from bench.backbones.registry import register_backbone
from bench.errors import BenchError

EXTRAS = {"timm": ("timm", "timm"), "openclip": ("open_clip", "openclip"), "hf": ("transformers", "hf")}


def _need(family: str):
    module, extra = EXTRAS[family]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise BenchError(
            f"backbone family '{family}' needs the {module} package: pip install \"imprint-bench[{extra}]\" "
            f"(in a checkout: pip install \".[{extra}]\")"
        ) from err


def _load_local(model: nn.Module, path: Path, what: str) -> None:
    state = load_state_file(path, what)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing, _ = model.load_state_dict(state, strict=False)
    if missing:
        raise BenchError(f"{path} lacks weights for {what}: {missing[:5]}")


def _is_local(weights: Any) -> bool:
    return weights is not None and Path(str(weights)).suffix in (".safetensors", ".pth", ".pt", ".bin")


@register_backbone("timm", form="timm:<name>", summary="any timm.create_model name, classifier removed")
def _timm(name: str, weights: Any = "DEFAULT", pool: str | None = None, transform: dict | None = None) -> Backbone:
    """Any ``timm.create_model`` name; the classifier is removed and ``pool`` names the pooling
    (timm's ``global_pool``: avg, max, token for a ViT's CLS token, ...)."""
    timm = _need("timm")
    kwargs = {"num_classes": 0}
    if pool is not None:
        kwargs["global_pool"] = pool
    try:
        model = timm.create_model(name, pretrained=weights == "DEFAULT", **kwargs)
    except RuntimeError as err:
        raise BenchError(f"timm:{name}: {err}. Without a network use weights: /path/file or null") from err
    except Exception as err:  # timm raises several types for unknown names
        if "Unknown model" in str(err) or isinstance(err, (KeyError, ValueError)):
            raise BenchError(f"unknown timm model '{name}'; see timm.list_models()") from err
        raise
    if _is_local(weights):
        _load_local(model, Path(str(weights)), f"timm:{name}")
    if transform is None:
        transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    pool_name = getattr(model, "global_pool", pool)
    return frozen_backbone(f"timm:{name}", model, transform, int(model.num_features),
                           f"pool={getattr(pool_name, 'pool_type', pool_name)}")


@register_backbone("openclip", form="openclip:<arch>", summary="an open_clip image tower (with its text tower)",
                   text=True)
def _openclip(arch: str, weights: Any = None, transform: dict | None = None, config: dict | None = None) -> Backbone:
    """An open_clip image tower, keeping the text tower for zero-shot heads (``Backbone.text``).
    ``weights``: a pretrained tag (downloaded), a local file, or null. ``config``: an open_clip
    model config mapping (embed_dim, vision_cfg, text_cfg) registered as ``arch``, e.g. a tiny
    random model for offline tests."""
    open_clip = _need("openclip")
    if config is not None:
        _add_openclip_config(open_clip, arch, config)
    tag = None if weights is None or _is_local(weights) else str(weights)
    try:
        model = open_clip.create_model(arch, pretrained=tag)
    except RuntimeError as err:
        raise BenchError(f"openclip:{arch} ({tag}): {err}") from err
    if _is_local(weights):
        _load_local(model, Path(str(weights)), f"openclip:{arch}")
    visual = model.visual
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    if transform is None:
        mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        transform = open_clip.image_transform(size, is_train=False, mean=mean, std=std)
    freeze(model)  # the text tower too: dropout off, no gradients
    backbone = frozen_backbone(f"openclip:{arch}", visual, transform, int(visual.output_dim), "image-embedding")
    tokenizer = open_clip.get_tokenizer(arch)
    # extraction moves only the image tower (the backbone's model) to an accelerator: tokens go where
    # the text tower's weights are (CLIP keeps them on the joint model, CustomTextCLIP under .text)
    text_part = model.text if getattr(model, "text", None) is not None else model.token_embedding
    tok_id = (f"open_clip-{open_clip.__version__}:{arch}:{type(tokenizer).__name__}"
              f":{getattr(tokenizer, 'context_length', '')}")
    backbone.text = TextTower(lambda texts: model.encode_text(tokenizer(texts).to(_device(text_part))),
                              tok_id, weights_fingerprint(model), model)
    return backbone


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _add_openclip_config(open_clip, arch: str, config: dict) -> None:
    """Register ``config`` under ``arch`` through open_clip's public add_model_config (a JSON file)."""
    if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(config):
        raise BenchError(f"openclip:{arch} config must give embed_dim, vision_cfg and text_cfg; got {sorted(config)}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{arch}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)


class _HFEmbedder(nn.Module):
    """A transformers vision model reduced to one vector per image: CLS token or mean of tokens."""

    def __init__(self, model: nn.Module, pooling: str) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise BenchError(f"hf pooling '{pooling}' is not one of cls, mean")
        self.model, self.pooling = model, pooling

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.model(pixel_values=pixel_values).last_hidden_state
        if hidden.ndim == 4:  # convolutional models: (B, C, H, W)
            return hidden.mean((2, 3))
        return hidden[:, 0] if self.pooling == "cls" else hidden.mean(1)


def _features(out: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projected features; 4.x a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _HFImageFeatures(nn.Module):
    """A vision-language model (CLIP, SigLIP, ...) reduced to its projected image embedding, the
    space its text embeddings share."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixel_values))

    def image_parameters(self) -> list[nn.Parameter]:
        """The image tower's parameters, counted as the backbone's size (a CLIP counts as its
        open_clip twin's ``visual`` does): the parts named for images (CLIP's ``vision_model`` and
        ``visual_projection``, BLIP's ``vision_proj``, FLAVA's ``image_model``), not a language
        model, Q-Former or logit scale beside them; a model without such names counts every part
        but its text side."""
        parts = dict(self.model.named_children())
        image = [c for n, c in parts.items() if n.startswith(("vision", "visual", "image"))]
        image = image or [c for n, c in parts.items() if not n.startswith("text")]
        return [p for child in image for p in child.parameters()]


def _hf_text(transformers, model: nn.Module, name: str, tokenizer: str | None, random_config: bool,
             fingerprint: str) -> TextTower:
    source = tokenizer or name
    try:
        tok = transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        hint = " (a random config: model needs tokenizer: <local tokenizer folder>)" if random_config else ""
        raise BenchError(f"hf:{name}: no tokenizer from {source}{hint}: {str(err).splitlines()[0][:160]}") from err
    # SigLIP was trained on prompts padded to max_length; CLIP pads to the batch's longest
    siglip = "siglip" in getattr(model.config, "model_type", "")
    limit = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", None)

    def encode(texts: list[str]) -> torch.Tensor:
        enc = tok(texts, padding="max_length" if siglip else True, truncation=True, max_length=limit,
                  return_tensors="pt")
        enc = {k: v.to(_device(model)) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        if siglip:
            enc.pop("attention_mask", None)
        return _features(model.get_text_features(**enc))

    # the vocabulary's digest: a local tokenizer folder may change under the same path
    vocab = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:16]
    return TextTower(encode, f"hf:{source}:{type(tok).__name__}:{vocab}", fingerprint, model)


def _hf_has_text(name: str, options: dict[str, Any]) -> bool | None:
    """Whether hf:<name> is a vision-language model, from its model_type (the config mapping's or a
    local folder's config.json) without building it; None for a hub name (known once loaded)."""
    config = options.get("config") or {}
    model_type = config.get("model_type")
    if model_type is None and (Path(name) / "config.json").is_file():
        model_type = json.loads((Path(name) / "config.json").read_text()).get("model_type")
    if model_type is None:
        return None
    transformers = _need("hf")
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    cls_name = MODEL_MAPPING_NAMES.get(model_type)
    cls = getattr(transformers, cls_name, None) if isinstance(cls_name, str) else None
    return None if cls is None else hasattr(cls, "get_text_features")


@register_backbone("hf", form="hf:<name or folder>", summary="a Hugging Face transformers vision model "
                   "(CLIP/SigLIP: projected image embedding and text tower)", text=_hf_has_text)
def _hf(name: str, weights: Any = "DEFAULT", pooling: str | None = None, config: dict | None = None,
        transform: dict | None = None, tokenizer: str | None = None) -> Backbone:
    """A Hugging Face transformers vision model: a hub name or local folder (``weights``
    DEFAULT loads its pretrained weights; null with ``config`` builds a random one offline).
    ``pooling``: cls (the default) or mean. A vision-language model (one with
    get_image_features and get_text_features, e.g. CLIP or SigLIP) embeds images in its joint
    space and keeps its text tower; ``tokenizer`` names its tokenizer (a hub name or local folder,
    default the model's own)."""
    transformers = _need("hf")
    try:
        if config is not None:
            cfg = transformers.AutoConfig.for_model(**config)
            model = transformers.AutoModel.from_config(cfg)
        elif weights is None:
            model = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(name))
        else:
            model = transformers.AutoModel.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise BenchError(
            f"hf:{name}: {err}. Without a network give a local folder, or config: {{model_type: vit, ...}} "
            "with weights: null"
        ) from err
    if _is_local(weights):
        _load_local(model, Path(str(weights)), f"hf:{name}")
    mcfg = model.config
    joint = hasattr(model, "get_image_features") and hasattr(model, "get_text_features")
    vcfg = getattr(mcfg, "vision_config", None) if joint else mcfg
    vcfg = vcfg if vcfg is not None else mcfg
    if tokenizer is not None and not joint:
        raise BenchError(f"backbone.tokenizer applies to vision-language models; hf:{name} has no text tower")
    if pooling is not None and joint:
        raise BenchError(f"hf:{name} is a vision-language model: its images embed through its projection "
                         "(get_image_features), so backbone.pooling does not apply; leave it unset")
    pooling = pooling or "cls"
    if transform is not None:
        tspec = transform
    else:
        size = getattr(vcfg, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        tspec = {"size": size, "channels": getattr(vcfg, "num_channels", 3), "mean": [0.5] * 3, "std": [0.5] * 3}
        if config is None:  # the model's own preprocessing, when it ships one
            try:
                proc = transformers.AutoImageProcessor.from_pretrained(name)
                tspec["mean"], tspec["std"] = list(proc.image_mean), list(proc.image_std)
            except (OSError, ValueError, TypeError):
                pass
    if joint:
        freeze(model)
        embedder = _HFImageFeatures(model)
        size = getattr(vcfg, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        with torch.no_grad():  # the projection's width, read from one blank image
            dim = embedder(torch.zeros(1, getattr(vcfg, "num_channels", 3), size, size)).shape[-1]
        backbone = frozen_backbone(f"hf:{name}", embedder, tspec, int(dim), "image-embedding")
        # the image embedder holds the whole joint model, so its fingerprint covers the text tower too
        backbone.text = _hf_text(transformers, model, name, tokenizer, config is not None or weights is None,
                                 backbone.fingerprint)
        return backbone
    dim = getattr(mcfg, "hidden_size", None) or getattr(mcfg, "hidden_sizes", [None])[-1]
    return frozen_backbone(f"hf:{name}", _HFEmbedder(model, pooling), tspec, int(dim), f"pooling={pooling}")
