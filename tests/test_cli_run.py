import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import BenchError
from bench.cli import main
from bench.config import load_config

TASK = """name: tiny-suite
dataset: digits
class_splits: {base: [0, 1, 2, 3, 4], novel: [5, 6, 7, 8, 9]}
classes: [novel]
shots: [1, 5]
queries: test
seeds: [0, 1]
"""


def _wandb_records(run_file: Path) -> list[dict]:
    """Records of an offline run, read back with W&B's own inspector."""
    wandb_bin = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb_bin), "leet", "inspect", "--json", str(run_file)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _results(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in r.items() if k != "gen_time_s"} for r in csv.DictReader(f)]


def test_quickstart_results_are_identical_across_two_runs(tmp_path, forks):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    outs = []
    for name in ("a", "b"):  # separate caches and processes: extraction must be deterministic too
        proc = forks.bench(["quickstart", f"cache_dir={tmp_path / name}", f"out_dir={tmp_path / 'runs'}",
                            f"name={name}"], cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(proc.stdout)
    a, b = _results(tmp_path / "runs" / "a" / "results.csv"), _results(tmp_path / "runs" / "b" / "results.csv")
    assert len(a) == 2 * 4 * 3 * 11 and a == b
    assert "On 'novel' classes at higher shot counts" in outs[0]
    assert "results:" in outs[0] and "novel" in outs[0]


@pytest.mark.parametrize(
    "args, words",
    [
        (["run", "trainer.devcies=2"], "unknown key 'trainer.devcies'"),
        (["run", "backbone.name=vit-huge"], "unknown backbone 'vit-huge'"),
        (["run", "dataset.name=mnist"], "unknown dataset 'mnist'"),
        (["run", "methods=[l2/kmeans:k=0/l2/l2/max]"], "k=0"),
        (["run", "task=nope"], "task suite 'nope' not found"),
        (["run", "-c", "missing.yaml"], "config file missing.yaml does not exist"),
        (["run", "trainer.devices"], "must look like key=value"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, monkeypatch, capsys, args, words):
    monkeypatch.chdir(tmp_path)
    assert main(args + ["wandb.mode=disabled"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_unwritable_output_folder_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("")
    assert main(["run", f"out_dir={tmp_path / 'file'}", "wandb.mode=disabled"]) == 2
    assert "cannot write to output folder" in capsys.readouterr().err


def test_imprint_without_a_cache_says_what_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["imprint", f"cache_dir={tmp_path / 'empty'}", "wandb.mode=disabled"]) == 2
    assert "run `bench extract`" in capsys.readouterr().err


def test_config_file_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("backbone: {name: tiny-digits}\ntrainer: {devices: 2}\nmethods: [qi2018]\n")
    cfg = load_config(cfg_file, ["trainer.strategy=ddp", "extract.dtype=float16"])
    assert cfg.trainer.devices == 2 and cfg.trainer.strategy == "ddp" and cfg.extract.dtype == "float16"
    assert cfg.methods == ["qi2018"] and cfg.task.suite == "digits-base-novel"
    with pytest.raises(BenchError, match="known keys in 'extract'"):
        load_config(None, ["extract.bsz=3"])


def test_methods_command_lists_presets_and_expands_grids(capsys):
    assert main(["methods"]) == 0
    assert "westerhoff2025" in capsys.readouterr().out
    assert main(["methods", "l2/kmeans:k=[1,5]|mean/l2/l2/max|mnn:m=3"]) == 0
    out = capsys.readouterr().out
    assert "l2/kmeans:k=5/l2/l2/mnn:m=3" in out and "dropped l2/mean/l2/l2/mnn:m=3" in out


def test_dataloader_workers_default_to_the_hardware():
    from bench.extract.extractor import workers_for

    assert workers_for("auto", "cpu", 2) == 0
    assert 0 <= workers_for("auto", "gpu", 1) <= 8
    assert workers_for(3, "gpu", 1) == 3
    with pytest.raises(BenchError, match="num_workers"):
        workers_for(-1, "cpu", 1)
