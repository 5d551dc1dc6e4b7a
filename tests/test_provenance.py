"""What a run records so that others can cite and compare it: run.json's provenance fields, the
results schema and its version, the refusal to merge runs of two schemas, suite versions."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import pipeline, provenance
from bench.cli import main
from bench.config import load_config
from bench.data import suite_lock
from bench.errors import BenchError
from bench.extract.extractor import cached_stats
from bench.report import schema
from bench.report.runs import load_runs
from tests.helpers import make_rows, make_run

ROOT = Path(__file__).resolve().parents[1]
TASK = """name: tiny-provenance
dataset: digits
class_splits: {base: [0, 1, 2, 3, 4], novel: [5, 6, 7, 8, 9]}
classes: [novel]
shots: [1]
queries: test
seeds: [0]
"""


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny runs on one fresh cache: the first extracts, the second finds the cache."""
    root = tmp_path_factory.mktemp("provenance")
    (root / "task.yaml").write_text(TASK)
    pipeline.quiet_lightning()
    out = []
    for name in ("first", "second"):
        cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                          [f"cache_dir={root / 'cache'}", f"out_dir={root / 'runs'}", "wandb.mode=disabled",
                           f"task={root / 'task.yaml'}", "methods=[ncm,logreg]", "reference=null", f"name={name}"])
        result = pipeline.run(cfg)
        out.append((result, json.loads((root / "runs" / name / "run.json").read_text())))
    return out


def test_run_json_records_versions_commit_devices_and_extraction(two_runs):
    (result, record), (_, again) = two_runs
    assert schema.run_problems(record) == [] and schema.run_problems(again) == []
    assert record["schema_version"] == schema.SCHEMA_VERSION == 2
    versions = record["versions"]
    assert set(versions) == {"bench", "python", *provenance.DISTRIBUTIONS}
    assert all(isinstance(versions[k], str) for k in ("bench", "python", "torch", "lightning", "torchmetrics"))
    assert record["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", record["git_commit"])
    assert record["devices"] and all(isinstance(d, str) and d for d in record["devices"])
    from bench.backbones.registry import build_backbone

    model = build_backbone("tiny-digits").model
    assert record["backbone_parameters"] == sum(p.numel() for p in model.parameters()) > 0
    assert record["task"]["version"] == "1"  # the resolved suite carries its version
    for split, count in (("train", 1201), ("test", 596)):  # the digits splits, extracted by the first run
        made = record["extraction"][split]
        assert made["from_cache"] is False and made["images"] == count and made["peak_memory_bytes"] > 0
        assert made["images_per_second"] > 0 and made["device"] == record["devices"][0]
        assert again["extraction"][split] == cached_stats()  # the second run found the cache
    assert schema.row_problems(result.rows) == []
    assert {r["training_free"] for r in result.rows} == {True, False}  # ncm is, logreg is not


def test_results_table_cites_its_schema(two_runs):
    pq = pytest.importorskip("pyarrow.parquet")
    result, _ = two_runs[0]
    meta = pq.read_schema(result.out_dir / "results.parquet").metadata
    assert meta[b"bench_schema_version"] == str(schema.SCHEMA_VERSION).encode()


def test_undocumented_columns_and_fields_are_named():
    row = {**make_rows()[0], "mystery": 1.0, "acc": "high"}
    found = schema.row_problems([row])
    assert "undocumented column 'mystery'" in found and any("'acc' holds str" in p for p in found)
    assert "missing field 'versions'" in schema.run_problems({"complete": True})
    assert "| `git_commit` |" in schema.markdown()


def test_report_refuses_runs_of_two_schema_versions(tmp_path, capsys):
    old = make_run(tmp_path / "runs" / "old", make_rows(seed=3))
    new = make_run(tmp_path / "runs" / "new", make_rows(backbone="other-net", seed=4))
    record = json.loads((new / "run.json").read_text())
    (new / "run.json").write_text(json.dumps({**record, "schema_version": 2}))
    assert main(["report", str(tmp_path / "runs" / "*"), "-o", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"schema 1: {old}" in err and f"schema 2: {new}" in err
    assert "re-run" in err and "separately" in err
    (new / "run.json").write_text(json.dumps(record))  # both schema 1 again: merged
    assert len(load_runs([str(tmp_path / "runs" / "*")]).runs) == 2


def test_git_commit_only_from_a_bench_checkout(tmp_path, monkeypatch):
    outside = tmp_path / "site-packages" / "bench"
    outside.mkdir(parents=True)
    assert provenance.git_state(outside) == {"git_commit": None, "git_dirty": None}
    if shutil.which("git"):
        # an installed copy inside someone else's repository: that repository's commit is not bench's
        subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                        "--allow-empty", "-m", "x"], check=True)
        assert provenance.git_state(outside)["git_commit"] is None
        if (ROOT / ".git").exists():
            head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  check=True).stdout.strip()
            state = provenance.git_state()
            assert state["git_commit"] == head and isinstance(state["git_dirty"], bool)
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))  # no git at all: nothing, and no error
    assert provenance.git_state() == {"git_commit": None, "git_dirty": None}


def test_shipped_suites_match_their_lock():
    found = suite_lock.problems(suite_lock.packaged.folder("tasks"))
    assert not found, "\n".join(found)


def test_a_suite_changed_without_a_new_version_is_caught(tmp_path, capsys):
    suite = tmp_path / "mine.yaml"
    suite.write_text("name: mine\ndataset: digits\nshots: [1, 5]\n")
    assert suite_lock.main(["--root", str(tmp_path)]) == 0 and suite_lock.problems(tmp_path) == []
    suite.write_text("# a comment and new layout change nothing\nname: mine\ndataset: digits\nshots: [1,5]\n")
    assert suite_lock.problems(tmp_path) == []
    suite.write_text("name: mine\ndataset: digits\nshots: [1, 10]\n")
    found = suite_lock.problems(tmp_path)
    assert len(found) == 1 and "mine.yaml" in found[0] and "bump its version" in found[0]
    assert suite_lock.LOCK_COMMAND in found[0]
    with pytest.raises(BenchError, match="mine.yaml: its content changed"):
        suite_lock.write_lock(tmp_path)  # the lock command does not paper over it
    assert suite_lock.main(["--check", "--root", str(tmp_path)]) == 1
    suite.write_text("name: mine\ndataset: digits\nshots: [1, 10]\nversion: 2\n")
    assert "version 1 -> 2 is not locked yet" in suite_lock.problems(tmp_path)[0]
    assert suite_lock.main(["--root", str(tmp_path)]) == 0 and suite_lock.problems(tmp_path) == []
    capsys.readouterr()


def test_lock_script_is_a_thin_wrapper(tmp_path):
    (tmp_path / "s.yaml").write_text("name: s\ndataset: digits\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "lock_suites.py"), "--root", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 0 and (tmp_path / suite_lock.LOCK_NAME).is_file(), proc.stderr
