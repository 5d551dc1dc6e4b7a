"""bench report: merging runs, the checks that refuse a wrong comparison, the statistics, the files."""

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import BenchError
from bench.report.build import build_report, write_run_report
from tests.helpers import METHODS, make_rows, make_run


@pytest.fixture
def two_runs(tmp_path):
    a = make_run(tmp_path / "runs" / "a", make_rows(subsets=("base", "novel")))
    b = make_run(tmp_path / "runs" / "b", make_rows(backbone="other-net", offset=-0.05, seed=1))
    return a, b


def test_report_merges_runs_and_writes_every_output(report_of_two_runs):
    tmp_path, report = report_of_two_runs
    out = tmp_path / "rep"
    assert report.html == out / "report.html" and report.html.stat().st_size > 10_000
    assert len(report.merged.runs) == 2 and len(report.groups) == 3  # a: base, novel; b: novel
    md = (out / "report.md").read_text()
    assert "westerhoff2025" in md and "critical-difference" in md
    tex = (out / "tables" / "tiny-suite-digits-other-net-novel.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"\textbf" in tex
    assert r"l2/kmeans:k=5/l2/l2/max" in tex
    for stem in ("critical-difference", "tiny-suite-digits-tiny-digits-novel-acc-vs-shots",
                 "tiny-suite-digits-tiny-digits-novel-kmeans-k", "tiny-suite-digits-tiny-digits-novel-gen-norm-5shot"):
        for ext in ("png", "svg"):
            assert (out / "figures" / f"{stem}.{ext}").stat().st_size > 1000, stem
    assert json.loads((out / "report.json").read_text())["kind"] == "bench-report"
    assert not list(tmp_path.glob(".rep.tmp-*"))


def test_table_holds_mean_std_ci_over_seeds_and_marks_the_best(report_of_two_runs):
    from scipy.stats import t

    tmp_path, _ = report_of_two_runs
    table = pd.read_csv(tmp_path / "rep" / "tables" / "tiny-suite-digits-tiny-digits-novel.csv",
                        dtype={"shots": str})
    rows = pd.read_csv(tmp_path / "runs" / "a" / "results.csv", dtype={"shots": str})
    cell = rows[(rows["method"] == "knn") & (rows["shots"] == "5") & (rows["classes"] == "novel")]["acc"]
    got = table[(table["method"] == "knn") & (table["shots"] == "5")].iloc[0]
    half = t.ppf(0.975, 2) * cell.std(ddof=1) / math.sqrt(3)
    assert got["mean"] == pytest.approx(cell.mean()) and got["std"] == pytest.approx(cell.std(ddof=1))
    assert got["ci95_low"] == pytest.approx(cell.mean() - half) and got["n"] == 3
    assert table["ci95_high"].max() <= 1.0 and table["ci95_low"].min() >= 0.0
    for shots, part in table.groupby("shots"):
        assert part.loc[part["best"], "mean"].min() == pytest.approx(part["mean"].max())
    best_all = table[(table["shots"] == "all") & table["best"]]["method"].tolist()
    assert best_all == ["knn"]  # 0.89 against 0.85 at most, noise 0.02


def test_ranks_and_friedman_come_from_the_libraries(report_of_two_runs):
    import scikit_posthocs as sp
    from scipy.stats import friedmanchisquare

    tmp_path, report = report_of_two_runs
    c = report.comparison
    cells = pd.read_csv(tmp_path / "rep" / "tables" / "cells.csv")
    methods = list(METHODS)
    values = cells[methods].to_numpy()
    assert len(cells) == 9  # 3 (run, subset) x 3 shot counts, each the mean over 3 seeds
    assert c.friedman_p == pytest.approx(friedmanchisquare(*values.T).pvalue)
    expected_ranks = pd.DataFrame(values, columns=methods).rank(axis=1, ascending=False).mean()
    ranks = pd.read_csv(tmp_path / "rep" / "tables" / "ranks.csv").set_index("method")["average_rank"]
    assert ranks.to_dict() == pytest.approx(expected_ranks.to_dict())
    nemenyi = sp.posthoc_nemenyi_friedman(pd.DataFrame(values, columns=methods))
    saved = pd.read_csv(tmp_path / "rep" / "tables" / "posthoc-nemenyi.csv", index_col=0)
    assert np.allclose(saved.loc[methods, methods].to_numpy(), nemenyi.loc[methods, methods].to_numpy())
    assert c.cd == pytest.approx(2.728 * math.sqrt(5 * 6 / (6 * 9)), abs=1e-3)  # Demšar 2006, table 5: k=5
    assert report.figures["cd"]["png"].is_file()


def test_wilcoxon_holm_posthoc_and_too_few_methods():
    import scikit_posthocs as sp

    from bench.report.stats import compare_methods

    frame = pd.DataFrame(make_rows(subsets=("base", "novel", "all", "even")))
    c = compare_methods(frame, posthoc="wilcoxon")
    cells = frame.groupby(["classes", "shots", "method"], sort=False)["acc"].mean().unstack("method")
    long = cells[list(METHODS)].reset_index(drop=True).melt(var_name="method", value_name="value")
    want = sp.posthoc_wilcoxon(long, val_col="value", group_col="method", p_adjust="holm", zero_method="zsplit")
    assert np.allclose(c.pvalues.loc[list(METHODS), list(METHODS)], want.loc[list(METHODS), list(METHODS)])
    two = compare_methods(frame[frame["method"].isin(["qi2018", "knn"])])
    assert not two.defined and "at least 3 methods" in two.notes[0]
    with pytest.raises(BenchError, match="--posthoc 'tukey' is not one of nemenyi, wilcoxon"):
        compare_methods(frame, posthoc="tukey")


def test_partial_and_missing_runs_are_reported_not_skipped(two_runs, tmp_path):
    make_run(tmp_path / "runs" / "c", make_rows(backbone="third"), complete=False)
    (tmp_path / "runs" / "d").mkdir()  # started, killed before run.json
    with pytest.raises(BenchError, match=r"runs/c: run.json does not say complete: true"):
        build_report([str(tmp_path / "runs" / "*")], tmp_path / "rep")
    report = build_report([str(tmp_path / "runs" / "*")], tmp_path / "rep", skip_incomplete=True)
    left_out = {Path(p).name for p, _ in report.merged.skipped}
    assert left_out == {"c", "d"}
    html = report.html.read_text()
    assert 'id="left-out"' in html and "runs/c" in html and "runs/d" in html
    assert "third" not in pd.read_csv(tmp_path / "rep" / "tables" / "cells.csv")["backbone"].tolist()
    with pytest.raises(BenchError, match="does not exist"):
        build_report([str(tmp_path / "runs" / "nope")], tmp_path / "rep")
    with pytest.raises(BenchError, match="no run folder matches"):
        build_report([str(tmp_path / "nothing" / "*")], tmp_path / "rep")


def test_same_cell_in_two_runs_is_an_error_unless_prefer_newest(tmp_path):
    old = make_run(tmp_path / "runs" / "old", make_rows(seed=3))
    time.sleep(0.05)
    new = make_run(tmp_path / "runs" / "new", make_rows(seed=4, offset=0.05))
    os.utime(old / "run.json", (1_000_000, 1_000_000))
    with pytest.raises(BenchError, match=rf"runs .*new and .*old both hold the cell \(backbone=tiny-digits.*"
                                         rf"\({len(make_rows())} cells clash in all\)"):
        build_report([str(old), str(new)], tmp_path / "rep")
    report = build_report([str(old), str(new)], tmp_path / "rep", prefer="newest")
    assert len(report.merged.frame) == len(make_rows()) and len(report.merged.replaced) == len(make_rows())
    assert set(report.merged.frame["run"]) == {str(new.resolve())}
    assert "newest run was kept" in report.html.read_text()


def test_runs_of_one_task_with_other_queries_are_not_averaged_together(tmp_path):
    suite = {"name": "tiny-suite", "dataset": "digits", "queries": "test", "holdout": 0.25, "class_splits": {}}
    a = make_run(tmp_path / "a", make_rows(seeds=(0, 1)), task=suite)
    b = make_run(tmp_path / "b", make_rows(seeds=(5, 6)), task={**suite, "queries": "rest"})
    with pytest.raises(BenchError, match=r"both hold task 'tiny-suite' but with different queries \('test' vs 'rest'\)"):
        build_report([str(a), str(b)], tmp_path / "rep")
    # other seeds drawn the same way are more repeats of the same condition
    c = make_run(tmp_path / "c", make_rows(seeds=(5, 6)), task=suite)
    report = build_report([str(a), str(c)], tmp_path / "rep")
    assert sorted(report.merged.frame["seed"].unique()) == [0, 1, 5, 6]


def test_a_run_repeating_a_cell_is_named(tmp_path):
    rows = make_rows()
    run = make_run(tmp_path / "dup", rows + rows[:1])
    with pytest.raises(BenchError, match=r"run .*dup holds the cell .* more than once"):
        build_report([str(run)], tmp_path / "rep")


def test_runs_with_different_metric_columns_cannot_be_merged(tmp_path):
    a = make_run(tmp_path / "a", make_rows())
    b = make_run(tmp_path / "b", make_rows(backbone="x", extra_metrics=False))
    with pytest.raises(BenchError, match=r"do not have the same metric columns .*balanced_acc"):
        build_report([str(a), str(b)], tmp_path / "rep")
    with pytest.raises(BenchError, match="metric 'top5' is not a column"):
        build_report([str(a)], tmp_path / "rep", metric="top5")


def test_report_never_overwrites_what_is_not_a_report(tmp_path):
    small = {m: METHODS[m] for m in ("qi2018", "knn", "westerhoff2025")}
    a = make_run(tmp_path / "runs" / "a", make_rows(methods=small))
    b = make_run(tmp_path / "runs" / "b", make_rows(backbone="other-net", methods=small))
    with pytest.raises(BenchError, match="is not a report folder"):
        build_report([str(a)], b)  # -o pointing at a run folder
    assert (b / "results.csv").is_file()
    assert write_run_report(a) == a / "report" / "report.html"
    # a report folder among the runs is passed over by the glob, and replaced whole by the next
    first = build_report([str(tmp_path / "runs" / "*")], tmp_path / "runs" / "rep")
    (tmp_path / "runs" / "rep" / "stale.txt").write_text("")
    again = build_report([str(tmp_path / "runs" / "*")], tmp_path / "runs" / "rep")
    assert len(first.merged.runs) == 2 and len(again.merged.runs) == 2
    assert any("is a report folder, not a run" in n for n in again.merged.notes)
    assert not (tmp_path / "runs" / "rep" / "stale.txt").exists()


def test_latex_escapes_names(tmp_path):
    methods = {"my_head 100%": ("l2/mean/l2/l2/max", None, (0.5, 0.6, 0.7)),
               "qi2018": ("l2/mean/l2/l2/max", None, (0.4, 0.5, 0.6))}
    run = make_run(tmp_path / "r", make_rows(methods=methods))
    build_report([str(run)], tmp_path / "rep")
    tex = (tmp_path / "rep" / "tables" / "tiny-suite-digits-tiny-digits-novel.tex").read_text()
    assert r"my\_head 100\%" in tex and "$\\pm$" in tex


def test_cli_report_and_one_line_errors(two_runs, tmp_path, capsys, monkeypatch):
    from bench.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["report", "runs/*", "-o", "out"]) == 0
    printed = capsys.readouterr().out
    assert "report: " in printed and "out/report.html" in printed and "average ranks over" in printed
    assert "westerhoff2025" in printed
    assert main(["report", "runs/zzz*"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run folder matches 'runs/zzz*'" in err
    assert main(["report", "runs/a", "--heatmap-shots", "7"]) == 2
    assert "--heatmap-shots 7 is not a shot count" in capsys.readouterr().err


def test_diagnostics_scatter_when_diagnose_results_are_present(two_runs, tmp_path):
    a, _ = two_runs
    diag = tmp_path / "runs" / "diag"
    diag.mkdir()
    pd.DataFrame([{"backbone": b, "classes": c, "nc1": v, "logme": 1 / v, "gc": v * 2}
                  for b, c, v in [("tiny-digits", "base", 0.05), ("tiny-digits", "novel", 1.7),
                                  ("other-net", "base", 0.1), ("other-net", "novel", 2.0),
                                  ("third", "novel", 2.5)]]).to_csv(diag / "diagnostics.csv", index=False)
    acc = pd.DataFrame(make_rows(subsets=("base", "novel")) + make_rows(backbone="other-net", subsets=("base", "novel"))
                       + make_rows(backbone="third"))
    acc.to_csv(diag / "accuracy.csv", index=False)
    report = build_report([str(tmp_path / "runs" / "*")], tmp_path / "rep")
    assert report.figures["diagnostics"]["png"].stat().st_size > 1000
    assert 'id="diagnostics"' in report.html.read_text()


def test_one_method_name_with_two_specs_is_refused(tmp_path):
    a = make_run(tmp_path / "a", make_rows())
    changed = dict(METHODS, westerhoff2025=("l2/kmeans:k=10/l2/l2/max", 10, (0.5, 0.68, 0.85)))
    b = make_run(tmp_path / "b", make_rows(backbone="other", methods=changed))
    with pytest.raises(BenchError, match=r"method 'westerhoff2025' is l2/kmeans:k=20/l2/l2/max in run .*a but "
                                         r"l2/kmeans:k=10/l2/l2/max in run .*b"):
        build_report([str(a), str(b)], tmp_path / "rep")


def test_one_seed_shows_no_spread(tmp_path):
    from bench.report.terminal import summary_text

    rows = make_rows(methods={m: METHODS[m] for m in ("qi2018", "knn")}, seeds=(0,))
    report = build_report([str(make_run(tmp_path / "one", rows))], tmp_path / "rep")
    table = pd.read_csv(tmp_path / "rep" / "tables" / "tiny-suite-digits-tiny-digits-novel.csv")
    assert table["std"].isna().all() and table["ci95_low"].isna().all()
    md = (tmp_path / "rep" / "report.md").read_text().split("## acc")[1]
    assert "one seed (no spread)" in md
    assert not [line for line in md.splitlines() if line.startswith("|") and "±" in line]
    assert "at least 3 methods" in " ".join(report.comparison.notes) and "cd" not in report.figures
    text = summary_text(rows, color=False)
    assert "±" not in text and "one seed (no spread)" in text


def test_report_under_a_file_is_a_one_line_error(two_runs, tmp_path, capsys):
    from bench.cli import main

    (tmp_path / "afile").write_text("")
    assert main(["report", str(two_runs[0]), "-o", str(tmp_path / "afile" / "rep")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write the report under") and "\n" not in err
