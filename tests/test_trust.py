"""Inputs that used to give a wrong number with exit code 0, or a traceback: each is now
either right or refused with one clear line."""

import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from helpers import write_image_folder
from PIL import Image

from bench import BenchError
from bench.cli import main
from bench.data.sources import build_source
from bench.data.tasks import TaskSuite
from bench.imprint import ImprintedHead, build_head

TINY = "backbone.transform={size: 8, channels: 1}"  # the tiny backbone on small RGB images


def _suite(tmp_path: Path, dataset: str, queries="test", **extra) -> Path:
    fields = {"name": "t", "dataset": dataset, "classes": ["all"], "shots": [1, 3], "queries": queries,
              "seeds": [0, 1], **extra}
    path = tmp_path / "t.yaml"
    path.write_text(json.dumps(fields))
    return path


def _run(tmp_path, *args):
    """`bench run` in-process: (exit code, stderr, rows, run.json)."""
    code = main(["run", f"cache_dir={tmp_path / 'cache'}", f"out_dir={tmp_path / 'runs'}", "name=r",
                 "wandb.mode=disabled", "methods=[qi2018,knn]", *args])
    run_dir = tmp_path / "runs" / "r"
    rows = list(csv.DictReader(open(run_dir / "results.csv"))) if (run_dir / "results.csv").exists() else []
    record = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    return code, rows, record


def test_image_folder_without_a_test_split_refuses_test_queries_and_holds_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "flat", per_class=10)
    suite = _suite(tmp_path, "imagefolder:flat")
    code, rows, _ = _run(tmp_path, f"task={suite}", TINY)
    err = capsys.readouterr().err
    assert code == 2 and "no 'test' split" in err and "queries: holdout" in err and not rows
    assert not list((tmp_path / "cache").glob("*/manifest.json"))  # refused before any extraction

    code, rows, record = _run(tmp_path, f"task={suite}", "task.queries=holdout", TINY)
    assert code == 0 and record["complete"] and len(rows) == 2 * 2 * 2
    # the held-out queries are the same for every episode and never anyone's support
    labels = build_source("imagefolder:flat").labels
    episodes = [ep for _, ep in TaskSuite.build(json.loads(suite.read_text()) | {"queries": "holdout"}).episodes(labels)]
    queries = {tuple(ep.query) for ep in episodes}
    assert len(queries) == 1
    held = set(episodes[0].query.tolist())
    assert held and all(not held & set(ep.support.tolist()) for ep in episodes)


def test_holdout_is_the_same_on_two_processes(tmp_path):
    write_image_folder(tmp_path / "flat", per_class=10)
    suite = _suite(tmp_path, "imagefolder:flat", queries="holdout")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["WANDB_MODE"] = "disabled"
    common = [sys.executable, "-m", "bench.cli", "run", f"task={suite}", TINY, "methods=[qi2018,westerhoff2025,knn]",
              "cache_dir=cache", "out_dir=runs"]
    for name, extra in (("one", []), ("two", ["trainer.devices=2"])):
        proc = subprocess.run(common + [f"name={name}", *extra], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]

    def rows(name):
        return [{k: v for k, v in r.items() if k != "gen_time_s"} for r in csv.DictReader(open(tmp_path / "runs" / name / "results.csv"))]

    assert rows("one") == rows("two") and len(rows("one")) == 2 * 2 * 3


def test_hf_dataset_saved_without_splits_refuses_a_test_split(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = build_source("imagefolder:" + str(write_image_folder(tmp_path / "img", per_class=8)))
    datasets.Dataset.from_dict({"image": [str(f) for f in folder.files], "label": folder.labels.tolist()},
                               features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(
                                   names=folder.class_names)})).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(BenchError, match="saved without splits"):
        build_source(f"hf:{tmp_path / 'saved'}", split="test")
    suite = _suite(tmp_path, "hf:" + str(tmp_path / "saved"), queries="holdout")
    code, rows, _ = _run(tmp_path, f"task={suite}", TINY)
    assert code == 0 and rows


def test_splits_with_different_classes_are_matched_by_name(tmp_path, monkeypatch, capsys):
    """train has cat, dog, emu; test has dog, emu, fox: the test split numbers dog 0, the pool 1.
    Queries must keep their class (accuracy stays perfect on these separable colours), and fox,
    absent from the pool, is dropped and listed."""
    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "d" / "train", classes=("cat", "dog", "emu"), per_class=8)
    test_root = tmp_path / "d" / "test"
    write_image_folder(test_root, classes=("cat", "dog", "emu"), per_class=4, seed=1)
    (test_root / "cat").rename(test_root / "fox")  # a class the pool lacks; test ids: dog 0, emu 1, fox 2
    suite = _suite(tmp_path, "imagefolder:d", classes=[[1, 2]])
    code, rows, record = _run(tmp_path, f"task={suite}", TINY)
    assert code == 0, capsys.readouterr().err
    assert record["classes"] == {"0": "cat", "1": "dog", "2": "emu"} and record["dropped_query_classes"] == ["fox"]
    assert all(float(r["acc"]) == 1.0 for r in rows) and {"acc_class_1", "acc_class_2"} <= set(rows[0])
    assert "fox" in capsys.readouterr().out


def test_sparse_huge_and_string_labels_are_remapped_not_expanded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images = [np.full((8, 8), 40 * (i % 2) + 60, np.uint8) for i in range(12)]
    for name, values in (("huge", [0, 3_000_000_000]), ("text", ["zebra", "ant"])):
        labels = [values[i % 2] for i in range(12)]
        datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in images], "label": labels}).save_to_disk(
            str(tmp_path / name))
        source = build_source(f"hf:{tmp_path / name}")
        assert source.class_names == sorted(str(v) for v in values)
        assert set(source.labels.tolist()) == {0, 1}
        suite = _suite(tmp_path, "hf:" + str(tmp_path / name), queries="holdout")
        code, rows, record = _run(tmp_path, f"task={suite}")
        assert code == 0 and rows and record["classes"] == {"0": sorted(map(str, values))[0], "1": sorted(map(str, values))[1]}
    datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in images[:2]], "label": [0, -1]},
                               features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(
                                   names=["a", "b"])})).save_to_disk(str(tmp_path / "neg"))
    neg = build_source(f"hf:{tmp_path / 'neg'}")  # -1 is no label: left out, never a class
    assert neg.labels.tolist() == [0, -1] and neg.class_names == ["a", "b"] and neg.unlabelled == 1


def test_hidden_and_empty_class_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = write_image_folder(tmp_path / "d" / "train", classes=("cat", "dog", "emu"), per_class=6)
    write_image_folder(tmp_path / "d" / "test", classes=("cat", "dog", "emu"), per_class=3, seed=1)
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (12, 12)).save(root / ".ipynb_checkpoints" / "x.png")
    for f in (root / "emu").iterdir():
        f.unlink()  # emu: empty in the pool, present in the test split
    source = build_source("imagefolder:d")
    assert source.class_names == ["cat", "dog"] and any("emu" in n for n in source.notes)
    code, rows, record = _run(tmp_path, f"task={_suite(tmp_path, 'imagefolder:d')}", TINY)
    assert code == 0 and record["dropped_query_classes"] == ["emu"]
    assert any("emu" in n and "holds no images" in n for n in record["notes"])


def test_duplicate_seeds_or_shots_and_a_mismatched_dataset_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for override, words in (("task.seeds=[0,0]", "listed more than once"), ("task.shots=[5,5]", "listed more than once"),
                            ("dataset.name=imagefolder:/data/x", "is for dataset 'digits'"),
                            ("task.shots=[]", "no shot count(s) given"), ("task.seeds=[]", "no seed(s) given"),
                            ("task.classes=[[0,0,1]]", "must list each class id once"),
                            ("reference=foo", "reference: unknown class subset 'foo'"),
                            ("task.classes=[bar]", "task.classes: unknown class subset 'bar'")):
        assert main(["run", override, "wandb.mode=disabled", "--dry-run"]) == 2, override
        assert words in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing refused before any work leaves a run folder


def test_reference_statistics_never_include_pool_queries(tmp_path, monkeypatch, capsys):
    """Held-out queries leave the reference whatever the task scores; per-episode pool queries
    of reference classes are refused."""
    from bench import pipeline
    from bench.config import load_config
    from bench.data.episodes import holdout_indices
    from bench.imprint import expand_grid

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["task=digits-base-novel", "reference=base", "task.queries=holdout", "task.seeds=[0]",
                             "methods=[simpleshot]", "wandb.mode=disabled"])
    emb = pipeline.extract_stage(cfg)
    ref = pipeline.reference_stats(cfg, emb, expand_grid(cfg.methods))
    labels = emb.pool.labels
    base = torch.isin(labels, torch.arange(5))
    base[torch.as_tensor(holdout_indices(labels.numpy(), list(range(5)), 0.25))] = False
    assert torch.allclose(ref.mean, emb.pool.embeddings[base].float().mean(0))
    # held-out queries are the same ones the episodes score
    _, ep = next(iter(emb.suite.episodes(labels.numpy(), None)))
    assert set(ep.query) == set(holdout_indices(labels.numpy(), ep.classes, 0.25).tolist())
    code = main(["imprint", "reference=base", "task.queries=rest", "task.shots=[1]", "task.seeds=[0]",
                 "methods=[simpleshot]", "wandb.mode=disabled"])
    assert code == 2 and "holds classes the task scores" in capsys.readouterr().err
    assert main(["imprint", "reference=base", "task.queries=rest", "task.shots=[1]", "task.seeds=[0]",
                 "task.classes=[novel]", "methods=[simpleshot]", "wandb.mode=disabled"]) == 0


def test_random_init_backbone_is_seeded_so_extract_then_imprint_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["backbone.name=torchvision:resnet18", "backbone.weights=null",
            "backbone.transform={size: 16, channels: 3}", "task.classes=[novel]", "task.shots=[1]",
            "task.seeds=[0]", "methods=[qi2018]", f"cache_dir={tmp_path / 'c'}", "wandb.mode=disabled"]
    assert main(["extract", *args]) == 0
    assert main(["imprint", *args]) == 0
    assert main(["imprint", *args, "seed=1"]) == 2  # another seed is another backbone: not cached


def test_decompression_bomb_and_loaded_nan_head_are_named(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "f", per_class=2)
    bomb = root / "cat" / "bomb.png"
    Image.new("L", (100, 100)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses images over twice its limit
    source = build_source(f"imagefolder:{root}")
    with pytest.raises(BenchError, match="decompression bomb"):
        source.load(source.files.index(bomb))
    x, y = torch.randn(6, 4), torch.tensor([0, 0, 0, 1, 1, 1])
    head = build_head("qi2018", x, y)
    head.proxies[0, 0] = float("nan")
    head.save(tmp_path / "h.safetensors")
    with pytest.raises(BenchError, match="NaN or Inf"):
        ImprintedHead.load(tmp_path / "h.safetensors")


class Thing:
    """Any pickled object that is not a tensor."""


def test_pickled_weights_and_wrong_channels_are_refused(tmp_path):
    from bench.backbones import build_backbone

    with open(tmp_path / "w.pt", "wb") as f:
        pickle.dump({"model": Thing()}, f)
    with pytest.raises(BenchError, match="not a plain state dict"):
        build_backbone("torchvision:resnet18", weights=str(tmp_path / "w.pt"))
    with pytest.raises(BenchError, match="1-channel images"):
        build_backbone("tiny-digits", transform={"size": 8, "channels": 3})


BAD = [
    (["extract.batch_size=abc"], "'extract.batch_size' = 'abc'"),
    (["trainer.devices=two"], "'trainer.devices' = 'two'"),
    (["seed=-1"], "'seed' = -1"),
    (["task.shots=[-1]"], "'shots[0]' = -1"),
    (["task.ways=1"], "ways 1 must be at least 2"),
    (["task.validation=1.5"], "validation 1.5 must be a share"),
    (["extract.num_workers=-2"], "'extract.num_workers' = -2"),
    (["save_heads=maybe"], "'save_heads' = 'maybe'"),
    (["methods=[l2/kmeans:k=5,k=7/l2/l2/max]"], "option 'k' of gen 'kmeans' is given twice"),
    (["methods=[none/ls:lam=nan/none/none/max]"], "option lam=nan of gen 'ls'"),
    (["methods=[none/ls:lam=inf/none/none/max]"], "option lam=inf of gen 'ls'"),
    (["methods=[none/ls:lam=0/none/none/max]"], "expected a finite float > 0"),
    (["methods=[l2/kmeans:k=0/l2/l2/max]"], "option k=0 of gen 'kmeans'"),
    (["task.seeds=[0,0]"], "listed more than once"),
    (["extract.dtype=float64"], "'extract.dtype' = 'float64'"),
    (["trainer.strategy=fsdp"], "'trainer.strategy' = 'fsdp'"),
    (["imprint.max_batch_bytes=-5"], "'imprint.max_batch_bytes'"),
    (["wandb.mode=sometimes"], "'wandb.mode' = 'sometimes'"),
    (["task.queries=banana"], "'queries' = 'banana'"),
    (["trainer.num_nodes=0"], "'trainer.num_nodes' = 0"),
    (["backbone.transform={size: 0}"], "transform size=0"),
    (["dataset.options={root: /tmp}"], "do not apply to digits datasets"),
    (["methods=[l2/dc/none/l2/max]"], "set reference: base"),
    (["dataset=imagefolder:/no/such/folder", "task.dataset=imagefolder:/no/such/folder"], "does not exist"),
    (["backbone.pooling=cls"], "backbone.pooling does not apply to tiny-digits"),
]


@pytest.mark.parametrize("args, words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_get_one_line_from_the_cli(tmp_path, monkeypatch, capfd, args, words):
    """The CLI's own entry point, in this process: a fresh interpreter per value added ~8 s of
    imports each and tested nothing more (the console script is `bench.cli:main`, run as a real
    subprocess by the README and wheel tests)."""
    from bench.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    code = main(["run", f"cache_dir={tmp_path / 'c'}", *args])
    out = capfd.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.err[-2000:]
    assert words in lines[0]
    assert not list((tmp_path / "c").glob("*/manifest.json"))  # stopped before any extraction


def test_a_corrupt_image_seen_by_one_process_stops_every_process_clearly(tmp_path):
    root = write_image_folder(tmp_path / "f", per_class=4)
    (root / "cat" / "001.png").write_bytes(b"not a png")  # dataset index 1: rank 1's share only
    suite = _suite(tmp_path, f"imagefolder:{root}", queries="holdout")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["WANDB_MODE"] = "disabled"
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "extract", f"task={suite}", TINY, "cache_dir=cache",
                           "trainer.devices=2", "extract.batch_size=2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors and any("001.png" in line for line in errors), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "gloo" not in proc.stderr.lower()
    assert not list((tmp_path / "cache").glob("*/manifest.json"))


def test_a_manifest_moved_to_another_keys_folder_is_refused(tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    args = ["task.classes=[novel]", "task.shots=[1]", "task.seeds=[0]", "methods=[qi2018]", "wandb.mode=disabled"]
    assert main(["extract", *args]) == 0
    entries = sorted(p.parent for p in (tmp_path / ".cache/bench").glob("*/manifest.json"))
    assert len(entries) == 2  # train and test splits
    train, test = entries
    manifest = json.loads((train / "manifest.json").read_text())
    shutil.rmtree(test)
    shutil.copytree(train, test)  # the test split's folder now holds the train split's entry
    with pytest.raises(BenchError, match="manifest is for key"):
        from bench.extract import EmbeddingCache

        EmbeddingCache(tmp_path / ".cache/bench").lookup(test.name)
    assert main(["imprint", *args]) == 2
    manifest["fields"]["dataset"] = "other"  # fields edited by hand: they no longer hash to the key
    (train / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BenchError, match="do not hash to its key"):
        EmbeddingCache(tmp_path / ".cache/bench").lookup(train.name)
