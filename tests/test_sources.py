import numpy as np
import pytest

from bench import BenchError
from bench.data.sources import CorruptImage, DigitsSource, build_source
from tests.helpers import write_image_folder


def test_digits_splits_are_disjoint_stratified_and_fixed():
    train, test, full = DigitsSource("train"), DigitsSource("test"), DigitsSource("all")
    assert len(train) + len(test) == len(full) == 1797
    assert train.class_names == [str(c) for c in range(10)]
    counts = np.bincount(test.labels, minlength=10)
    assert counts.min() >= 55  # a third of every class
    img = train.load(0)
    assert img.size == (8, 8) and img.mode == "L"
    again = DigitsSource("train")
    assert np.array_equal(again.images, train.images)


def test_image_folder_source(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    src = build_source(f"imagefolder:{root}")
    assert src.class_names == ["cat", "dog", "emu"] and len(src) == 18
    assert src.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert src.load(7).size == (12, 12)


def test_image_folder_names_a_corrupt_file(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    bad = root / "dog" / "002.png"
    bad.write_bytes(b"this is not a png")
    src = build_source(f"imagefolder:{root}")
    index = src.files.index(bad)
    with pytest.raises(CorruptImage) as err:
        src.load(index)
    assert str(bad) in str(err.value) and f"index {index}" in str(err.value)


def test_hf_dataset_from_disk_parquet_and_imagefolder_agree(tmp_path):
    import datasets

    root = write_image_folder(tmp_path / "imgs")
    folder = build_source(f"imagefolder:{root}")
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=folder.class_names)})
    ds = datasets.Dataset.from_dict(
        {"image": [str(f) for f in folder.files], "label": folder.labels.tolist()}, features=features
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "data.parquet"))

    saved = build_source(f"hf:{tmp_path / 'saved'}")
    assert saved.class_names == folder.class_names
    assert np.array_equal(saved.labels, folder.labels)
    assert np.array_equal(np.asarray(saved.load(5)), np.asarray(folder.load(5).convert("RGB")))

    pq = build_source(f"hf:{tmp_path / 'data.parquet'}")
    assert np.array_equal(pq.labels, folder.labels)
    assert np.array_equal(np.asarray(pq.load(3)), np.asarray(folder.load(3)))

    hf_folder = build_source(f"hf:{root}")  # the datasets library's own imagefolder builder
    assert sorted(hf_folder.class_names) == folder.class_names
    assert np.bincount(hf_folder.labels).tolist() == [6, 6, 6]


def test_unknown_dataset_and_bad_columns(tmp_path):
    with pytest.raises(BenchError, match="unknown dataset 'mnist'.*digits"):
        build_source("mnist")
    with pytest.raises(BenchError, match="does not exist"):
        build_source(f"imagefolder:{tmp_path / 'nope'}")
    import datasets

    datasets.Dataset.from_dict({"img": [np.zeros((2, 2), np.uint8)], "y": [0]}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(BenchError, match="no column 'image'"):
        build_source(f"hf:{tmp_path / 'd'}")


def _write_idx(path, array):
    """MNIST's idx format: magic (type 0x08 = ubyte, ndim), big-endian sizes, then the bytes."""
    import struct

    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, array.ndim))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name", ["MNIST", "FashionMNIST"])
def test_torchvision_dataset_from_a_local_root(tmp_path, name):
    raw = tmp_path / name / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    train = build_source(f"tv:{name}", split="train", root=str(tmp_path))
    test = build_source(f"tv:{name}", split="test", root=str(tmp_path))
    assert len(train) == 30 and len(test) == 10 and len(train.class_names) == 10
    assert train.labels.tolist() == [i % 10 for i in range(30)]
    assert train.load(3).size == (28, 28)


def test_torchvision_dataset_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(BenchError, match="download=true"):
        build_source("tv:CIFAR10", root=str(tmp_path))
    with pytest.raises(BenchError, match="unknown torchvision dataset 'CIFAR11'"):
        build_source("tv:CIFAR11", root=str(tmp_path))


def test_hf_dataset_and_image_folder_give_the_same_episodes(tmp_path):
    import datasets

    from bench.data import TaskSuite

    root = write_image_folder(tmp_path / "imgs", classes=("a", "b", "c", "d"), per_class=8)
    folder = build_source(f"imagefolder:{root}")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=folder.class_names)})
    datasets.Dataset.from_dict({"image": [str(f) for f in folder.files], "label": folder.labels.tolist()},
                               features=features).save_to_disk(str(tmp_path / "saved"))
    hf = build_source(f"hf:{tmp_path / 'saved'}")
    suite = TaskSuite.build({"name": "s", "dataset": "x", "classes": ["all", "even"], "shots": [1, 3],
                                 "queries": 2, "seeds": [0, 1, 2]})
    a, b = list(suite.episodes(folder.labels)), list(suite.episodes(hf.labels))
    assert len(a) == 12
    for (na, ea), (nb, eb) in zip(a, b):
        assert na == nb and np.array_equal(ea.support, eb.support) and np.array_equal(ea.query, eb.query)


PLUGIN = '''
import numpy as np
from PIL import Image

from bench.data.sources import Source, register_source


@register_source("stripes", form="stripes:<n>", summary="grey stripes, one width per class")
class Stripes(Source):
    def __init__(self, n: str, split: str = "train", size: int = 8) -> None:
        self.size = int(size)
        super().__init__(f"stripes:{n}", split, np.arange(int(n)) % 3, ["thin", "mid", "wide"])

    def load(self, index: int) -> Image.Image:
        width = 1 + int(self.labels[index])
        row = (np.arange(self.size) // width % 2) * (180 + index % 7)
        return Image.fromarray(np.tile(row, (self.size, 1)).astype(np.uint8), mode="L")
'''


def test_builtin_sources_come_from_the_registry():
    from bench.config import DatasetConfig
    from bench.data.sources import SOURCES, known_sources

    assert {"digits", "imagefolder", "hf", "tv", "synthetic"} <= set(SOURCES)
    assert known_sources()[:5] == ["digits", "imagefolder:<root>", "hf:<name or path>", "tv:<Name>", "synthetic:<n>"]
    description = DatasetConfig.model_fields["name"].description
    assert all(form in description for form in known_sources())
    assert set(SOURCES["hf"].options) == {"image_key", "label_key", "revision", "streaming"}
    with pytest.raises(BenchError, match="they accept: image_key, label_key, revision, streaming"):
        build_source("hf:/nowhere", colour="red")


def test_a_source_is_one_class_and_one_decorator_loaded_as_a_plugin(tmp_path, monkeypatch, capsys):
    """A user's source registered from a plugin file is known to --dry-run and runs end to end."""
    import csv
    import json

    from bench.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "stripes_plugin.py").write_text(PLUGIN)
    (tmp_path / "t.yaml").write_text(json.dumps({"name": "t", "dataset": "stripes:30", "classes": ["all"],
                                                 "shots": [1, 3], "queries": "holdout", "seeds": [0]}))
    common = ["task=t.yaml", "backbone.transform={size: 8, channels: 1}", "wandb.mode=disabled",
              "methods=[qi2018,knn]", "name=r", "cache_dir=cache"]
    assert main(["run", *common, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'stripes:30'" in err and "imagefolder:<root>" in err
    assert main(["run", *common, "plugins=[stripes_plugin.py]", "--dry-run"]) == 0
    assert "dataset   stripes:30" in capsys.readouterr().out
    assert main(["run", *common, "plugins=[stripes_plugin.py]", "dataset.options={width: 3}", "--dry-run"]) == 2
    assert "they accept: size" in capsys.readouterr().err
    assert main(["run", *common, "plugins=[stripes_plugin.py]", "dataset.options={size: 12}"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "runs" / "r" / "results.csv")))
    assert len(rows) == 2 * 2 and {r["dataset"] for r in rows} == {"stripes:30"}
    record = json.loads((tmp_path / "runs" / "r" / "run.json").read_text())
    assert record["classes"] == {"0": "thin", "1": "mid", "2": "wide"}

    from bench.data.sources import Source, register_source

    with pytest.raises(BenchError, match="'stripes' is already registered"):
        register_source("stripes")(type("Other", (Source,), {"__init__": lambda self, n, split="train": None}))
    with pytest.raises(BenchError, match="split"):
        register_source("nosplit")(type("NoSplit", (Source,), {"__init__": lambda self, n: None}))
