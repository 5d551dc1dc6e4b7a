#!/usr/bin/env python
"""Method benchmark: the library against a plain reference written the way published code is.

The reference loops over classes in Python, calls scikit-learn's KMeans with its defaults and
NearestNeighbors for mnn, and does the rest in numpy. Both see the same episodes (same
support and query indices), so accuracy differences come only from the methods' own
randomness (k-means seeding) and speed differences from batching over classes.

    python scripts/bench_methods.py                      # generated Gaussian mixture
    python scripts/bench_methods.py --cache PATH         # embeddings from a cache entry
    python scripts/bench_methods.py --seeds 2 --shots 1 5 all --out quick.json

Prints accuracy side by side and the speed ratio (reference time / library time), overall and
per shot count, and writes everything to a JSON file. With a GPU it also times the library
there (accuracy is not re-reported; it matches CPU up to float rounding).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.neighbors import NearestNeighbors

from bench.data.episodes import sample_episode
from bench.data.synthetic import gaussian_mixture
from bench.imprint import PRESETS, MethodSpec, expand_grid
from bench.imprint.head import SupportSet, build_heads

DEFAULT_METHODS = [
    *PRESETS,
    "l2/kmeans:k=[1,5,20]/l2/l2/max",
    "l2/all/l2/l2/max",  # kmeans with k = all: every support sample is a proxy
]
DEFAULT_SHOTS = ["1", "2", "5", "10", "20", "50", "100", "all"]


# ---- the reference: per-class Python loops, scikit-learn, numpy -------------------------------
def ref_vector_norm(kind: str, x: np.ndarray, center: np.ndarray | None) -> np.ndarray:
    if kind == "none":
        return x
    if kind == "center-l2":
        x = x - center
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ref_generate(spec: MethodSpec, xs: np.ndarray, ys: np.ndarray, classes, seed: int):
    proxies, labels = [], []
    name = spec.gen.name
    if name == "ls":
        lam = spec.gen.get("gen", "lam")
        second = xs.T.astype(np.float64) @ xs / len(xs)
        ridge = lam * np.trace(second) / xs.shape[1] + 1e-12
        means = np.stack([xs[ys == c].mean(0) for c in classes])
        w = np.linalg.solve(second + ridge * np.eye(xs.shape[1]), means.T).T / len(classes)
        return w.astype(np.float32), np.arange(len(classes))
    for i, c in enumerate(classes):
        xc = xs[ys == c]
        if name == "mean":
            p = xc.mean(0, keepdims=True)
        elif name == "all":
            p = xc
        elif name == "kmeans":
            k = spec.gen.get("gen", "k")
            p = xc if len(xc) <= k else KMeans(n_clusters=k, random_state=seed).fit(xc).cluster_centers_
        else:
            raise NotImplementedError(f"reference has no GEN '{name}'")
        proxies.append(p)
        labels.append(np.full(len(p), i))
    return np.concatenate(proxies).astype(np.float32), np.concatenate(labels)


def ref_quantile(p: np.ndarray) -> np.ndarray:
    q = np.sort(p, axis=1).mean(0)
    return q[np.argsort(np.argsort(p, axis=1, kind="stable"), axis=1)]


def ref_predict(spec: MethodSpec, xs, ys, xq, classes, seed) -> np.ndarray:
    center = xs.mean(0)
    s = ref_vector_norm(spec.norm_pre.name, xs, center)
    p, pl = ref_generate(spec, s, ys, classes, seed)
    if spec.norm_post.name == "l2":
        p = ref_vector_norm("l2", p, None)
    elif spec.norm_post.name == "quantile":
        p = ref_quantile(p)
    q = ref_vector_norm(spec.norm_inf.name, xq, center)
    if spec.agg.name == "max":
        sim = q @ p.T
        scores = np.stack([sim[:, pl == i].max(1) for i in range(len(classes))], 1)
        return np.asarray(classes)[scores.argmax(1)]
    m = min(spec.agg.get("agg", "m"), len(p))
    metric = spec.agg.get("agg", "metric")
    dist, idx = NearestNeighbors(n_neighbors=m, metric=metric).fit(p).kneighbors(q)
    votes = np.zeros((len(q), len(classes)))
    first = np.full((len(q), len(classes)), -1.0)
    for j in range(m):  # same tie-break as the library: nearest voter wins a tie
        lab = pl[idx[:, j]]
        w = 1.0 if spec.agg.get("agg", "weight") == "uniform" else 1.0 / (dist[:, j] + 1e-8)
        np.add.at(votes, (np.arange(len(q)), lab), w)
        rows = np.arange(len(q))
        first[rows, lab] = np.maximum(first[rows, lab], (m - j) / (m + 1))
    if spec.agg.get("agg", "weight") == "uniform":
        votes = votes + np.maximum(first, 0)
    return np.asarray(classes)[votes.argmax(1)]


# ---- data -------------------------------------------------------------------------------------
def load_embeddings(args):
    if args.cache is None:
        x, y = gaussian_mixture(10, 512, 600, modes=args.modes, class_spread=args.class_spread,
                                mode_spread=args.mode_spread, noise=args.noise, seed=args.data_seed)
        within = torch.arange(len(y)) % 600
        pool, test = within < 500, within >= 500
        desc = (f"gaussian mixture: 10 classes, 512 dims, {args.modes} modes/class (class spread "
                f"{args.class_spread}, mode spread {args.mode_spread}, noise {args.noise}), "
                "500 support candidates + 100 queries per class")
        return x[pool], y[pool], x[test], y[test], desc
    from bench.extract.cache import EmbeddingCache  # noqa: PLC0415 (only with --cache)

    entry = EmbeddingCache.open(args.cache)
    x, y = entry.embeddings.float(), entry.labels
    test_entry = EmbeddingCache.open(args.test_cache) if args.test_cache else None
    if test_entry is None:
        raise SystemExit("--cache needs --test-cache (the query split) as well")
    return x, y, test_entry.embeddings.float(), test_entry.labels, f"cache {args.cache}"


def run_library(specs, pool_x, pool_y, test_x, test_y, episodes, device):
    """All seeds of one (method, shots) cell are imprinted in one batched call."""
    px, py = pool_x.to(device), pool_y.to(device)
    tx = test_x.to(device)
    acc, times = {}, {}
    cells = sorted({key[0] for key in episodes}, key=str)
    for shots in cells:
        eps = [(key, ep) for key, ep in episodes.items() if key[0] == shots]
        support = [SupportSet(px[ep.support], py[ep.support], seed=ep.seed) for _, ep in eps]
        for spec in specs:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            heads = build_heads(spec, support)
            preds = [head.predict(tx).cpu() for head in heads]
            elapsed = time.perf_counter() - start
            for (key, _), pred in zip(eps, preds):
                times[(spec.name, *key)] = elapsed / len(eps)
                acc[(spec.name, *key)] = float((pred == test_y).float().mean())
    return acc, times


def run_reference(specs, pool_x, pool_y, test_x, test_y, episodes):
    px, py, tx, ty = (t.numpy() for t in (pool_x, pool_y, test_x, test_y))
    acc, times = {}, {}
    for key, ep in episodes.items():
        xs, ys = px[ep.support], py[ep.support]
        for spec in specs:
            start = time.perf_counter()
            pred = ref_predict(spec, xs, ys, tx, list(ep.classes), ep.seed)
            times[(spec.name, *key)] = time.perf_counter() - start
            acc[(spec.name, *key)] = float((pred == ty).mean())
    return acc, times


def summarise(specs, shots, seeds, lib, ref):
    rows = []
    for spec in specs:
        for s in shots:
            la = np.mean([lib[0][(spec.name, s, seed)] for seed in seeds])
            ra = np.mean([ref[0][(spec.name, s, seed)] for seed in seeds])
            lt = sum(lib[1][(spec.name, s, seed)] for seed in seeds)
            rt = sum(ref[1][(spec.name, s, seed)] for seed in seeds)
            rows.append(dict(method=spec.name, spec=str(spec), shots=s, lib_acc=la, ref_acc=ra,
                             acc_diff_points=100 * (la - ra), lib_time_s=lt, ref_time_s=rt))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", help="embedding cache entry for the support pool (default: generated data)")
    ap.add_argument("--test-cache", help="embedding cache entry for the queries (with --cache)")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--shots", nargs="+", default=DEFAULT_SHOTS)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--modes", type=int, default=4, help="Gaussian modes per class (generated data)")
    ap.add_argument("--class-spread", type=float, default=0.05)
    ap.add_argument("--mode-spread", type=float, default=1.0)
    ap.add_argument("--noise", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (both sides run on the same cores)")
    ap.add_argument("--out", default="bench_methods.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    pool_x, pool_y, test_x, test_y, desc = load_embeddings(args)
    grid = expand_grid(args.methods)
    specs = grid.specs
    shots = [s if s == "all" else int(s) for s in args.shots]
    seeds = list(range(args.seeds))
    classes = sorted(torch.unique(pool_y).tolist())
    episodes = {
        (s, seed): sample_episode(pool_y.numpy(), classes, s, "test", seed, test_labels=test_y.numpy())
        for s in shots
        for seed in seeds
    }
    print(f"data: {desc}")
    print(f"grid: {len(specs)} methods x {len(shots)} shot counts x {len(seeds)} seeds"
          + (f"; dropped {grid.dropped}" if grid.dropped else ""))

    # Warm-up so that one-off costs (kernel selection, sklearn imports) hit neither side.
    warm = episodes[(shots[0], 0)]
    run_library(specs, pool_x, pool_y, test_x, test_y, {(shots[0], 0): warm}, torch.device("cpu"))
    run_reference(specs, pool_x, pool_y, test_x, test_y, {(shots[0], 0): warm})

    lib = run_library(specs, pool_x, pool_y, test_x, test_y, episodes, torch.device("cpu"))
    ref = run_reference(specs, pool_x, pool_y, test_x, test_y, episodes)
    rows = summarise(specs, shots, seeds, lib, ref)

    name_w = max(len(s.name) for s in specs)
    print(f"\naccuracy (%), mean over {len(seeds)} seeds: library / reference")
    print(f"{'method':<{name_w}} " + " ".join(f"{str(s):>13}" for s in shots))
    by = {(r["method"], r["shots"]): r for r in rows}
    for spec in specs:
        cells = [f"{100 * by[(spec.name, s)]['lib_acc']:5.1f}/{100 * by[(spec.name, s)]['ref_acc']:5.1f}" for s in shots]
        print(f"{spec.name:<{name_w}} " + " ".join(f"{c:>13}" for c in cells))

    per_shot = {}
    for s in shots:
        lt = sum(r["lib_time_s"] for r in rows if r["shots"] == s)
        rt = sum(r["ref_time_s"] for r in rows if r["shots"] == s)
        per_shot[str(s)] = dict(lib_time_s=lt, ref_time_s=rt, speedup=rt / lt)
    lib_total = sum(r["lib_time_s"] for r in rows)
    ref_total = sum(r["ref_time_s"] for r in rows)
    worst = max(rows, key=lambda r: abs(r["acc_diff_points"]))
    print("\nspeed (reference time / library time), CPU:")
    for s, v in per_shot.items():
        print(f"  shots={s:>4}: {v['speedup']:6.1f}x   (library {v['lib_time_s']:.2f}s, reference {v['ref_time_s']:.2f}s)")
    print(f"  overall  : {ref_total / lib_total:6.1f}x   (library {lib_total:.2f}s, reference {ref_total:.2f}s)")
    print(f"largest accuracy gap: {worst['acc_diff_points']:+.2f} points ({worst['method']}, shots={worst['shots']})")

    result = dict(
        data=desc, threads=args.threads, seeds=seeds, shots=[str(s) for s in shots],
        methods=[dict(name=s.name, spec=str(s)) for s in specs], dropped=grid.dropped,
        rows=rows, per_shot=per_shot,
        overall=dict(lib_time_s=lib_total, ref_time_s=ref_total, speedup=ref_total / lib_total,
                     max_abs_acc_diff_points=abs(worst["acc_diff_points"])),
        machine=dict(python=platform.python_version(), torch=torch.__version__, cpu=platform.processor()),
    )
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        run_library(specs, pool_x, pool_y, test_x, test_y, {(shots[0], 0): warm}, dev)
        _, gpu_times = run_library(specs, pool_x, pool_y, test_x, test_y, episodes, dev)
        gpu_total = sum(gpu_times.values())
        result["gpu"] = dict(device=torch.cuda.get_device_name(), lib_time_s=gpu_total,
                             speedup_vs_reference=ref_total / gpu_total)
        print(f"  GPU ({torch.cuda.get_device_name()}): library {gpu_total:.2f}s, {ref_total / gpu_total:.1f}x the CPU reference")
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
