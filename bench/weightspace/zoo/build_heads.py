"""Make a head zoo offline: heads saved by `bench run ... save_heads=true` on digits, from the
embedded tiny backbone and a few tiny CNNs trained here (different width, epochs and seed, so
their embeddings differ in quality), with a grid of methods whose accuracies spread (presets,
k-means, random subsets, farthest points, random proxies, an unnormalised mean).

    python scripts/build_head_zoo.py                      # runs/headzoo/runs/<backbone>/...
    python scripts/build_head_zoo.py --out runs/headzoo --backbones 3 --seeds 0 1 2

Backbone checkpoints are content-addressed by their training settings and kept; each `bench run`
reuses the embedding cache. Pass the printed run folders to scripts/weight_encoder_eval.py
(--heads) or `bench weights fit --heads`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench import packaged

METHODS = [
    "qi2018", "hosoda2024", "janson2022", "westerhoff2025", "simpleshot", "ncm", "knn", "ls-oracle",
    "l2/kmeans:k=[2,5]/l2/l2/max", "l2/random:k=[1,3]/l2/l2/max", "l2/fps:k=3/l2/l2/max",
    "none/none/l2/l2/max", "none/mean/none/none/max",
]
# (width, epochs, seed): a weak, a medium and a stronger tiny CNN besides the embedded one
BACKBONES = [(8, 3, 11), (16, 8, 12), (24, 30, 13), (12, 15, 14)]


def task_yaml(seeds: list[int], shots: list[int]) -> str:
    return yaml.safe_dump({
        "name": "headzoo-digits", "dataset": "digits",
        "class_splits": {"base": [0, 1, 2, 3, 4], "novel": [5, 6, 7, 8, 9]},
        "classes": ["base", "novel", "all"], "shots": shots, "queries": "test", "seeds": seeds,
    }, sort_keys=False)


def train_backbones(out: Path, count: int) -> list[str]:
    from bench.backbones import save_checkpoint
    from bench.backbones.tiny_build import TRANSFORM, train
    from bench.runtime import atomic_path

    names = ["tiny-digits"]
    for width, epochs, seed in BACKBONES[:count]:
        path = out / "backbones" / f"tiny-w{width}-e{epochs}-s{seed}.safetensors"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            model = train(epochs=epochs, width=width, seed=seed)
            with atomic_path(path) as tmp:
                save_checkpoint(model, tmp, arch="tiny-cnn", transform=TRANSFORM, width=model.width, in_channels=1,
                                trained_on="digits train, classes 0-4")
            print(f"trained backbone {path.name} in {time.perf_counter() - start:.1f}s", flush=True)
        names.append(f"checkpoint:{path}")
    return names


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/headzoo"))
    ap.add_argument("--backbones", type=int, default=3,
                    help=f"trained backbones besides tiny-digits (max {len(BACKBONES)})")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    ap.add_argument("--cache-dir", default=".cache/bench")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    task = args.out / "task.yaml"
    task.write_text(task_yaml(args.seeds, args.shots))
    runs = []
    env = {**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    base = yaml.safe_load((packaged.folder("configs") / "quickstart.yaml").read_text())
    for i, backbone in enumerate(train_backbones(args.out, min(args.backbones, len(BACKBONES)))):
        name = "tiny-digits" if backbone == "tiny-digits" else Path(backbone.split(":", 1)[1]).stem
        # a config file rather than overrides: the method grids hold brackets and commas
        config = {**base, "backbone": {**base.get("backbone", {}), "name": backbone}, "task": str(task),
                  "methods": METHODS, "save_heads": True, "name": name, "out_dir": str(args.out / "runs"),
                  "cache_dir": args.cache_dir, "wandb": {**base.get("wandb", {}), "mode": "disabled"}}
        config_path = args.out / f"config-{name}.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        cmd = [sys.executable, "-c", "import sys; from bench.cli import main; sys.exit(main())", "run",
               "-c", str(config_path)]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
            raise SystemExit(f"bench run for {backbone} failed (exit {done.returncode})")
        runs.append(args.out / "runs" / name)
        print(f"[{i + 1}] {backbone}: heads in {runs[-1]} ({time.perf_counter() - t0:.0f}s)", flush=True)
    print(f"head zoo: {len(runs)} runs in {time.perf_counter() - start:.0f}s:\n  " + " ".join(map(str, runs)))
    return runs


if __name__ == "__main__":
    main()
