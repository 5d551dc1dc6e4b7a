"""Zero-shot text heads and Tip-Adapter: identities against direct computations, the text cache,
refusals, and a run with a random-init open_clip model (no download, no network)."""

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from bench import BenchError
from bench.backbones.base import TextTower, weights_fingerprint
from bench.backbones.registry import build_backbone
from bench.cli import main
from bench.imprint import SupportSet, build_head_grid, score_heads
from bench.text import class_text_embeddings, templates_for
from bench.text.cache import TextCache, key_fields
from tests.helpers import write_image_folder

# A tiny random open_clip model: open_clip's own tokenizer (49408 tokens), one layer per tower.
TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
TINY_HF_CLIP = {
    "model_type": "clip", "projection_dim": 24,
    "text_config": {"vocab_size": 16, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": 1, "eos_token_id": 2,
                    "pad_token_id": 0},
    "vision_config": {"image_size": 32, "patch_size": 16, "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 1, "num_attention_heads": 2},
}
TEMPLATES = ["a photo of a {c}.", "a blurry photo of the {c}.", "art of a {c}."]
NAMES = ["cat", "dog", "emu"]


def _direct(encode, names, templates):
    """CLIP's zero-shot weights written out: per class, normalise each prompt, average, normalise."""
    rows = []
    for name in names:
        emb = encode([t.replace("{c}", name) for t in templates]).float()
        mean = (emb / emb.norm(dim=-1, keepdim=True)).mean(0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


def _zeroshot_proxies(text):
    """The zeroshot head's class weights, built as a 0-shot episode (no support samples)."""
    support = SupportSet(torch.zeros(0, text.shape[1]), torch.zeros(0, dtype=torch.long),
                         classes=torch.arange(len(text)), text=text)
    return build_head_grid(["zeroshot"], [support])[0][0].proxies


def test_zeroshot_head_equals_the_direct_computation_open_clip(tmp_path):
    import open_clip

    torch.manual_seed(0)
    backbone = build_backbone("openclip:bench-tiny-test", weights=None, config=TINY_CLIP)
    torch.manual_seed(0)  # the same random weights, built by open_clip directly
    model = open_clip.create_model("bench-tiny-test").eval()
    assert weights_fingerprint(model) == backbone.text.fingerprint and backbone.dim == 32
    tokenizer = open_clip.get_tokenizer("bench-tiny-test")
    with torch.no_grad():
        want = _direct(lambda texts: model.encode_text(tokenizer(texts)), NAMES, TEMPLATES)
    got = _zeroshot_proxies(class_text_embeddings(backbone.text, NAMES, TEMPLATES, tmp_path))
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_backbone_parameters_count_the_image_tower_alone_in_both_families(tmp_path):
    """run.json's backbone_parameters: the image tower, not the joint model, for open_clip and HF CLIP alike."""
    from bench.provenance import parameter_count

    clip = build_backbone("openclip:bench-tiny-test", weights=None, config=TINY_CLIP)
    joint = clip.text.model
    assert parameter_count(clip.model) == sum(p.numel() for p in joint.visual.parameters())
    assert parameter_count(clip.model) < sum(p.numel() for p in joint.parameters())
    hf = build_backbone("hf:tiny-clip", weights=None, config=TINY_HF_CLIP, tokenizer=tiny_tokenizer(tmp_path / "tok"))
    model = hf.model.model  # the image embedder wraps the whole joint model
    image = [*model.vision_model.parameters(), *model.visual_projection.parameters()]
    assert parameter_count(hf.model) == sum(p.numel() for p in image)
    assert parameter_count(hf.model) < sum(p.numel() for p in model.parameters())
    # BLIP-2 has both feature methods, but its Q-Former and language model are no image tower
    from transformers import AutoConfig, AutoModel

    from bench.backbones.families import _HFImageFeatures

    layer = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    blip2 = AutoModel.from_config(AutoConfig.for_model(
        model_type="blip-2", num_query_tokens=2, vision_config={**layer, "image_size": 32, "patch_size": 16},
        qformer_config={**layer, "encoder_hidden_size": 16, "vocab_size": 20},
        text_config={"model_type": "opt", "hidden_size": 16, "ffn_dim": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "vocab_size": 20, "word_embed_proj_dim": 16,
                     "max_position_embeddings": 32}))
    assert parameter_count(_HFImageFeatures(blip2)) == sum(p.numel() for p in blip2.vision_model.parameters())


def tiny_tokenizer(folder):
    """A word-level tokenizer for TINY_HF_CLIP's 16 tokens, saved where transformers loads it offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "a", "photo", "of", "the", "blurry", "art", *NAMES, "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
                            eos_token="[EOS]").save_pretrained(folder)
    return str(folder)


def test_zeroshot_head_equals_the_direct_computation_hf_clip(tmp_path):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tiny_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    backbone = build_backbone("hf:tiny-clip", weights=None, config=TINY_HF_CLIP, tokenizer=str(tmp_path / "tok"))
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.for_model(**TINY_HF_CLIP)).eval()
    joint = backbone.model.model.state_dict()  # the image embedder wraps the whole joint model
    assert all(torch.equal(v, joint[k]) for k, v in model.state_dict().items()) and backbone.dim == 24
    assert backbone.text.fingerprint == backbone.fingerprint
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "tok")

    def encode(texts):
        enc = hf_tok(texts, padding=True, return_tensors="pt")
        out = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    with torch.no_grad():
        want = _direct(encode, NAMES, TEMPLATES)
        images = torch.rand(2, 3, 32, 32)
        feats = model.get_image_features(pixel_values=images)
        feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
        assert torch.allclose(backbone.model(images), feats, atol=1e-6)  # images embed in the joint space
    got = _zeroshot_proxies(class_text_embeddings(backbone.text, NAMES, TEMPLATES, tmp_path))
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha, beta", [(1.0, 5.5), (2.0, 3.0)])
def test_tip_adapter_logits_equal_the_formula(alpha, beta):
    gen = torch.Generator().manual_seed(0)
    classes, shots, dim = 4, 3, 16
    support = torch.randn(classes * shots, dim, generator=gen)
    labels = torch.arange(classes).repeat_interleave(shots)
    text = F.normalize(torch.randn(classes, dim, generator=gen), dim=-1)
    queries = torch.randn(10, dim, generator=gen)
    ep = SupportSet(support, labels, text=text)
    tip, cache = build_head_grid([f"l2/tip/l2/l2/tip:alpha={alpha},beta={beta}", f"l2/all/none/l2/cache:beta={beta}"],
                                 [ep])
    got_tip, got_cache = score_heads([tip[0], cache[0]], queries)
    # Zhang et al. 2022, training-free: logits = 100 f W^T + alpha exp(-beta (1 - f F^T)) L
    q, keys = F.normalize(queries, dim=-1), F.normalize(support, dim=-1)
    affinity = torch.exp(-beta * (1 - q @ keys.T))
    values = F.one_hot(labels, classes).float()
    assert torch.allclose(got_tip, 100 * q @ text.T + alpha * affinity @ values, atol=1e-4, rtol=1e-6)
    assert torch.allclose(got_cache, affinity @ values, atol=1e-5, rtol=1e-6)


def test_tip_needs_its_own_agg_and_text():
    from bench.imprint import MethodSpec

    with pytest.raises(BenchError, match="needs GEN 'tip'"):
        MethodSpec.parse("l2/all/none/l2/tip")
    with pytest.raises(BenchError, match="text embeddings"):
        build_head_grid(["tip"], [SupportSet(torch.randn(4, 8), torch.tensor([0, 0, 1, 1]))])


def test_text_cache_is_keyed_by_class_names_and_templates(tmp_path):
    calls = []

    def encode(texts):
        calls.append(len(texts))
        return torch.stack([torch.tensor([float(len(t)), float(t.count("a")), 1.0]) for t in texts])

    tower = TextTower(encode, "tok", "weights")
    stats = {}
    first = class_text_embeddings(tower, NAMES, TEMPLATES, tmp_path, stats)
    assert not stats["from_cache"] and calls == [9]
    again = class_text_embeddings(tower, NAMES, TEMPLATES, tmp_path, stats)
    assert stats["from_cache"] and calls == [9] and torch.equal(first, again)
    class_text_embeddings(tower, NAMES, TEMPLATES[:2], tmp_path, stats)  # other templates: a miss
    assert not stats["from_cache"] and calls == [9, 6]
    class_text_embeddings(tower, ["cat", "dog", "owl"], TEMPLATES, tmp_path, stats)  # other names: a miss
    assert not stats["from_cache"] and calls == [9, 6, 9]
    other = TextTower(encode, "another-tokenizer", "weights")
    class_text_embeddings(other, NAMES, TEMPLATES, tmp_path, stats)
    assert not stats["from_cache"]
    assert len(list((tmp_path / "text").glob("*.safetensors"))) == 4
    assert not list((tmp_path / "text").glob(".*"))  # no temporary file left behind
    path, _ = TextCache(tmp_path).path(key_fields(tower, NAMES, TEMPLATES))
    assert path.is_file()


def test_template_sets_follow_the_dataset():
    assert len(templates_for(None, "tv:ImageNet")[1]) == 80
    assert templates_for(None, "tv:OxfordIIITPet") == ("pets", ["a photo of a {c}, a type of pet."])
    assert templates_for(None, "hf:clip-benchmark/wds_vtab-eurosat")[0] == "eurosat"
    assert templates_for(None, "imagefolder:/data/x", "my-task")[0] == "imagenet"  # unknown: CLIP's 80
    assert templates_for(["{c} here"], "tv:CIFAR10") == ("custom", ["{c} here"])


def test_a_backbone_without_text_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BenchError, match="tiny-digits has no text tower"):
        class_text_embeddings(build_backbone("tiny-digits"), NAMES, TEMPLATES, None)
    for extra in (["--dry-run"], []):
        code = main(["run", *extra, "methods=[qi2018,zeroshot]", f"cache_dir={tmp_path / 'c'}",
                     f"out_dir={tmp_path / 'runs'}", "wandb.mode=disabled"])
        err = capsys.readouterr().err
        assert code == 2 and "has no text tower" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()  # nothing extracted


LATE_TEXT_PLUGIN = """
import torch
from bench.backbones import frozen_backbone, register_backbone

# like a hub model: whether it has a text tower is known only once it is built (text=None)
@register_backbone("test-late-text", summary="raw pixels; text tower unknown until built",
                   text=lambda arg, options: None)
def late(arg: str = "", transform: dict | None = None):
    return frozen_backbone("test-late-text", torch.nn.Flatten(), transform or {"size": 8, "channels": 1}, 64, "pixels")
"""


def test_a_backbone_known_to_lack_text_only_once_built_is_refused_before_extraction(tmp_path, monkeypatch, capsys):
    """A hub model shows its text tower only once loaded: the run stops then, before embedding an image."""
    (tmp_path / "late_text.py").write_text(LATE_TEXT_PLUGIN)
    monkeypatch.chdir(tmp_path)
    code = main(["run", "plugins=[late_text.py]", "backbone=test-late-text", "methods=[qi2018,zeroshot]",
                 f"cache_dir={tmp_path / 'c'}", f"out_dir={tmp_path / 'runs'}", "wandb.mode=disabled"])
    err = capsys.readouterr().err
    assert code == 2 and "test-late-text has no text tower" in err and "Traceback" not in err
    assert not list((tmp_path / "c").rglob("*.safetensors"))  # nothing was embedded


def test_a_run_gives_zeroshot_at_0_shots_and_tip_at_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "imgs", per_class=6)
    task = {"name": "pets-like", "dataset": f"imagefolder:{tmp_path / 'imgs'}", "classes": ["all"],
            "shots": [0, 2], "queries": 2, "validation": 1, "seeds": [0, 1],
            "templates": ["a photo of a {c}.", "a {c}."]}  # the task's own prompts
    (tmp_path / "task.yaml").write_text(json.dumps(task))
    config = {"backbone": {"name": "openclip:bench-tiny-run", "weights": None, "config": TINY_CLIP},
              "task": str(tmp_path / "task.yaml"),
              "methods": ["zeroshot", "tip", "tip-cache", "logreg", "dinov2-knn", "qi2018", "l2/kmeans:k=[1,2]/l2/l2/max"],
              "select": ["tip"],
              "text": {"class_names": {"0": "tabby cat"}},
              "cache_dir": str(tmp_path / "cache"), "out_dir": str(tmp_path / "runs"), "name": "r",
              "wandb": {"mode": "disabled"}, "extract": {"batch_size": 8, "num_workers": 0}}
    (tmp_path / "run.yaml").write_text(json.dumps(config))
    assert main(["run", "-c", str(tmp_path / "run.yaml")]) == 0
    with open(tmp_path / "runs" / "r" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    at = {s: {r["method"] for r in rows if r["shots"] == s} for s in ("0", "2")}
    assert at["0"] == {"zeroshot"}  # only the support-free head at 0 shots
    assert {"zeroshot", "tip", "tip-cache", "logreg", "dinov2-knn", "qi2018", "tip@val", "tip@oracle"} <= at["2"]
    # the tip family's 16 settings are in the results, marked as members; the report shows the family's rows only
    members = {r["method"] for r in rows if r["selection"] == "member"}
    assert len(members) == 15 and all(m.startswith("l2/tip/l2/l2/tip:") for m in members)  # the 16th is `tip`
    report = (tmp_path / "runs" / "r" / "report" / "report.md").read_text()
    assert "tip@val" in report and not any(m in report for m in members)
    free = {r["method"]: r["training_free"] for r in rows}
    assert free["logreg"] == "False" and free["dinov2-knn"] == free["tip"] == "True"
    picked = [r for r in rows if r["method"] == "tip@val"]
    assert len(picked) == 2 and all(r["selected"].startswith("l2/tip/l2/l2/tip:") for r in picked)
    zs = [r for r in rows if r["method"] == "zeroshot"]
    assert len(zs) == 4 and all(0 <= float(r["acc"]) <= 1 and r["training_free"] == "True" for r in zs)
    (cached,) = (tmp_path / "cache" / "text").glob("*.safetensors")  # the text cache, keyed by what made it
    from safetensors import safe_open

    with safe_open(str(cached), framework="pt") as f:
        key = json.loads(f.metadata()["key"])
    assert key["class_names"] == ["tabby cat", "dog", "emu"] and key["templates"] == ["a photo of a {c}.", "a {c}."]
    # the report's accuracy-vs-shots axis starts at the 0-shot point
    from bench.report.stats import ordered_shots

    assert ordered_shots(r["shots"] for r in rows) == ["0", "2"]
    assert (tmp_path / "runs" / "r" / "report" / "report.html").is_file()


def test_an_image_only_hf_model_has_no_text_tower_and_keeps_cls_pooling():
    config = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 64, "image_size": 32, "patch_size": 16}
    backbone = build_backbone("hf:tiny-vit", weights=None, config=config)
    assert backbone.text is None and backbone.layer == "pooling=cls"
    with pytest.raises(BenchError, match="hf:tiny-vit has no text tower"):
        class_text_embeddings(backbone, NAMES, TEMPLATES, None)
    with pytest.raises(BenchError, match="pooling does not apply"):
        build_backbone("hf:tiny-clip", weights=None, config=TINY_HF_CLIP, pooling="mean")


def test_dry_run_names_the_prompts_and_counts_0_shot_heads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--dry-run", "backbone.name=openclip:ViT-B-32", "methods=[zeroshot,qi2018]",
                 "task.shots=[0,1]", "wandb.mode=disabled"]) == 0
    out = capsys.readouterr().out
    # digits-base-novel: 2 class subsets x 3 seeds x (1 head at 0 shots + 2 at 1 shot)
    assert "heads     18" in out and "1 prompt template (digits) per class for zeroshot" in out
    # a task's own templates are the ones the run uses, and the dry run says so
    task = {"name": "own-prompts", "dataset": "digits", "classes": ["all"], "shots": [0], "queries": "test",
            "seeds": [0], "templates": ["a photo of a {c}.", "a {c}."]}
    (tmp_path / "task.yaml").write_text(json.dumps(task))
    assert main(["run", "--dry-run", "backbone.name=openclip:ViT-B-32", "methods=[zeroshot]",
                 f"task={tmp_path / 'task.yaml'}", "wandb.mode=disabled"]) == 0
    assert "2 prompt templates (custom) per class for zeroshot" in capsys.readouterr().out


def test_0_shot_heads_refuse_what_needs_support():
    text = F.normalize(torch.randn(3, 8), dim=-1)
    empty = SupportSet(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), classes=torch.arange(3), text=text)
    for spec in ("qi2018", "none/zeroshot/none/center-l2/max"):
        with pytest.raises(BenchError, match="need support samples"):
            build_head_grid([spec], [empty])
    assert torch.allclose(_zeroshot_proxies(text), text)


def test_wandb_plots_start_at_the_0_shot_point(tmp_path, monkeypatch):
    from bench.report.wandb_log import log_bench_run
    from tests.helpers import make_rows, make_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    rows = [r for r in make_rows(seeds=(0, 1)) if r["shots"] != "all"]  # numeric shots: x is the shot count
    zero = [{**r, "shots": "0", "method": "zeroshot", "spec": "none/zeroshot/none/l2/max", "gen": "zeroshot"}
            for r in rows if r["method"] == rows[0]["method"] and r["shots"] == rows[0]["shots"]]
    rows = zero + rows
    run_dir = make_run(tmp_path / "runs" / "wb", rows, config={"task": "tiny-suite"})
    log_bench_run(rows, {"task": "tiny-suite"}, "wb", run_dir, mode="offline")
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    tables = [json.loads(p.read_text()) for p in (folder / "files" / "media" / "table").rglob("*acc_vs_shots*.json")]
    assert tables, sorted(str(p) for p in (folder / "files").rglob("*.json"))
    xs = {float(row[t["columns"].index("step")]) for t in tables for row in t["data"]}
    assert sorted(xs) == [0.0, 1.0, 5.0]  # the zero-shot point is the first on the accuracy-vs-shots chart


def test_an_image_only_hf_config_is_refused_in_the_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    vit = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 64, "image_size": 32, "patch_size": 16}
    for config, code in ((vit, 2), (TINY_HF_CLIP, 0)):
        (tmp_path / "c.yaml").write_text(json.dumps({"backbone": {"name": "hf:m", "weights": None, "config": config},
                                                     "methods": ["zeroshot"], "wandb": {"mode": "disabled"}}))
        assert main(["run", "--dry-run", "-c", str(tmp_path / "c.yaml")]) == code
        err = capsys.readouterr().err
        assert ("hf:m has no text tower" in err) == (code == 2) and "Traceback" not in err
