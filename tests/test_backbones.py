import pytest
import torch
from safetensors.torch import save_file

from bench import BenchError
from bench.backbones import build_backbone, save_checkpoint, tiny_asset_path
from bench.backbones import tiny_build
from bench.backbones.base import weights_fingerprint
from bench.data.sources import DigitsSource


def test_tiny_digits_is_frozen_and_embeds():
    bb = build_backbone("tiny-digits")
    assert bb.dim == 64 and not any(p.requires_grad for p in bb.model.parameters())
    assert not bb.model.training
    x = torch.stack([bb.transform(DigitsSource("test").load(i)) for i in range(4)])
    assert x.shape == (4, 1, 8, 8)
    assert bb.model(x).shape == (4, 64)


def _digits_predictions(backbone_name: str) -> torch.Tensor:
    """Mean-imprinting (qi2018) predictions on the digits test split, support = the train split."""
    from bench.imprint import build_head

    bb = build_backbone(backbone_name)
    out = []
    for split in ("train", "test"):
        src = DigitsSource(split)
        with torch.no_grad():
            out.append(bb.model(torch.stack([bb.transform(src.load(i)) for i in range(len(src))])))
        out.append(torch.from_numpy(src.labels))
    return build_head("qi2018", out[0], out[1]).predict(out[2]), out[3]


def test_tiny_asset_is_small_and_rebuilds_as_recorded(tmp_path):
    """Bit for bit under the torch version and CPU kernels that built the asset (recorded in its
    header); elsewhere SGD rounds differently, so the rebuilt backbone must make the same
    predictions on digits (up to the odd borderline image) at the same accuracy."""
    import hashlib

    from safetensors import safe_open

    assert tiny_asset_path().stat().st_size < 300 * 1024
    out = tiny_build.build(tmp_path / "tiny.safetensors")
    with safe_open(str(tiny_asset_path()), "pt") as f:
        meta = f.metadata()
    env = tiny_build.build_environment()
    if {k: meta.get(k) for k in env} == env:
        digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (out, tiny_asset_path())]
        assert digest[0] == digest[1]
    else:
        shipped, truth = _digits_predictions("tiny-digits")
        rebuilt, _ = _digits_predictions(f"checkpoint:{out}")
        assert (shipped == rebuilt).float().mean() >= 0.99
        assert abs((shipped == truth).float().mean() - (rebuilt == truth).float().mean()) <= 0.01


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


FAMILY_CONFIGS = [
    ("timm", dict(name="timm:resnet18", weights=None), 512),
    ("timm", dict(name="timm:vit_tiny_patch16_224", weights=None, pool="token"), 192),
    ("open_clip", dict(name="openclip:RN50", weights=None), 1024),
    ("transformers", dict(name="hf:tiny-vit", weights=None, pooling="mean",
                          config={"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "intermediate_size": 64, "image_size": 32,
                                  "patch_size": 8}), 32),
]


@pytest.mark.parametrize("package, options, dim", FAMILY_CONFIGS, ids=lambda v: str(v)[:24])
def test_optional_families_build_offline_and_extract(tmp_path, package, options, dim):
    pytest.importorskip(package, reason=f"{package} is not installed (install the matching extra)")
    from bench.config import BackboneConfig
    from bench.data.sources import build_source
    from bench.extract import EmbeddingCache, extract
    from tests.helpers import write_image_folder

    cfg = BackboneConfig(**options)
    bb = build_backbone(cfg.name, **cfg.options())
    assert bb.dim == dim and len(bb.fingerprint) == 64
    src = build_source(f"imagefolder:{write_image_folder(tmp_path / 'imgs', per_class=2)}")
    entry = extract(bb, src, EmbeddingCache(tmp_path / "c"), trainer_kwargs={"enable_progress_bar": False},
                    batch_size=4)
    assert entry.embeddings.shape == (len(src), dim)
    assert torch.isfinite(entry.embeddings).all()


def test_options_that_do_not_apply_are_refused(tmp_path, monkeypatch, capsys):
    from bench.cli import main
    from bench.config import BackboneConfig

    with pytest.raises(BenchError, match="backbone.pool does not apply to tiny-digits; it applies to timm$"):
        build_backbone("tiny-digits", **BackboneConfig(name="tiny-digits", pool="avg").options())
    with pytest.raises(BenchError, match="tiny-digits takes no argument"):
        build_backbone("tiny-digits:big")
    monkeypatch.chdir(tmp_path)  # --dry-run names both, loading nothing
    assert main(["run", "--dry-run", "backbone.name=hf:x", "backbone.pool=avg"]) == 2
    assert "backbone.pool does not apply to hf:x; it applies to timm" in capsys.readouterr().err
    assert main(["run", "--dry-run", "backbone.name=vit"]) == 2
    assert "unknown backbone 'vit'; known: tiny-digits, checkpoint:<path.safetensors>" in capsys.readouterr().err


PLUGIN = """
import torch
from bench.backbones import frozen_backbone, register_backbone

@register_backbone("test-pixels", form="test-pixels:<size>", summary="raw pixels, flattened")
def pixels(size: str, transform: dict | None = None):
    side = int(size or 8)
    spec = transform or {"size": side, "channels": 1}
    return frozen_backbone(f"test-pixels:{side}", torch.nn.Flatten(), spec, side * side, "pixels")
"""


def test_a_plugin_registers_a_backbone_family_that_runs(tmp_path, monkeypatch, capsys):
    """A family in a few lines, from a plugin file: named by errors and --dry-run, and run end to
    end, where raw pixels give 1-NN on pixels (`knn` is l2/all/l2/l2/max: cosine nearest neighbour)."""
    import csv

    from bench.backbones import known_backbones
    from bench.cli import main

    (tmp_path / "my_backbones.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    common = ["plugins=[my_backbones.py]", "wandb.mode=disabled", "task.classes=[novel]", "task.shots=[1,5]",
              "task.seeds=[0]", "methods=[knn,qi2018]", "reference=null"]
    assert main(["run", "--dry-run", "backbone=test-pixels:8", *common]) == 0
    assert "backbone  test-pixels:8" in capsys.readouterr().out
    assert "test-pixels:<size>" in known_backbones()
    assert main(["run", "backbone=test-pixels:8", "backbone.pool=avg", *common]) == 2
    assert "backbone.pool does not apply to test-pixels:8" in capsys.readouterr().err
    assert main(["run", "backbone=test-pixels:8", "name=pixels", *common]) == 0
    rows = list(csv.DictReader(open(tmp_path / "runs/pixels/results.csv")))
    assert {r["backbone"] for r in rows} == {"test-pixels:8"} and len(rows) == 4
    # 1-NN by cosine on raw 8x8 digits is well above chance (0.2) at 5 shots
    assert all(float(r["acc"]) > 0.5 for r in rows if r["shots"] == "5")
