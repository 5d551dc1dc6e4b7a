"""N-way episodes, validation parts and 0 shots: seeded, disjoint, and the same on 1 or 2 processes."""

import numpy as np
import pytest

from bench.data.episodes import draw_ways, sample_episode
from bench.data.tasks import TaskSuite
from bench.errors import BenchError

LABELS = np.repeat(np.arange(10), 20)


@pytest.mark.parametrize("queries", [5, "rest", "holdout", "test"])
def test_validation_is_disjoint_and_support_grows_with_shots(queries):
    test = LABELS if queries == "test" else None
    eps = {s: sample_episode(LABELS, range(10), s, queries, seed=3, test_labels=test, validation=0.2)
           for s in (0, 1, 5)}
    for s, ep in eps.items():
        assert len(ep.validation) == 10 * (3 if queries == "holdout" else 4) and len(ep.support) == 10 * s
        assert not set(ep.validation) & set(ep.support)
        if queries != "test":
            assert not set(ep.validation) & set(ep.query) and not set(ep.support) & set(ep.query)
        assert np.array_equal(ep.validation, eps[0].validation)  # the same at every shot count
        assert set(eps[1].support) <= set(ep.support) or s == 0
    if queries != "rest":
        assert all(np.array_equal(ep.query, eps[0].query) for ep in eps.values())
    assert eps[0].support.dtype == np.int64 and eps[0].shots == 0


def test_zero_shots_with_queries_rest_scores_every_other_sample():
    ep = sample_episode(LABELS, [0, 1], 0, "rest", seed=0, validation=5)
    assert len(ep.support) == 0 and len(ep.validation) == 10 and len(ep.query) == 30 and ep.shots == 0


def test_validation_counts_and_defaults():
    ep = sample_episode(LABELS, [0, 1], 2, 3, seed=0, validation=4)
    assert len(ep.validation) == 8
    assert len(sample_episode(LABELS, [0, 1], 2, 3, seed=0).validation) == 0
    # holdout's part leaves first: a share of what stays
    ep = sample_episode(LABELS, [0, 1], 1, "holdout", seed=0, holdout=0.5, validation=0.5)
    assert (len(ep.query), len(ep.validation)) == (20, 10)
    with pytest.raises(BenchError, match="class 0: 20 < 22"):
        sample_episode(LABELS, [0, 1], 1, 1, seed=0, validation=20)


def test_ways_draw_is_seeded_by_the_seed_alone():
    classes = list(range(10))
    draws = [draw_ways(classes, 5, seed) for seed in range(20)]
    assert all(len(d) == 5 and d == sorted(d) and set(d) <= set(classes) for d in draws)
    assert draws == [draw_ways(classes, 5, seed) for seed in range(20)]
    assert len({tuple(d) for d in draws}) > 10  # seeds draw different classes
    for bad in (1, 11):
        with pytest.raises(BenchError, match=f"ways={bad} must be an int from 2 to the 10 classes of subset 'all'"):
            draw_ways(classes, bad, 0, "all")


def test_suite_episodes_draw_the_same_classes_at_every_shot_count():
    suite = TaskSuite.build({"name": "n", "dataset": "digits", "shots": [0, 1, 5], "seeds": [0, 1, 2, 3],
                             "queries": 5, "ways": 3, "validation": 2})
    eps = [ep for _, ep in suite.episodes(LABELS)]
    assert len(eps) == 12 and all(len(ep.classes) == 3 and ep.ways == 3 for ep in eps)
    by_seed = {}
    for ep in eps:
        by_seed.setdefault(ep.seed, set()).add(ep.classes)
        assert set(LABELS[ep.support]) <= set(ep.classes) and set(LABELS[ep.query]) == set(ep.classes)
        assert len(ep.validation) == 6
    assert all(len(v) == 1 for v in by_seed.values()) and len({c for v in by_seed.values() for c in v}) > 1
    with pytest.raises(BenchError, match="ways=4 must be an int from 2 to the 2 classes of subset 'even'"):
        list(TaskSuite.build({"name": "n", "dataset": "digits", "classes": ["even"], "ways": 4}).episodes(LABELS[:60]))
    with pytest.raises(BenchError, match="ways 4 is more than the 3 classes of subset base"):  # before any data
        TaskSuite.build({"name": "n", "dataset": "digits", "class_splits": {"base": "0-2"}, "classes": ["base"],
                         "ways": 4})


def test_suite_fields_and_their_errors():
    suite = TaskSuite.build({"name": "n", "dataset": "digits"})
    assert (suite.version, suite.ways, suite.validation) == ("1", None, None)
    assert TaskSuite.build({"name": "n", "dataset": "digits", "version": 2}).version == "2"
    assert TaskSuite.build({"name": "n", "dataset": "digits", "seeds": "0-599"}).seeds == list(range(600))
    for bad, words in [({"ways": 1}, "ways 1 must be at least 2"), ({"validation": 1.0}, "validation 1.0 must be"),
                       ({"shots": [-1]}, "shots")]:
        with pytest.raises(BenchError, match=words):
            TaskSuite.build({"name": "n", "dataset": "digits", **bad})


def test_nway_rows_are_identical_on_one_and_two_processes(tmp_path, forks, quickstart_cache):
    """5-way episodes of the quickstart's cache (each episode its own classes, so its own batch):
    `bench imprint` on 1 process and on 2 gives the same rows, and every shot count of a seed
    is scored on the same classes."""
    import csv
    from pathlib import Path

    from tests.helpers import copy_cache, one_and_two_processes

    cache = copy_cache(quickstart_cache, tmp_path / "cache")
    common = ["-c", str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"), "methods=[ncm,knn]",
              f"cache_dir={cache}", f"out_dir={tmp_path / 'runs'}", "task.ways=5", "task.shots=[1,5]",
              "task.seeds=[0,1,2]", "task.classes=[all]", "task.validation=2"]
    one_and_two_processes(forks, tmp_path, "imprint", common)

    def rows(name):
        with open(tmp_path / "runs" / name / "results.csv") as f:
            return [{k: v for k, v in r.items() if k != "gen_time_s"} for r in csv.DictReader(f)]

    rows_one = rows("one")
    assert len(rows_one) == 2 * 3 * 2 and rows_one == rows("two")
    assert {r["ways"] for r in rows_one} == {"5"} and {r["classes"] for r in rows_one} == {"all"}
    per_seed = {}
    for r in rows_one:
        per_seed.setdefault(r["seed"], set()).add(tuple(k for k in r if k.startswith("acc_") and r[k] != ""))
    assert all(len(v) == 1 for v in per_seed.values()) and len({c for v in per_seed.values() for c in v}) > 1
