"""Benchmark suites (VTAB-1k, ELEVATER): every member's plan checks without a network, and a
member runs end to end on a local stand-in with the mirror's schema, its revision in run.json."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from bench import cli
from bench.data.benchmarks import BenchmarkSuite, known_benchmarks
from bench.data.tasks import TaskSuite, known_suites
from bench.errors import BenchError

VTAB = ["caltech101", "cifar100", "dtd", "flowers102", "pets", "sun397", "svhn", "patch_camelyon", "eurosat",
        "resisc45", "diabetic_retinopathy", "clevr_count", "clevr_distance", "dmlab", "kitti_distance",
        "dsprites_location", "dsprites_orientation", "smallnorb_azimuth", "smallnorb_elevation"]


@pytest.mark.parametrize("name, members", [("vtab-1k", 19), ("elevater-20", 19)])
def test_every_member_plans_without_a_network(name, members, capsys):
    suite = BenchmarkSuite.load(name)
    assert len(suite.members) == members and suite.version
    for member in suite.members:
        task = TaskSuite.load(member.task)
        assert task.dataset.startswith("hf:clip-benchmark/") and task.version and task.queries == "test"
        assert set(member.dataset.options) == {"image_key", "label_key", "revision"}
    assert cli.main(["suite", name, "--dry-run", "methods=[ncm]"]) == 0  # a backbone without a text tower
    out = capsys.readouterr().out
    assert out.count("(dry run: nothing loaded)") == members and out.count("  revision  ") == members
    assert f"benchmark suite {name} version {suite.version}: {members} member tasks" in out


def test_vtab_holds_the_19_tasks_with_1000_examples():
    suite = BenchmarkSuite.load("vtab-1k")
    assert [m.task for m in suite.members] == [f"vtab-1k/{t}" for t in VTAB]
    assert {m.dataset.train_split for m in suite.members} == {"train[:1000]"}
    assert {tuple(TaskSuite.load(m.task).shots) for m in suite.members} == {("all",)}
    assert {"vtab-1k", "elevater-20"} <= set(known_benchmarks())
    assert not any(s.endswith(".suite") for s in known_suites())


def test_a_bad_suite_gets_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "twice.suite.yaml").write_text(yaml.safe_dump(
        {"name": "twice", "members": [{"task": "mnist"}, {"task": "mnist"}]}))
    with pytest.raises(BenchError, match="members must list each task once"):
        BenchmarkSuite.load("twice")
    with pytest.raises(BenchError, match="benchmark suite 'nope' not found.*known: .*vtab-1k"):
        BenchmarkSuite.load("nope")
    assert cli.main(["suite", "vtab-1k", "name=x", "--dry-run"]) == 2  # 19 members, one output folder


def test_a_saved_split_takes_the_members_slice(tmp_path):
    from bench.data.sources import build_source

    disk = _stand_in(tmp_path / "standin")
    source = build_source(f"hf:{disk}", split="train[2:8]", image_key="webp", label_key="cls")
    assert list(source.labels) == [0] * 4 + [1] * 2
    with pytest.raises(BenchError, match=r"write a slice as name\[start:stop\]"):
        build_source(f"hf:{disk}", split="train[:10%]", image_key="webp", label_key="cls")


def _stand_in(root: Path) -> Path:
    """A save_to_disk dataset with the mirrors' columns (image `webp`, int label `cls`): 3 classes
    whose 8x8 images differ in brightness, enough for any method to tell them apart."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)

    def split(n):
        labels = np.repeat(np.arange(3), n)
        images = [Image.fromarray((rng.integers(0, 40, (8, 8)) + 100 * c).astype(np.uint8)) for c in labels]
        return datasets.Dataset.from_dict({"webp": images, "cls": labels.tolist()},
                                          features=datasets.Features({"webp": datasets.Image(),
                                                                      "cls": datasets.Value("int64")}))

    datasets.DatasetDict({"train": split(6), "test": split(3)}).save_to_disk(str(root))
    return root


def test_a_member_runs_on_a_local_stand_in(tmp_path, forks):
    """VTAB's caltech101 member (its task file, split slice, columns and pinned revision), its
    dataset swapped for a local copy of the same schema: rows come out and run.json holds the revision."""
    disk = _stand_in(tmp_path / "standin")
    member = BenchmarkSuite.load("vtab-1k").members[0]
    index = tmp_path / "standin.suite.yaml"
    index.write_text(yaml.safe_dump({"name": "standin", "version": "1", "members": [
        {"task": member.task, "dataset": {**member.dataset.model_dump(), "train_split": "train[:12]"}}]}))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "BENCH_USER_OMP_NUM_THREADS")}
    env["WANDB_MODE"] = "disabled"
    proc = forks.bench(["suite", str(index), "methods=[ncm]", f"task.dataset=hf:{disk}", "name=standin",
                        f"cache_dir={tmp_path / 'cache'}", f"out_dir={tmp_path / 'runs'}"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "runs" / "standin" / "run.json").read_text())
    assert record["complete"] and record["config"]["dataset"]["options"]["revision"] == member.revision
    assert record["config"]["dataset"]["train_split"] == "train[:12]"
    import pandas as pd

    rows = pd.read_parquet(tmp_path / "runs" / "standin" / "results.parquet")
    assert list(rows["task"]) == ["vtab-1k-caltech101"] and rows["acc"].iloc[0] == pytest.approx(1.0)
