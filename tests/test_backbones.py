import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bench import BenchError
from bench.backbones import build_backbone, save_checkpoint
from bench.backbones.registry import tiny_asset_path, weights_fingerprint
from bench.data.sources import DigitsSource

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_digits_is_frozen_and_embeds():
    bb = build_backbone("tiny-digits")
    assert bb.dim == 64 and not any(p.requires_grad for p in bb.model.parameters())
    assert not bb.model.training
    x = torch.stack([bb.transform(DigitsSource("test").load(i)) for i in range(4)])
    assert x.shape == (4, 1, 8, 8)
    assert bb.model(x).shape == (4, 64)


def test_tiny_asset_is_small_and_rebuilds_bit_for_bit(tmp_path):
    assert tiny_asset_path().stat().st_size < 300 * 1024
    spec = importlib.util.spec_from_file_location("build_tiny", ROOT / "scripts" / "build_tiny_backbone.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.build(tmp_path / "tiny.safetensors")
    assert out.read_bytes() == tiny_asset_path().read_bytes()


def test_torchvision_random_init_drops_the_classifier():
    bb = build_backbone("torchvision:resnet18", weights=None)
    assert bb.dim == 512
    img = DigitsSource("test").load(0)  # grey 8x8: the transform makes it 3x224x224
    assert bb.model(bb.transform(img)[None]).shape == (1, 512)
    other = build_backbone("torchvision:resnet18", weights=None)
    assert other.fingerprint != bb.fingerprint  # random init differs, and the key follows the weights


def test_torchvision_local_weights_and_checkpoint_round_trip(tmp_path):
    bb = build_backbone("torchvision:resnet18", weights=None)
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = build_backbone("torchvision:resnet18", weights=str(tmp_path / "w.safetensors"))
    assert loaded.fingerprint == bb.fingerprint

    save_checkpoint(bb.model, tmp_path / "ck.safetensors", arch="torchvision:resnet18",
                    transform={"size": 32, "channels": 3})
    ck = build_backbone(f"checkpoint:{tmp_path / 'ck.safetensors'}")
    assert ck.fingerprint == weights_fingerprint(bb.model) and ck.dim == 512
    assert "32" in ck.transform_desc


def test_bad_backbones_are_named(tmp_path):
    with pytest.raises(BenchError, match="unknown backbone 'vit'.*tiny-digits"):
        build_backbone("vit")
    with pytest.raises(BenchError, match="unknown torchvision model 'resnet1'"):
        build_backbone("torchvision:resnet1", weights=None)
    with pytest.raises(BenchError, match="does not exist"):
        build_backbone(f"checkpoint:{tmp_path / 'none.safetensors'}")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(BenchError, match="does not say which architecture"):
        build_backbone(f"checkpoint:{tmp_path / 'bare.safetensors'}")
    with pytest.raises(BenchError, match="could not load|unknown weights"):
        build_backbone("torchvision:resnet18", weights="NOT_A_WEIGHT")
