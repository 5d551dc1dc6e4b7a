"""Small real data made by the tests themselves."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def write_image_folder(root: Path, classes=("cat", "dog", "emu"), per_class: int = 6, size: int = 12,
                       seed: int = 0) -> Path:
    """root/<class>/<i>.png with class-dependent colours, so classes are separable."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((size, size, 3), dtype=np.float64)
            base[..., c % 3] = 160 + 40 * (c // 3)
            img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


def copy_cache(cache: Path, to: Path) -> Path:
    """A writable copy of a cache's complete entries (a few hundred KB for digits): for a test that
    may write into a cache shared read-only (conftest's quickstart_cache)."""
    to.mkdir(parents=True, exist_ok=True)
    for entry in cache.iterdir():
        if not entry.name.startswith("."):
            shutil.copytree(entry, to / entry.name)
    return to


def rank_envs(env: dict[str, str], world_size: int = 2) -> list[dict[str, str]]:
    """``env`` for each process of one DDP run started as a cluster launcher (srun, a job script)
    starts them: with LOCAL_RANK set, Lightning launches nothing and each process is one rank."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [{**env, "LOCAL_RANK": str(r), "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            for r in range(world_size)]

def one_and_two_processes(forks, tmp_path: Path, first: str, common: list[str]) -> None:
    """``bench <first> common name=one`` on one process, then ``bench imprint common name=two`` from the
    same cache on two ranks started as a cluster launcher starts them (both forked); W&B off and
    the user's thread settings dropped, so each rank takes its share of the cores."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "BENCH_USER_OMP_NUM_THREADS")}
    env["WANDB_MODE"] = "disabled"
    one = forks.bench([first, *common, "name=one"], cwd=tmp_path, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    ranks = [forks.start(["imprint", *common, "name=two", "trainer.devices=2"], module="bench.cli", cwd=tmp_path,
                         env=rank_env) for rank_env in rank_envs(env)]
    for rank in ranks:
        assert rank.wait() == 0, rank.stderr[-3000:]


# name -> (spec, gen.k or None, accuracy at shots 1, 5, all)
METHODS = {
    "qi2018": ("l2/mean/l2/l2/max", None, (0.50, 0.62, 0.72)),
    "westerhoff2025": ("l2/kmeans:k=20/l2/l2/max", 20, (0.50, 0.68, 0.85)),
    "knn": ("l2/all/none/l2/mnn:m=5,metric=cosine", None, (0.49, 0.65, 0.89)),
    "l2/kmeans:k=2/l2/l2/max": ("l2/kmeans:k=2/l2/l2/max", 2, (0.50, 0.64, 0.76)),
    "l2/kmeans:k=5/l2/l2/max": ("l2/kmeans:k=5/l2/l2/max", 5, (0.50, 0.67, 0.82)),
}
SHOTS = ("1", "5", "all")


def make_rows(backbone="tiny-digits", task="tiny-suite", subsets=("novel",), seeds=(0, 1, 2), offset=0.0,
              methods=METHODS, noise=0.02, seed=0, extra_metrics=True):
    """Result rows as bench run writes them, with seeded noise around known accuracies."""
    rng = np.random.default_rng(seed)
    rows = []
    for subset in subsets:
        for si, shots in enumerate(SHOTS):
            for s in seeds:
                for name, (spec, k, accs) in methods.items():
                    pre, gen, post, inf, agg = spec.split("/")
                    acc = float(np.clip(accs[si] + offset + noise * rng.standard_normal(), 0, 1))
                    row = {"backbone": backbone, "dataset": "digits", "task": task, "classes": subset,
                           "shots": shots, "seed": s, "method": name, "spec": spec, "norm_pre": pre,
                           "gen": gen.split(":")[0], "norm_post": post, "norm_inf": inf, "agg": agg.split(":")[0],
                           "acc": acc}
                    if extra_metrics:
                        row.update({"balanced_acc": acc, "macro_f1": acc, "acc_class_5": acc, "gen_time_s": 1e-3,
                                    "num_proxies": 5, "effective_k_min": 1, "effective_k_max": 1})
                    row["gen.k"] = k
                    rows.append(row)
    return rows


def make_run(folder: Path, rows, complete=True, config=None, task=None) -> Path:
    from bench.report.results import write_table

    folder.mkdir(parents=True, exist_ok=True)
    write_table(rows, folder)
    record = {"config": config or {"name": folder.name}, "world_size": 1, "complete": complete}
    if task is not None:
        record["task"] = task
    (folder / "run.json").write_text(json.dumps(record))
    return folder
