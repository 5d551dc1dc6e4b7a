"""bench.runtime: the one place for thread shares, W&B modes, slugs and atomic writes."""

import os
import subprocess
import sys

import pytest

from bench import runtime
from bench.errors import BenchError


def test_thread_share_takes_the_users_choice_else_an_equal_share(monkeypatch):
    monkeypatch.delenv("BENCH_THREADS", raising=False)
    monkeypatch.setenv(runtime.USER_THREADS_ENV, "")  # the user set no OMP_NUM_THREADS
    cpus = runtime.available_cpus()
    assert runtime.thread_share(1) == cpus
    assert runtime.thread_share(2) == max(1, cpus // 2)
    assert runtime.thread_share(10 * cpus) == 1  # never zero threads
    monkeypatch.setenv(runtime.USER_THREADS_ENV, "3")  # the user's OMP_NUM_THREADS, recorded
    assert runtime.thread_share(2) == 3
    monkeypatch.setenv("BENCH_THREADS", "5")  # bench's own knob wins
    assert runtime.thread_share(2) == 5
    monkeypatch.setenv("BENCH_THREADS", "two")
    with pytest.raises(BenchError, match="BENCH_THREADS"):
        runtime.thread_share(1)


def test_lightnings_omp_setting_is_not_taken_for_the_users():
    """A launched process inherits the record made before the launch: an empty record means the
    user set nothing, even though Lightning has since set OMP_NUM_THREADS=1."""
    code = "from bench import runtime; print(runtime.thread_share(1))"
    env = {k: v for k, v in os.environ.items() if k not in ("BENCH_THREADS", runtime.USER_THREADS_ENV)}
    launched = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**env, "OMP_NUM_THREADS": "1", runtime.USER_THREADS_ENV: ""}).stdout
    user = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**env, "OMP_NUM_THREADS": "1"}).stdout
    assert int(launched) == runtime.available_cpus() and int(user) == 1


def test_torch_threads_restores_the_callers_count():
    import torch

    before = torch.get_num_threads()
    with runtime.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_wandb_modes(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with W&B credentials
    assert runtime.resolve_wandb_mode("auto") == "offline"  # no credentials: never online
    assert runtime.resolve_wandb_mode("online") == "online"
    assert runtime.resolve_wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert runtime.resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # a cluster without network says so once
    assert runtime.resolve_wandb_mode("auto") == "offline" and runtime.resolve_wandb_mode("online") == "offline"
    with pytest.raises(BenchError, match="auto, offline, online, disabled"):
        runtime.resolve_wandb_mode("sometimes")
    assert runtime.wandb_logger("disabled", tmp_path / "w", "n", {}) is None
    assert not (tmp_path / "w").exists()  # a disabled run leaves no folder behind


def test_slug():
    assert runtime.slug("l2/kmeans:k=5/l2/l2/max") == "l2_kmeans_k=5_l2_l2_max"
    assert runtime.slug("run name", keep="._-") == "run_name"
    assert runtime.slug("a=b", keep="._-") == "a_b"  # W&B artifact names refuse '='
    assert runtime.slug("///") == "x" and len(runtime.slug("y" * 500)) == 120


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "sub" / "f.json"
    runtime.write_json_atomic(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with runtime.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == '{\n  "a": 1\n}' and [p.name for p in path.parent.iterdir()] == ["f.json"]


def test_replace_dir_atomic_keeps_the_complete_old_folder_on_failure(tmp_path):
    target = tmp_path / "report"
    runtime.replace_dir_atomic(target, lambda d: (d / "page.html").write_text("v1"))

    def broken(d):
        (d / "page.html").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        runtime.replace_dir_atomic(target, broken)
    assert (target / "page.html").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    runtime.replace_dir_atomic(target, lambda d: (d / "new.html").write_text("v2"))
    assert sorted(p.name for p in target.iterdir()) == ["new.html"]
    (tmp_path / "afile").write_text("")
    with pytest.raises(BenchError, match="cannot write the report under"):
        runtime.replace_dir_atomic(tmp_path / "afile" / "r", lambda d: None, what="the report")
