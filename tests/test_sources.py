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
