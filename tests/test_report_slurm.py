"""The SLURM array wrapper, run locally: of a three-entry array, one task killed midway and the
array re-submitted (the finished entries skipped); the merged report must equal the one from
uninterrupted runs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import BenchError
from bench.report.build import build_report
from tests.helpers import copy_cache

ROOT = Path(__file__).resolve().parents[1]
WRAPPER = ROOT / "scripts" / "slurm" / "grid_task.sh"
TASK = """name: {name}
dataset: digits
class_splits: {{base: [0, 1, 2, 3, 4], novel: [5, 6, 7, 8, 9]}}
classes: [{classes}]
shots: [1, 5]
queries: 20
seeds: [0, 1]
"""
CONFIG = """methods: [qi2018, "l2/kmeans:k=[2,3]/l2/l2/max"]
extract: {batch_size: 512}
trainer: {accelerator: cpu, devices: 1}
wandb: {mode: disabled}
"""


@pytest.fixture(scope="module")
def grid(tmp_path_factory, quickstart_cache):
    root = tmp_path_factory.mktemp("grid")
    copy_cache(quickstart_cache, root / "cache")  # tiny-digits on digits, as every task reads it
    for name, classes in (("t-novel", "novel"), ("t-base", "base"), ("t-all", "all")):
        (root / f"{name}.yaml").write_text(TASK.format(name=name, classes=classes))
    (root / "config.yaml").write_text(CONFIG + f"cache_dir: {root / 'cache'}\n")
    (root / "grid.txt").write_text("# backbone task\n" + "".join(
        f"tiny-digits {root / name}.yaml\n" for name in ("t-novel", "t-base", "t-all")))
    return root


def task(grid: Path, out: Path, task_id: int, wait: bool = True):
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(task_id), "BENCH_OUT_DIR": str(out),
           "BENCH_PYTHON": sys.executable, "WANDB_MODE": "disabled"}
    env.pop("SLURM_JOB_ID", None)
    cmd = ["bash", str(WRAPPER), str(grid / "config.yaml"), str(grid / "grid.txt")]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=grid, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    proc = subprocess.run(cmd, env=env, cwd=grid, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def complete(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("complete") is True
    except (OSError, ValueError):
        return False


def tables(report_dir: Path) -> dict[str, str]:
    """Every table of the report but the list of run folders (their paths differ)."""
    return {p.name: p.read_text() for p in sorted((report_dir / "tables").glob("*.csv")) if p.name != "runs.csv"}


def bench_run(forks, grid: Path, out: Path, stem: str):
    """The `bench run` that the wrapper runs for the entry ``tiny-digits STEM.yaml``, forked."""
    return forks.start(["run", "-c", grid / "config.yaml", "backbone.name=tiny-digits", f"task={grid / stem}.yaml",
                        f"name={stem}-tiny-digits", f"out_dir={out}"], module="bench.cli", cwd=grid,
                       env={**os.environ, "WANDB_MODE": "disabled"})


def test_array_resumes_after_a_kill_and_merges_to_the_uninterrupted_report(grid, tmp_path, forks):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    names = ["t-all-tiny-digits", "t-base-tiny-digits", "t-novel-tiny-digits"]
    # The array's first submission: entry 2 through the wrapper, killed midway; entries 1 and 3 and
    # an uninterrupted entry 2 as the command the wrapper runs, meanwhile.
    killed = task(grid, resumed, 2, wait=False)
    runs = [bench_run(forks, grid, resumed, "t-novel"), bench_run(forks, grid, resumed, "t-all"),
            bench_run(forks, grid, straight, "t-base")]
    victim = resumed / "t-base-tiny-digits"
    deadline = time.monotonic() + 120
    # midway: once the run has started writing (its folder exists), before it completes
    while not victim.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL and not complete(victim)
    for run in runs:
        assert run.wait(300) == 0, run.stderr[-3000:]
    with pytest.raises(BenchError, match="t-base-tiny-digits"):
        build_report([str(resumed / "*")], tmp_path / "partial")  # the killed task is named, not skipped

    # The uninterrupted array: entry 2 run straight, entries 1 and 3 as they finished (the
    # re-submission must leave them alone); its report is built while the array is re-submitted.
    done = {n: (resumed / n / "run.json").stat().st_mtime_ns for n in ("t-novel-tiny-digits", "t-all-tiny-digits")}
    for name in done:
        shutil.copytree(resumed / name, straight / name)
    resubmitted = {i: task(grid, resumed, i, wait=False) for i in (1, 2, 3)}
    a = build_report([str(straight / "*")], tmp_path / "report-straight")
    outputs = {i: proc.communicate(timeout=300)[0] for i, proc in resubmitted.items()}
    for i, proc in resubmitted.items():
        assert proc.returncode == 0, outputs[i][-3000:]
    # entries 1 and 3 are found under the wrapper's names for them, and skipped
    assert "skipped" in outputs[1] and "skipped" in outputs[3] and "skipped" not in outputs[2]
    assert {n: (resumed / n / "run.json").stat().st_mtime_ns for n in done} == done
    assert sorted(p.name for p in resumed.iterdir()) == names and all(complete(resumed / n) for n in names)

    b = build_report([str(resumed / "*")], tmp_path / "report-resumed")
    assert len(b.merged.runs) == 3 and not b.merged.skipped
    ta, tb = tables(a.out_dir), tables(b.out_dir)
    assert len(ta) >= 6 and ta == tb
    # the report of real runs: page, markdown, tables as CSV and LaTeX, the CD diagram
    assert b.html.stat().st_size > 10_000 and (b.out_dir / "report.md").is_file()
    assert len(list((b.out_dir / "tables").glob("t-*-digits-tiny-digits-*.tex"))) == 3
    assert b.figures["cd"]["svg"].stat().st_size > 1000


def test_wrapper_names_a_missing_entry(grid, tmp_path):
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "4", "BENCH_OUT_DIR": str(tmp_path), "BENCH_PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(WRAPPER), str(grid / "config.yaml"), str(grid / "grid.txt")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "has 3 entries, there is no entry 4 (submit with --array=1-3)" in proc.stderr
