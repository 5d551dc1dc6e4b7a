"""The product's imprint stage against the grid engine called directly, on the same cached
embeddings and episodes.

``stage`` is what ``bench run`` / ``bench imprint`` do after extraction
(``bench.pipeline.imprint_stage``: batches under ``imprint.max_batch_bytes``, queries scored in
chunks, torchmetrics counts, result rows). ``direct`` is the engine alone, on the same batches:
``build_head_grid`` per batch and ``score_heads`` per episode over all its queries, keeping only
the argmax. The ratio stage / direct is the stage's overhead; the target is at most 1.2. Each
side is timed ``--repeats`` times and the best kept. Each workload runs in a fresh process, so
its peak RSS is its own; it is printed next to the memory budget.

    python scripts/bench_imprint_stage.py                       # both workloads
    python scripts/bench_imprint_stage.py --workload synthetic --repeats 3

Workloads: ``quickstart`` (the embedded default's cache: 24 episodes x 11 methods) and
``synthetic`` (a cache entry of 100 classes x 300 samples x 768 dims made from a Gaussian
mixture; 50 queries per class; shots 1, 5, 20, all x 5 seeds; the 8 presets plus k-means with
k = 1, 5, 10, 20).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# Each workload runs in a child process, so its peak RSS is its own; as a module, since running
# this file by path would put bench/benchmarks/ first on the child's sys.path.
SELF = [sys.executable, "-m", "bench.benchmarks.imprint_stage"]
SYNTHETIC_TASK = {"name": "synthetic-100", "dataset": "synthetic:30000", "classes": ["all"], "shots": [1, 5, 20, "all"],
                  "queries": 50, "seeds": [0, 1, 2, 3, 4]}
SYNTHETIC_METHODS = ["qi2018", "hosoda2024", "janson2022", "westerhoff2025", "simpleshot", "ncm", "knn", "ls-oracle",
                     "l2/kmeans:k=[1,5,10,20]/l2/l2/max"]


def workload(name: str, folder: Path, budget: str):
    """(config, embeddings) of a workload, its cache entries made in ``folder``."""
    from bench import packaged, pipeline
    from bench.config import load_config

    pipeline.quiet_lightning()
    common = [f"cache_dir={folder / 'cache'}", "wandb.mode=disabled", f"imprint.max_batch_bytes={budget}"]
    if name == "quickstart":
        cfg = load_config(packaged.folder("configs") / "quickstart.yaml", common)
        return cfg, pipeline.extract_stage(cfg)
    return synthetic(folder, common)


def synthetic(folder: Path, common: list[str]):
    """A real cache entry holding generated embeddings, opened the way `bench imprint` opens one."""
    from bench import pipeline
    from bench.backbones import build_backbone
    from bench.config import load_config
    from bench.data.synthetic import gaussian_mixture
    from bench.extract import EmbeddingCache, cache_key
    from bench.extract.extractor import entry_fields
    from bench.data.sources import build_source

    task = folder / "synthetic.yaml"
    task.write_text(json.dumps(SYNTHETIC_TASK))
    cfg = load_config(None, [*common, f"task={task}", f"methods=[{','.join(SYNTHETIC_METHODS)}]", "reference=null"])
    backbone = build_backbone("tiny-digits")
    source = build_source("synthetic:30000", classes=100)
    cache = EmbeddingCache(cfg.cache_dir)
    fields = entry_fields(backbone, source, "float32")
    entry = cache.lookup(cache_key(fields))
    if entry is None:
        x, y = gaussian_mixture(num_classes=100, dim=768, per_class=300, seed=0)
        # The synthetic source labels sample i as i % 100; order the generated rows the same way.
        order = torch.arange(30000).view(100, 300).T.reshape(-1)
        entry = cache.write(cache_key(fields), fields, x[order], y[order], torch.arange(30000),
                            class_names=source.class_names)
    suite = cfg.task.resolve()
    return cfg, pipeline.Embeddings(backbone, suite, entry, None, "synthetic:30000")


def direct(cfg, emb, grid) -> float:
    """The engine alone on the stage's batches: build, score, argmax."""
    from bench.engine import plan_batches
    from bench.imprint import SupportSet, build_head_grid, score_heads
    from bench.pipeline import reference_stats

    q_labels = emb.queries.labels.numpy() if emb.queries is not None else None
    episodes = [ep for _, ep in emb.suite.episodes(emb.pool.labels.numpy(), q_labels)]
    reference = reference_stats(cfg, emb, grid)
    budget = int(cfg.imprint.max_batch_bytes)
    start = time.perf_counter()
    for batch in plan_batches(episodes, emb.pool.embeddings.shape[1], len(grid.specs), budget):
        supports = []
        for j in batch:
            idx = torch.as_tensor(episodes[j].support)
            supports.append(SupportSet(emb.pool.embeddings[idx].float(), emb.pool.labels[idx], episodes[j].seed,
                                       torch.as_tensor(episodes[j].classes), reference))
        heads = build_head_grid(grid.specs, supports, max_batch_elements=budget // 4)
        for col, j in enumerate(batch):
            entry = emb.pool if episodes[j].query_split == "train" else emb.queries
            q = entry.embeddings[torch.as_tensor(episodes[j].query)].float()
            for scores in score_heads([row[col] for row in heads], q):
                scores.argmax(1)
    return time.perf_counter() - start


def stage(cfg, emb, grid) -> float:
    from bench.pipeline import imprint_stage

    start = time.perf_counter()
    imprint_stage(cfg, emb, None, grid)
    return time.perf_counter() - start


def rss_mib() -> float:
    """This process's resident memory now (Linux), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(name: str, repeats: int, budget: str, folder: Path) -> dict:
    from bench.imprint import expand_grid

    # The cache entry was made by another process (--prepare), so this one's peak RSS is
    # opening the entry plus the stage, not extraction or data generation.
    cfg, emb = workload(name, folder, budget)
    grid = expand_grid(cfg.methods)
    before = rss_mib()
    times = {"direct": [], "stage": []}
    for _ in range(repeats):  # alternate, so drifting machine load hits both sides alike
        times["direct"].append(direct(cfg, emb, grid))
        times["stage"].append(stage(cfg, emb, grid))
    episodes = sum(1 for _ in emb.suite.episodes(emb.pool.labels.numpy(),
                                                  emb.queries.labels.numpy() if emb.queries is not None else None))
    best = {k: min(v) for k, v in times.items()}
    return {"workload": name, "episodes": episodes, "methods": len(grid.specs), "direct_s": best["direct"],
            "stage_s": best["stage"], "ratio": best["stage"] / best["direct"],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mib": before,
            "budget_mib": int(cfg.imprint.max_batch_bytes) / 2**20, "threads": torch.get_num_threads()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["quickstart", "synthetic", "all"], default="all")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", default="1GiB", help="imprint.max_batch_bytes")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # run one workload in this process, print JSON
    ap.add_argument("--prepare", help=argparse.SUPPRESS)  # make one workload's cache entry in --folder
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.prepare:
        workload(args.prepare, args.folder, args.budget)
        return
    if args.one:
        print(json.dumps(measure(args.one, args.repeats, args.budget, args.folder)))
        return
    names = ["quickstart", "synthetic"] if args.workload == "all" else [args.workload]
    print(f"{'workload':12s} {'episodes':>8s} {'methods':>7s} {'direct s':>9s} {'stage s':>8s} {'ratio':>6s} "
          f"{'RSS before':>10s} {'peak RSS':>9s} {'growth':>7s} {'budget':>7s}  (MiB)")
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            common = ["--budget", args.budget, "--folder", tmp]
            subprocess.run([*SELF, "--prepare", name, *common], capture_output=True, check=True)
            out = subprocess.run([*SELF, "--one", name, "--repeats", str(args.repeats), *common],
                                 capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"workload {name} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['workload']:12s} {r['episodes']:8d} {r['methods']:7d} {r['direct_s']:9.2f} {r['stage_s']:8.2f} "
              f"{r['ratio']:6.2f} {r['rss_before_mib']:10.0f} {r['peak_rss_mib']:9.0f} "
              f"{r['peak_rss_mib'] - r['rss_before_mib']:7.0f} {r['budget_mib']:7.0f}")
    print("growth = peak RSS - RSS with the embeddings loaded, before the first measurement: the stage's "
          "working set, which imprint.max_batch_bytes bounds")


if __name__ == "__main__":
    main()
