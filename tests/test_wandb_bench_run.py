"""One W&B run per bench run, read back offline with W&B's own reader (W&B is not mocked)."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench.report.wandb_log import log_bench_run
from tests.helpers import make_rows, make_run


def wandb_records(run_file: Path) -> list[dict]:
    """Records of an offline run, read back with W&B's own inspector."""
    wandb_bin = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb_bin), "leet", "inspect", "--json", str(run_file)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def read_offline_run(folder: Path) -> dict:
    records = wandb_records(next(folder.glob("run-*.wandb")))
    run = next(r["run"] for r in records if r.get("type") == "run")
    summary, history = {}, {}
    for r in records:
        if r.get("type") == "summary":
            summary.update(r["summary"].get("update", {}))
        if r.get("type") == "history":
            history.update(r["history"].get("item", {}))
    artifacts = [r["artifact"] for r in records if r.get("type") == "artifact"]
    return {"run": run, "config": run["config"]["update"], "summary": summary, "history": history,
            "artifacts": artifacts}


def test_one_offline_run_holds_config_table_summary_plots_and_artifact(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    rows = make_rows(subsets=("base", "novel"))
    run_dir = make_run(tmp_path / "runs" / "wb", rows, config={"task": "tiny-suite", "methods": ["qi2018"],
                                                               "trainer": {"devices": 1}})
    config = json.loads((run_dir / "run.json").read_text())["config"]
    where = log_bench_run(rows, config, "wb", run_dir, mode="offline")
    folders = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 1 and Path(where) == folders[0]
    got = read_offline_run(folders[0])
    assert got["run"]["run_group"] == "tiny-suite@digits" and got["run"]["job_type"] == "bench-run"
    assert set(got["run"]["tags"]) == {"task:tiny-suite", "dataset:digits", "backbone:tiny-digits"}
    assert got["config"]["trainer"] == {"devices": 1} and got["config"]["methods"] == ["qi2018"]
    frame = pd.DataFrame(rows)
    want = frame[(frame.classes == "novel") & (frame.method == "westerhoff2025") & (frame.shots == "5")]["acc"].mean()
    assert got["summary"]["novel/westerhoff2025/acc@5shot"] == pytest.approx(want)
    assert "base/qi2018/acc@allshot" in got["summary"]
    # the results table: one row per method x episode, every method field a column
    table_files = list((folders[0] / "files" / "media" / "table").glob("results_*.table.json"))
    assert len(table_files) == 1
    table = json.loads(table_files[0].read_text())
    assert len(table["data"]) == len(rows)
    assert {"method", "spec", "norm_pre", "gen", "gen.k", "norm_post", "norm_inf", "agg", "acc",
            "seed"} <= set(table["columns"])
    # line plots of accuracy against shots, as a W&B chart and as the report's figure
    assert any(k.startswith("plots/novel/acc_vs_shots") for k in got["history"]), got["history"].keys()
    assert (folders[0] / "files" / "media" / "images").is_dir()
    # results.parquet + run.json as an artifact, with copies kept inside the run's own folder
    results = [a for a in got["artifacts"] if a["type"] == "results"]
    assert len(results) == 1
    entries = {c["path"]: c for c in results[0]["manifest"]["contents"]}
    assert set(entries) == {"results.parquet", "run.json"}
    for name, entry in entries.items():
        assert Path(entry["local_path"]).is_relative_to(folders[0])
        assert int(entry["size"]) == (run_dir / name).stat().st_size


def test_four_runs_leave_four_offline_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for i, backbone in enumerate(["a", "b", "c", "d"]):
        rows = make_rows(backbone=backbone, seed=i)
        run_dir = make_run(tmp_path / "runs" / backbone, rows)
        log_bench_run(rows, {"name": backbone}, backbone, run_dir, mode="offline")
    folders = sorted(tmp_path.glob("runs/*/wandb/offline-run-*"))
    assert len(folders) == 4 and {f.parents[1].name for f in folders} == {"a", "b", "c", "d"}


def test_disabled_writes_nothing(tmp_path):
    rows = make_rows()
    run_dir = make_run(tmp_path / "r", rows)
    assert log_bench_run(rows, {}, "r", run_dir, mode="disabled") is None
    assert not (run_dir / "wandb").exists()


TASK = """name: tiny-suite
dataset: digits
class_splits: {base: [0, 1, 2, 3, 4], novel: [5, 6, 7, 8, 9]}
classes: [novel]
shots: [1, 5]
queries: test
seeds: [0, 1]
"""


def test_wandb_offline_run_holds_config_keys_and_metrics(tmp_path, monkeypatch, quickstart_cache):
    """A real bench run, then its one W&B run (moved here from test_cli_run, which asserted one
    W&B run per method)."""
    import torch

    from bench.cli import main
    from bench.runtime import torch_threads

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "t.yaml").write_text(TASK)
    with torch_threads(torch.get_num_threads()):  # a run sets this process's threads
        code = main(["run", f"task={tmp_path / 't.yaml'}", "methods=[qi2018,westerhoff2025]",
                     f"cache_dir={quickstart_cache}", "wandb.mode=disabled", "name=wb"])  # a cache hit: read only
    assert code == 0
    run_dir = tmp_path / "runs" / "wb"
    rows = pd.read_csv(run_dir / "results.csv").to_dict("records")
    config = json.loads((run_dir / "run.json").read_text())["config"]
    log_bench_run(rows, config, "wb", run_dir, mode="offline")
    folders = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 1  # one W&B run for the bench run, not one per method
    got = read_offline_run(folders[0])
    assert got["run"]["display_name"] == "wb" and got["run"]["run_group"] == "tiny-suite@digits"
    assert got["config"]["backbone"]["name"] == "tiny-digits" and "t.yaml" in json.dumps(got["config"]["task"])
    assert got["config"]["methods"] == ["qi2018", "westerhoff2025"]
    frame = pd.read_csv(run_dir / "results.csv", dtype={"shots": str})
    for method in ("qi2018", "westerhoff2025"):
        for shots in ("1", "5"):
            want = frame[(frame.method == method) & (frame.shots == shots)]["acc"].mean()
            assert got["summary"][f"novel/{method}/acc@{shots}shot"] == pytest.approx(want)
    table = json.loads(next((folders[0] / "files" / "media" / "table").glob("results_*.table.json")).read_text())
    columns = table["columns"]
    by_method = {r[columns.index("method")]: r for r in table["data"]}
    west = by_method["westerhoff2025"]
    assert west[columns.index("gen")] == "kmeans" and west[columns.index("gen.k")] == 20
    assert west[columns.index("norm_pre")] == "l2" and len(table["data"]) == len(frame)


def test_report_wandb_logs_the_merged_report_as_its_own_run(tmp_path, monkeypatch, capsys):
    from bench.cli import main

    monkeypatch.chdir(tmp_path)
    make_run(tmp_path / "runs" / "a", make_rows())
    make_run(tmp_path / "runs" / "b", make_rows(backbone="other", seed=1))
    assert main(["report", "runs/*", "-o", "out/report", "--wandb"]) == 0
    assert "W&B: " in capsys.readouterr().out
    folders = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(folders) == 1 and not (tmp_path / "runs" / "a" / "wandb").exists()
    got = read_offline_run(folders[0])
    assert got["run"]["job_type"] == "report" and got["config"]["metric"] == "acc"
    assert len(got["config"]["runs"]) == 2 and "average_rank/westerhoff2025" in got["summary"]
    assert any(k.startswith("figures/cd") for k in got["history"])
    report_art = next(a for a in got["artifacts"] if a["type"] == "report")
    paths = {c["path"] for c in report_art["manifest"]["contents"]}
    assert {"report.html", "report.md", "ranks.csv"} <= paths
