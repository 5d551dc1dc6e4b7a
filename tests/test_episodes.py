import subprocess
import sys

import numpy as np
import pytest

from bench import BenchError
from bench.data import TaskSuite, sample_episode, select_classes

LABELS = np.repeat(np.arange(6), 30)
TEST = np.repeat(np.arange(6), 7)


def test_same_seed_same_episode_and_different_seed_differs():
    a = sample_episode(LABELS, [0, 1, 2], 5, 10, seed=3)
    b = sample_episode(LABELS, [0, 1, 2], 5, 10, seed=3)
    c = sample_episode(LABELS, [0, 1, 2], 5, 10, seed=4)
    assert np.array_equal(a.support, b.support) and np.array_equal(a.query, b.query)
    assert not np.array_equal(a.support, c.support)


def test_episode_is_identical_in_a_fresh_process():
    code = (
        "import numpy as np; from bench.data import sample_episode;"
        "e = sample_episode(np.repeat(np.arange(6), 30), [0, 1, 2], 5, 10, seed=3);"
        "print(','.join(map(str, e.support)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here = sample_episode(LABELS, [0, 1, 2], 5, 10, seed=3)
    assert out.stdout.strip() == ",".join(map(str, here.support))


def test_shots_and_queries_are_exact_and_disjoint():
    e = sample_episode(LABELS, [1, 3, 5], 4, 6, seed=0)
    assert np.bincount(LABELS[e.support], minlength=6)[[1, 3, 5]].tolist() == [4, 4, 4]
    assert np.bincount(LABELS[e.query], minlength=6)[[1, 3, 5]].tolist() == [6, 6, 6]
    assert not set(e.support) & set(e.query)
    assert np.all(np.diff(e.support) > 0)  # sorted, no duplicates


def test_queries_do_not_change_with_shots_and_support_grows():
    small = sample_episode(LABELS, [0, 1], 2, 5, seed=1)
    large = sample_episode(LABELS, [0, 1], 10, 5, seed=1)
    assert np.array_equal(small.query, large.query)
    assert set(small.support) <= set(large.support)


def test_a_class_draw_does_not_depend_on_the_other_classes():
    a = sample_episode(LABELS, [0, 1], 3, 2, seed=9)
    b = sample_episode(LABELS, [0, 1, 2, 3], 3, 2, seed=9)
    assert set(a.support) <= set(b.support)


def test_all_shots_rest_and_test_queries():
    e = sample_episode(LABELS, [0, 1], "all", 10, seed=0)
    assert len(e.support) == 40 and len(e.query) == 20
    e = sample_episode(LABELS, [0, 1], 5, "rest", seed=0)
    assert len(e.support) == 10 and len(e.query) == 50
    e = sample_episode(LABELS, [0, 1], "all", "test", seed=0, test_labels=TEST)
    assert len(e.support) == 60 and e.query_split == "test"
    assert np.array_equal(e.query, np.flatnonzero(np.isin(TEST, [0, 1])))


def test_too_few_samples_lists_every_short_class():
    labels = np.array([0] * 3 + [1] * 10 + [2] * 2)
    with pytest.raises(BenchError) as err:
        sample_episode(labels, [0, 1, 2], 3, 1, seed=0)
    msg = str(err.value)
    assert "class 0: 3 < 4" in msg and "class 2: 2 < 4" in msg and "class 1" not in msg


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(shots=-1, queries=1), "shots=-1"),
        (dict(shots="all", queries="rest"), "leaves no samples"),
        (dict(shots=1, queries="test"), "needs a test split"),
        (dict(shots=1, queries="some"), "queries='some'"),
    ],
)
def test_bad_episode_arguments(kwargs, words):
    with pytest.raises(BenchError, match=words):
        sample_episode(LABELS, [0, 1], seed=0, **kwargs)


def test_class_subsets():
    avail = list(range(10))
    assert select_classes("even", avail) == [0, 2, 4, 6, 8]
    assert select_classes("odd", avail) == [1, 3, 5, 7, 9]
    assert select_classes("novel", avail, {"novel": [9, 5]}) == [5, 9]
    assert select_classes([3, 1], avail) == [1, 3]
    with pytest.raises(BenchError, match="unknown class subset 'base'"):
        select_classes("base", avail)
    with pytest.raises(BenchError, match=r"classes \[12\]"):
        select_classes([1, 12], avail)


def test_task_suite_from_yaml(tmp_path):
    suite = TaskSuite.load("digits-base-novel")
    assert suite.class_splits["novel"] == [5, 6, 7, 8, 9]
    labels = np.repeat(np.arange(10), 40)
    test = np.repeat(np.arange(10), 5)
    eps = list(suite.episodes(labels, test))
    assert len(eps) == 2 * len(suite.shots) * len(suite.seeds)
    assert {name for name, _ in eps} == {"base", "novel"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndataset: digits\nshot: [1]\n")
    with pytest.raises(BenchError, match=r"unknown key 'shot'"):
        TaskSuite.load(bad)
    with pytest.raises(BenchError, match="known suites"):
        TaskSuite.load("no-such-suite")


def test_every_shipped_task_suite_loads():
    from bench.data.tasks import TASKS_DIR

    names = sorted(str(p.relative_to(TASKS_DIR).with_suffix("")) for p in TASKS_DIR.rglob("*.yaml")
                   if not p.name.endswith(".suite.yaml"))  # benchmark suites: tests/test_suites.py
    assert {"digits-base-novel", "cifar100", "imagenet"} <= set(names)
    for name in names:
        suite = TaskSuite.load(name)
        assert suite.shots and suite.seeds and suite.classes
        for split in suite.class_splits.values():
            assert split == sorted(set(split))
    assert TaskSuite.load("cifar100").class_splits["novel"] == list(range(50, 100))


def test_class_ranges_must_be_well_formed(tmp_path):
    bad = tmp_path / "b.yaml"
    bad.write_text("name: b\ndataset: digits\nclass_splits: {base: 'zero-four'}\n")
    with pytest.raises(BenchError, match="range like '0-49'"):
        TaskSuite.load(bad)
