"""The package as a user installs it: a wheel in a fresh venv, run from a folder outside the
repository, with the task suites and configs it ships; and the rule that picks a user's own
suite or config over the shipped copy."""

import csv
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from bench import BenchError
from bench.config import load_config
from bench.data.tasks import TaskSuite

ROOT = Path(__file__).resolve().parents[1]

# Run in the fresh venv: the shipped suites and configs by name and by repository path, and
# errors that list what ships.
CHECKS = r"""
import bench
from bench.cli import main

print("bench at", bench.__file__)
assert main(["run", "--dry-run", "task=cifar100"]) == 0
assert main(["run", "--dry-run", "-c", "configs/examples/hf.yaml"]) == 0
assert main(["run", "--dry-run", "task=nope"]) == 2
assert main(["suite", "vtab-1k", "--dry-run", "methods=[ncm]"]) == 0  # its member tasks (tasks/vtab-1k/) ship too
assert main(["run", "--dry-run", "plugins=[configs/examples/my_gens.py]", "methods=[l2/trimmed/l2/l2/max]"]) == 0
"""


def _run(args: list, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{args[:4]}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_the_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    # The wheel is built from a copy, so the build writes nothing (build/, *.egg-info) into the
    # checkout that other test runs share. The links bench/_resources/{tasks,configs} are
    # relative, so they lead into the copy's own tasks/ and configs/.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("bench", "tasks", "configs"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=skip)
    offline = {**os.environ, "PIP_NO_INDEX": "1"}
    # No build isolation: the build uses this environment's setuptools (the test extra's), offline.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
          src], env=offline, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("imprint_bench-*.whl"))

    # A fresh venv that sees this environment's packages (torch and the rest) through a .pth
    # line, so nothing is downloaded. Such a line adds a folder to sys.path without reading the
    # .pth files in it, so this checkout's editable install stays out; and the venv's own
    # site-packages comes first, so the wheel's bench is the one imported.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    outer = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "outer_environment.pth").write_text("\n".join(outer) + "\n")
    _run([python, "-m", "pip", "install", "--no-deps", "-q", wheel], env=offline, cwd=tmp_path)

    work = tmp_path / "work"  # an empty folder: no tasks/ or configs/ to fall back on
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(WANDB_MODE="disabled", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    checks = _run([python, "-c", CHECKS], cwd=work, env=env).stdout
    where = Path(checks.split("bench at ", 1)[1].splitlines()[0])
    assert where.is_relative_to(venv) and not where.is_relative_to(ROOT)
    assert "task      cifar100: classes" in checks and "backbone  torchvision:resnet50" in checks
    assert "methods   1: l2/trimmed/l2/l2/max" in checks
    shipped = where.parent / "_resources" / "tasks"
    assert shipped.is_dir() and not shipped.is_symlink() and (shipped / "digits-base-novel.yaml").is_file()

    bench = venv / "bin" / "bench"
    out = _run([bench, "quickstart", "wandb.mode=disabled", "task.seeds=[0]", "task.shots=[1,5]",
                "methods=[qi2018,simpleshot]", "name=wheel"], cwd=work, env=env).stdout
    assert "acc (%) on 'novel' classes" in out and "results: runs/wheel/results.csv" in out
    rows = list(csv.DictReader(open(work / "runs" / "wheel" / "results.csv")))
    assert len(rows) == 2 * 2 * 2 and {r["classes"] for r in rows} == {"base", "novel"}
    methods = _run([bench, "methods"], cwd=work, env=env).stdout
    assert "presets:" in methods and "westerhoff2025" in methods and "GEN (proxies per class)" in methods


def test_a_suite_or_config_that_exists_here_wins_over_the_shipped_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert TaskSuite.load("digits-base-novel").seeds == [0, 1, 2]  # the shipped suite
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "digits-base-novel.yaml").write_text("name: mine\ndataset: digits\nseeds: [7]\n")
    (tmp_path / "tasks" / "own.yaml").write_text("name: own\ndataset: digits\n")
    assert TaskSuite.load("digits-base-novel").seeds == [7]
    assert TaskSuite.load("tasks/cifar100.yaml").dataset == "tv:CIFAR100"  # not here: the shipped file
    with pytest.raises(BenchError, match=r"known suites: aircraft, .*digits-base-novel, .*own, "):
        TaskSuite.load("nope")
    with pytest.raises(BenchError, match="task suite 'elsewhere/x.yaml' not found"):
        TaskSuite.load("elsewhere/x.yaml")  # only paths under tasks/ have a shipped copy
    assert load_config("configs/quickstart.yaml").reference == "base"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "quickstart.yaml").write_text("methods: [qi2018]\n")
    assert load_config("configs/quickstart.yaml").methods == ["qi2018"]
    with pytest.raises(BenchError, match=r"config file configs/x.yaml does not exist here nor among the shipped "
                                         r"configs \(configs/examples/clip.yaml, configs/examples/hf.yaml, "):
        load_config("configs/x.yaml")
    with pytest.raises(BenchError, match=r"^config file x.yaml does not exist$"):
        load_config("x.yaml")
