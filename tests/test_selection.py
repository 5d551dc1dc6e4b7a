"""Selection on the episode's validation part: the validation-best member, never the test-best one."""

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench.config import RunConfig, SelectConfig
from bench.data.episodes import Episode
from bench.engine import RunLabels, imprint_episodes
from bench.errors import BenchError
from bench.imprint import resolve
from bench.pipeline import plan
from bench.selection import check_selection, families, with_members

EUCLID, COSINE = "none/mean/none/none/mnn", "l2/mean/l2/l2/max"  # canonical names (defaults dropped)


@dataclass(frozen=True)
class ValEpisode(Episode):
    validation: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def _entry(points, labels):
    return SimpleNamespace(embeddings=torch.tensor(points, dtype=torch.float32), labels=torch.tensor(labels))


# Class 0 sits at (1, 0), class 1 at (10, 10). A query at (3, 3) is class 1 by angle (cosine) but
# class 0 by distance; a query at (12, 0.5) is class 1 by distance, class 0 by angle.
POOL = _entry([[1, 0], [10, 10], [3, 3], [3.1, 2.9], [1.2, 0]], [0, 1, 1, 1, 0])
TEST = _entry([[12, 0.5], [0.9, 0.1]], [1, 0])


def _run(select, test=TEST, specs=("ncm",)):
    fams = families(select)
    ep = ValEpisode((0, 1), np.array([0, 1]), np.arange(len(test.labels)), "test", 1, "test", 0,
                    validation=np.array([2, 3, 4]))
    rows = imprint_episodes(with_members([resolve(s) for s in specs], fams), [("all", ep)], POOL, test,
                            RunLabels("b", "d", "t"), select=fams, progress=False)
    return {r["method"]: r for r in rows}


def test_selection_picks_the_validation_best_member_not_the_test_best():
    rows = _run([SelectConfig(name="ncm", methods=[EUCLID, COSINE])])
    assert rows[EUCLID]["acc"] == 1.0 and rows[COSINE]["acc"] == 0.5  # test: euclidean wins
    val, oracle = rows["ncm@val"], rows["ncm@oracle"]
    assert (val["selection"], val["selected"], val["acc"], val["validation_acc"]) == ("validation", COSINE, 0.5, 1.0)
    assert (oracle["selection"], oracle["selected"], oracle["acc"]) == ("oracle", EUCLID, 1.0)
    assert rows["ncm"]["selection"] == "" and rows["ncm"]["training_free"] is True
    # test labels flipped: the oracle follows them, the validation choice does not move
    flipped = _run([SelectConfig(name="ncm", methods=[EUCLID, COSINE])], _entry(TEST.embeddings.tolist(), [0, 1]))
    assert flipped["ncm@val"]["selected"] == COSINE and flipped["ncm@oracle"]["selected"] == COSINE


def test_ties_on_validation_go_to_the_first_listed_member():
    # k=1 and k=2 over (3, 3)-like validation points: both right on all three, so the first listed wins
    for first, second in ((2, 1), (1, 2)):
        rows = _run([SelectConfig(name="knn", methods=[f"l2/all/none/l2/knn:k=[{first},{second}]"])])
        assert rows[f"l2/all/none/l2/knn:k={first}"]["acc"] == rows["knn@val"]["acc"]
        assert rows["knn@val"]["selected"] == f"l2/all/none/l2/knn:k={first}"


def test_logreg_rows_are_marked_gradient_based():
    rows = _run([], specs=("logreg", "qi2018"))
    assert rows["logreg"]["training_free"] is False and rows["qi2018"]["training_free"] is True


def test_selection_without_validation_is_refused_before_any_work():
    fams = families([SelectConfig(name="k", methods=["l2/kmeans:k=[1,5]/l2/l2/max"])])
    assert [str(m) for m in fams[0].members] == ["l2/kmeans:k=1/l2/l2/max", "l2/kmeans:k=5/l2/l2/max"]
    with pytest.raises(BenchError, match=r"validation: 0\.2") as err:
        check_selection(fams, None)
    assert "\n" not in str(err.value)
    check_selection(fams, 0.2)
    cfg = RunConfig.model_validate({"select": [{"name": "k", "methods": "l2/kmeans:k=[1,5]/l2/l2/max"}]})
    with pytest.raises(BenchError, match="validation"):
        plan(cfg, "run")
    with pytest.raises(BenchError, match="twice"):
        families([SelectConfig(name="a", methods=["qi2018"]), SelectConfig(name="a", methods=["ncm"])])


def _report_rows(with_marks: bool = True):
    rows = []
    accs = {"plain": [0.70, 0.72], "fam@val": [0.68, 0.71], "fam@oracle": [0.90, 0.91], "logreg": [0.60, 0.62]}
    marks = {"plain": ("", True), "fam@val": ("validation", True), "fam@oracle": ("oracle", True),
             "logreg": ("", False)}
    for method, values in accs.items():
        for seed, acc in enumerate(values):
            row = {"task": "t", "dataset": "d", "backbone": "b", "classes": "all", "shots": "5", "seed": seed,
                   "method": method, "spec": method, "acc": acc}
            if with_marks:
                row.update(selection=marks[method][0], training_free=marks[method][1], selected="")
            rows.append(row)
    return rows


def test_report_labels_oracle_selected_and_gradient_rows_and_never_stars_an_oracle():
    import pandas as pd

    from bench.report.stats import compare_methods, summarise
    from bench.report.tables import wide_table
    from bench.report.terminal import summary_text

    summary = summarise(pd.DataFrame(_report_rows()))
    best = summary.set_index("method")["best"]
    assert best["plain"] and not best["fam@oracle"] and best.sum() == 1  # the oracle's higher mean wins no star
    table = wide_table(summary, "acc", markup="markdown")
    assert list(table.index) == ["plain", "fam@val (selected on validation)", "fam@oracle (oracle)",
                                 "logreg (gradient-based)"]
    assert table.loc["plain"].iloc[0].startswith("**") and not table.loc["fam@oracle (oracle)"].iloc[0].startswith("**")
    text = summary_text(_report_rows(), color=False)
    assert "oracle rows, chosen on the test set, excluded" in text
    oracle_line = next(line for line in text.splitlines() if "fam@oracle (oracle)" in line)
    assert "*" not in oracle_line.replace("fam@oracle (oracle)", "")
    assert "fam@oracle" not in compare_methods(pd.DataFrame(_report_rows())).blocks.columns


def test_report_of_an_old_run_without_the_new_columns():
    import pandas as pd

    from bench.report.stats import summarise
    from bench.report.tables import wide_table

    summary = summarise(pd.DataFrame(_report_rows(with_marks=False)))
    assert summary.set_index("method")["best"]["fam@oracle"]  # nothing says it is an oracle: plain rows
    assert list(wide_table(summary, "acc").index) == ["plain", "fam@val", "fam@oracle", "logreg"]


def test_named_families_and_the_shorthand():
    cfg = RunConfig.model_validate({"select": ["dinov2-knn", {"name": "mine", "methods": "[qi2018,ncm]"}]})
    knn, mine = families(cfg.select)
    assert [m.agg.get("agg", "k") for m in knn.members] == [10, 20, 100, 200]
    assert [m.name for m in mine.members] == ["qi2018", "ncm"]
    with pytest.raises(BenchError, match="not a named family"):
        families(RunConfig.model_validate({"select": ["nope"]}).select)


def test_a_run_with_select_on_the_tasks_validation_part(quickstart_cache):
    from bench import pipeline
    from bench.config import load_config
    from bench.data.tasks import TaskSuite
    from tests.conftest import QUICKSTART

    if "validation" not in TaskSuite.model_fields:
        pytest.skip("episodes without a validation part (TaskSuite.validation) cannot select")
    cfg = load_config(QUICKSTART, [f"cache_dir={quickstart_cache}", "wandb.mode=disabled", "methods=[qi2018,logreg]",
                                   "select=[dinov2-knn]", "task.validation=0.2", "task.shots=[1,5]",
                                   "task.seeds=[0,1]"])
    emb = pipeline.extract_stage(cfg, require_cached=True)
    rows, _, _ = pipeline.imprint_stage(cfg, emb)
    members = {m.name for m in families(cfg.select)[0].members}
    for kind in ("val", "oracle"):
        picked = [r for r in rows if r["method"] == f"dinov2-knn@{kind}"]
        assert len(picked) == 2 * 2 * 2 and {r["selected"] for r in picked} <= members
    by_episode = {(r["classes"], r["shots"], r["seed"], r["method"]): r for r in rows}
    for (classes, shots, seed, method), r in by_episode.items():
        if method == "dinov2-knn@oracle":
            tested = [by_episode[(classes, shots, seed, m)]["acc"] for m in members]
            assert r["acc"] == max(tested)
    assert {r["training_free"] for r in rows if r["method"] == "logreg"} == {False}
