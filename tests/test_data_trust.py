"""Data that used to give a wrong number with exit code 0 (issue 20 §3): a pool split that holds
the query split, unlabelled samples scored as a class, label mappings nobody saw, two splits
that number or name their classes differently. Each is now right, or refused with one line."""

import csv
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from helpers import write_image_folder
from PIL import Image

from bench import BenchError
from bench.cli import main
from bench.data.sources import DigitsSource, build_source

TINY = "backbone.transform={size: 8, channels: 1}"  # the tiny backbone on small RGB images


def _suite(tmp_path: Path, dataset: str, queries="test", **extra) -> Path:
    fields = {"name": "t", "dataset": dataset, "classes": ["all"], "shots": [1], "queries": queries,
              "seeds": [0], **extra}
    path = tmp_path / "t.yaml"
    path.write_text(json.dumps(fields))
    return path


def _run(tmp_path, *args, methods="[knn]"):
    """`bench run` in-process: (exit code, rows, run.json)."""
    code = main(["run", f"cache_dir={tmp_path / 'cache'}", f"out_dir={tmp_path / 'runs'}", "name=r",
                 "wandb.mode=disabled", f"methods={methods}", *args])
    run_dir = tmp_path / "runs" / "r"
    rows = list(csv.DictReader(open(run_dir / "results.csv"))) if (run_dir / "results.csv").exists() else []
    record = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    return code, rows, record


def _query_labels(tmp_path, *args) -> list[list[int]]:
    """The labels of every episode's queries, as the run that `_run` made scores them."""
    from bench import pipeline
    from bench.config import load_config

    cfg = load_config(None, [f"cache_dir={tmp_path / 'cache'}", "wandb.mode=disabled", *args])
    emb = pipeline.extract_stage(cfg, require_cached=True)
    episodes = emb.suite.episodes(emb.pool.labels.numpy(), emb.queries.labels.numpy())
    return [emb.queries.labels[ep.query].tolist() for _, ep in episodes]


def _no_extraction(tmp_path):
    return not list((tmp_path / "cache").glob("*/manifest.json"))


def _images(n: int, seed: int = 0, size: int = 8) -> list[Image.Image]:
    """n distinct small grey images, brighter with the class (i % 2) so classes separate."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(np.clip(rng.normal(60 + 120 * (i % 2), 20, (size, size)), 0, 255).astype(np.uint8))
            for i in range(n)]


# -- 1. a pool that holds the queries -------------------------------------------------------


def test_a_pool_split_that_holds_the_test_split_is_refused_by_sample_id(tmp_path, monkeypatch, capsys):
    """digits 'all' holds every 'test' image: all-shot 1-NN would score 100%."""
    monkeypatch.chdir(tmp_path)
    shared = len(DigitsSource("test"))
    code, rows, _ = _run(tmp_path, "dataset.train_split=all", "task.shots=[all]", "task.seeds=[0]",
                         "task.classes=[novel]")
    err = capsys.readouterr().err
    assert code == 2 and not rows, err
    assert "'all'" in err and "'test'" in err and f"{shared} " in err and "dataset.train_split" in err
    assert _no_extraction(tmp_path)
    code, _, _ = _run(tmp_path, "dataset.train_split=test", "task.shots=[1]", "task.classes=[novel]")
    assert code == 2 and "share" in capsys.readouterr().err


def test_an_image_folder_whose_pool_holds_copies_of_the_test_images_is_refused_by_content(tmp_path, monkeypatch,
                                                                                          capsys):
    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "d" / "train", per_class=6)
    write_image_folder(tmp_path / "d" / "test", per_class=3, seed=1)
    for f in (tmp_path / "d" / "test").glob("*/*.png"):  # the same bytes under other names
        shutil.copy(f, tmp_path / "d" / "train" / f.parent.name / f"copy-{f.name}")
    code, rows, _ = _run(tmp_path, f"task={_suite(tmp_path, 'imagefolder:d')}", TINY)
    err = capsys.readouterr().err
    assert code == 2 and not rows and "9 " in err and "content" in err and _no_extraction(tmp_path), err


def test_a_hugging_face_pool_split_that_holds_the_test_rows_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    images, labels = _images(16), [i % 2 for i in range(16)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["dark", "light"])})
    everything = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    datasets.DatasetDict({"all": everything, "test": everything.select(range(12, 16))}).save_to_disk(
        str(tmp_path / "hf"))
    suite = _suite(tmp_path, f"hf:{tmp_path / 'hf'}")
    code, rows, _ = _run(tmp_path, f"task={suite}", "dataset.train_split=all", TINY)
    err = capsys.readouterr().err
    assert code == 2 and not rows and "4 " in err and "'all'" in err, err


def test_torchvision_splits_that_are_one_split_are_refused(tmp_path, monkeypatch, capsys):
    """tv:ImageNet serves its val images as 'test' and as 'val'; MNIST's train and test are apart."""
    from test_sources import _write_idx

    monkeypatch.chdir(tmp_path)
    _fake_imagenet(tmp_path / "inet", ["n1", "n3"], ["n1", "n3"])
    suite = _suite(tmp_path, "tv:ImageNet")
    code, _, _ = _run(tmp_path, f"task={suite}", f"dataset.options={{root: {tmp_path / 'inet'}}}", TINY,
                      "dataset.train_split=val")
    err = capsys.readouterr().err
    assert code == 2 and "share 6 of its 6" in err and "val/n1/0.JPEG" in err and _no_extraction(tmp_path), err

    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 2)
    args = [f"task={_suite(tmp_path, 'tv:MNIST')}", f"dataset.options={{root: {tmp_path / 'tv'}}}", TINY]
    code, _, _ = _run(tmp_path, *args, "dataset.train_split=test")
    assert code == 2 and "both 'test'" in capsys.readouterr().err and _no_extraction(tmp_path)
    code, rows, _ = _run(tmp_path, *args)  # train and test are apart
    assert code == 0 and rows


def test_synthetic_splits_that_draw_the_same_images_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    suite = _suite(tmp_path, "synthetic:20")
    code, _, _ = _run(tmp_path, f"task={suite}", "dataset.train_split=val", "dataset.options={size: 8, classes: 2}",
                      TINY)
    assert code == 2 and "20 " in capsys.readouterr().err and _no_extraction(tmp_path)


# -- 2. unlabelled samples --------------------------------------------------------------------


def test_unlabelled_hugging_face_samples_are_dropped_and_counted_never_a_class(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    images = _images(24)
    plain = [-1 if i % 6 == 5 else i % 2 for i in range(24)]  # a plain int column: -1 is no label too
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": images[:18], "label": plain[:18]}),
        "test": datasets.Dataset.from_dict({"image": images[18:], "label": plain[18:]}),
    }).save_to_disk(str(tmp_path / "plain"))
    pool = build_source(f"hf:{tmp_path / 'plain'}")
    assert pool.class_names == ["0", "1"] and pool.unlabelled == 3
    assert pool.labels.tolist() == [-1 if v == -1 else v for v in plain[:18]]
    task = f"task={_suite(tmp_path, 'hf:' + str(tmp_path / 'plain'))}"
    code, rows, record = _run(tmp_path, task, TINY)
    out = capsys.readouterr().out
    assert code == 0 and rows and record["classes"] == {"0": "0", "1": "1"}
    assert record["unlabelled"] == {"train": 3, "test": 1}
    assert "3 of 18" in out and "no label" in out
    # the 5 labelled test images are the queries, the unlabelled one is none of them
    assert [sorted(q) for q in _query_labels(tmp_path, task, TINY)] == [[0, 0, 0, 1, 1]]

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    datasets.Dataset.from_dict({"image": images[:4], "label": [0, -1, 1, 1]}, features=features).save_to_disk(
        str(tmp_path / "classlabel"))
    source = build_source(f"hf:{tmp_path / 'classlabel'}")
    assert source.labels.tolist() == [0, -1, 1, 1] and source.unlabelled == 1 and source.class_names == ["a", "b"]


def test_a_test_split_without_any_label_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    images = _images(16)
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": images[:12], "label": [i % 2 for i in range(12)]}),
        "test": datasets.Dataset.from_dict({"image": images[12:], "label": [-1] * 4}),
    }).save_to_disk(str(tmp_path / "hf"))
    code, _, _ = _run(tmp_path, f"task={_suite(tmp_path, 'hf:' + str(tmp_path / 'hf'))}", TINY)
    err = capsys.readouterr().err
    assert code == 2 and "no label" in err and "queries: holdout" in err and _no_extraction(tmp_path), err


def test_missing_labels_and_other_negative_or_multi_labels(tmp_path):
    images = _images(4)
    datasets.Dataset.from_dict({"image": images, "label": [0, None, 1, 1]}).save_to_disk(str(tmp_path / "none"))
    source = build_source(f"hf:{tmp_path / 'none'}")
    assert source.labels.tolist() == [0, -1, 1, 1] and source.unlabelled == 1
    datasets.Dataset.from_dict({"image": images, "label": [0, -5, 1, 1]}).save_to_disk(str(tmp_path / "neg"))
    with pytest.raises(BenchError, match="-5"):
        build_source(f"hf:{tmp_path / 'neg'}")
    datasets.Dataset.from_dict({"image": images, "label": [[0, 1], [1, 0], [1, 1], [0, 0]]}).save_to_disk(
        str(tmp_path / "multi"))
    with pytest.raises(BenchError, match="one label per sample"):
        build_source(f"hf:{tmp_path / 'multi'}")
    datasets.Dataset.from_dict({"image": images, "label": [0.0, 1.0, 1.0, 0.0]}).save_to_disk(str(tmp_path / "float"))
    with pytest.raises(BenchError, match="ints or strings"):
        build_source(f"hf:{tmp_path / 'float'}")


# -- 3. string and large labels: the mapping is recorded and printed, unseen labels left out -------------


@pytest.mark.parametrize("values, unseen", [(["zebra", "ant"], "yak"), ([3_000_000_000, 0], 7)],
                         ids=["strings", "huge-ints"])
def test_remapped_labels_are_recorded_printed_and_an_unseen_label_is_left_out(tmp_path, monkeypatch, capsys,
                                                                           values, unseen):
    monkeypatch.chdir(tmp_path)
    images = _images(24)
    train = [values[i % 2] for i in range(16)]
    test = [values[i % 2] for i in range(6)] + [unseen, unseen]
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": images[:16], "label": train}),
        "test": datasets.Dataset.from_dict({"image": images[16:], "label": test}),
    }).save_to_disk(str(tmp_path / "hf"))
    task = f"task={_suite(tmp_path, 'hf:' + str(tmp_path / 'hf'))}"
    code, rows, record = _run(tmp_path, task, TINY)
    out = capsys.readouterr().out
    names = sorted(values)
    assert code == 0 and rows
    assert record["classes"] == {"0": str(names[0]), "1": str(names[1])}
    assert record["dropped_query_classes"] == [str(unseen)]
    assert f"0 = {names[0]}" in out and f"1 = {names[1]}" in out and str(unseen) in out
    assert [sorted(q) for q in _query_labels(tmp_path, task, TINY)] == [[0, 0, 0, 1, 1, 1]]  # not the unseen


def test_class_labels_named_in_another_order_by_the_test_split_keep_their_class(tmp_path, monkeypatch):
    from bench import pipeline
    from bench.config import load_config

    monkeypatch.chdir(tmp_path)
    images = _images(20)
    train = datasets.Dataset.from_dict({"image": images[:12], "label": [i % 2 for i in range(12)]},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "label": datasets.ClassLabel(names=["a", "b"])}))
    # the test split names b first and has an unlabelled image: a is 1 there, b is 0
    test = datasets.Dataset.from_dict({"image": images[12:], "label": [1, 0, 1, 0, 1, 0, 1, -1]},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "label": datasets.ClassLabel(names=["b", "a"])}))
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "hf"))
    cfg = load_config(None, [f"task={_suite(tmp_path, 'hf:' + str(tmp_path / 'hf'))}", TINY, "wandb.mode=disabled",
                             f"cache_dir={tmp_path / 'cache'}"])
    emb = pipeline.extract_stage(cfg)
    # a stays 0 and b stays 1 in the pool's numbering; the unlabelled image stays unlabelled
    assert emb.queries.labels.tolist() == [0, 1, 0, 1, 0, 1, 0, -1]


def _fake_imagenet(root: Path, train: list[str], val: list[str]) -> None:
    """torchvision's ImageNet layout: meta.bin and <split>/<wnid>/<image>.JPEG."""
    wnid_to_classes = {"n1": ("crane",), "n2": ("crane", "construction crane"), "n3": ("goldfish",), "n4": ("emu",)}
    root.mkdir(parents=True)
    torch.save((wnid_to_classes, []), root / "meta.bin")
    for split, wnids in (("train", train), ("val", val)):
        for c, wnid in enumerate(wnids):
            (root / split / wnid).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (40 * c, 10 * i, 0)).save(root / split / wnid / f"{i}.JPEG")


def test_torchvision_classes_with_one_name_stay_two_classes(tmp_path):
    """ImageNet names two classes 'crane' (the bird and the machine). With a val copy that lacks a
    class, the splits are matched by name: each crane must keep its own id."""
    from bench.extract.cache import CacheEntry
    from bench.pipeline import align_query_labels

    _fake_imagenet(tmp_path / "inet", ["n1", "n2", "n3", "n4"], ["n1", "n2", "n3"])
    pool = build_source("tv:ImageNet", split="train", root=str(tmp_path / "inet"))
    queries = build_source("tv:ImageNet", split="test", root=str(tmp_path / "inet"))
    assert len(set(pool.class_names)) == 4 and pool.class_names[:2] != ["crane", "crane"]
    entry = CacheEntry(Path("."), {"class_names": queries.class_names}, torch.zeros(len(queries), 1),
                       torch.from_numpy(queries.labels), torch.arange(len(queries)))
    pool_entry = CacheEntry(Path("."), {"class_names": pool.class_names}, torch.zeros(len(pool), 1),
                            torch.from_numpy(pool.labels), torch.arange(len(pool)))
    aligned, dropped = align_query_labels(pool_entry, entry)
    assert aligned.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and dropped == []


def test_class_names_given_twice_are_refused_where_splits_are_matched_by_name(tmp_path):
    from bench.data.sources import Source

    with pytest.raises(BenchError, match="'crane'.*twice|twice.*'crane'"):
        Source("x", "train", np.array([0, 1]), ["crane", "crane"])
    with pytest.raises(BenchError, match="outside"):
        Source("x", "train", np.array([0, 2]), ["a", "b"])


def test_changed_torchvision_labels_are_a_new_cache_entry(tmp_path, monkeypatch):
    """A torchvision copy replaced by another of the same size (e.g. corrected labels) must not be
    served from the old entry with the old labels."""
    from test_sources import _write_idx

    from bench.backbones import build_backbone
    from bench.extract import EmbeddingCache, extract

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):  # torchvision looks for both splits' files
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (10, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(10) % 2)
    tiny = build_backbone("tiny-digits", transform={"size": 8, "channels": 1})
    cache = EmbeddingCache(tmp_path / "cache")
    first = extract(tiny, build_source("tv:MNIST", split="test", root=str(tmp_path)), cache,
                    trainer_kwargs={"enable_progress_bar": False})
    _write_idx(raw / "t10k-labels-idx1-ubyte", (np.arange(10) + 1) % 2)
    second = extract(tiny, build_source("tv:MNIST", split="test", root=str(tmp_path)), cache,
                     trainer_kwargs={"enable_progress_bar": False})
    assert first.path != second.path and second.labels.tolist() == [(i + 1) % 2 for i in range(10)]


def test_diagnostics_read_query_split_images_by_the_pool_class_ids(tmp_path, monkeypatch):
    """The test split numbers dog 0 and emu 1, the pool dog 1 and emu 2: geometric complexity of
    classes [1, 2] must be measured on the test split's dog and emu images, not on emu alone."""
    from bench.backbones import build_backbone
    from bench.config import load_config
    from bench.diagnostics.diagnose import diagnose, gc_for

    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "d" / "train", classes=("cat", "dog", "emu"), per_class=4)
    write_image_folder(tmp_path / "d" / "test", classes=("dog", "emu"), per_class=4, seed=1)
    cfg = load_config(None, [f"task={_suite(tmp_path, 'imagefolder:d', classes=[[1, 2]])}", TINY,
                             "wandb.mode=disabled", f"cache_dir={tmp_path / 'cache'}"])
    result = diagnose(cfg, [cfg.backbone], ["qi2018"], gc_samples=8, gc_probes=2)
    test = build_source("imagefolder:d", split="test")
    expected = gc_for(build_backbone("tiny-digits", transform={"size": 8, "channels": 1}), test, [0, 1], 8, 2)
    row = result["diagnostics"][0]
    assert row["num_samples"] == 8 and row["gc"] == pytest.approx(expected["gc"])


def test_image_folder_images_it_does_not_read_are_said(tmp_path):
    """A class folder beside the split folders, and images one folder down in a class folder,
    are not read; each is a note (printed and in run.json), not a silent gap."""
    write_image_folder(tmp_path / "d" / "train", per_class=3)
    write_image_folder(tmp_path / "d" / "test", per_class=2, seed=1)
    write_image_folder(tmp_path / "d", classes=("fox",), per_class=2)  # beside train/ and test/
    write_image_folder(tmp_path / "d" / "train" / "cat", classes=("kittens",), per_class=2)
    source = build_source(f"imagefolder:{tmp_path / 'd'}")
    assert len(source) == 9 and source.class_names == ["cat", "dog", "emu"]
    assert any("['fox']" in n and "not read" in n for n in source.notes)
    assert any("['cat']" in n and "subfolders" in n for n in source.notes)


def test_episode_data_modules_refuse_splits_that_name_classes_differently_until_matched(tmp_path):
    """ImprintingModule's image path: a test split numbering dog 0 and emu 1 (the pool: 1 and 2)
    is refused, and once matched by name its queries carry the pool's ids."""
    from bench.data.datamodules import ImageEpisodeDataModule
    from bench.data.episodes import sample_episode
    from bench.data.splits import align_query_source

    write_image_folder(tmp_path / "d" / "train", classes=("cat", "dog", "emu"), per_class=4)
    write_image_folder(tmp_path / "d" / "test", classes=("dog", "emu", "fox"), per_class=2, seed=1)
    pool, test = build_source(f"imagefolder:{tmp_path / 'd'}"), build_source(f"imagefolder:{tmp_path / 'd'}", "test")
    raw = sample_episode(pool.labels, [1, 2], 1, "test", seed=0, test_labels=test.labels)
    with pytest.raises(BenchError, match="names its classes differently"):
        ImageEpisodeDataModule(pool, test, raw, lambda img: torch.zeros(1))
    matched, dropped = align_query_source(pool, test)
    assert dropped == ["fox"] and matched.labels.tolist() == [1, 1, 2, 2, -1, -1]
    ep = sample_episode(pool.labels, [1, 2], 1, "test", seed=0, test_labels=matched.labels)
    dm = ImageEpisodeDataModule(pool, matched, ep, lambda img: torch.zeros(1))
    labels = torch.cat([batch[1] for batch in dm.test_dataloader()])
    assert labels.tolist() == [1, 1, 2, 2] and test.labels.tolist() == [0, 0, 1, 1, 2, 2]  # the source is untouched
