"""Method benchmark: the library against a plain reference written the way published code is.

The reference loops over classes in Python, calls scikit-learn's KMeans with its defaults and
NearestNeighbors for mnn, and does the rest in numpy. Both see the same episodes (same
support and query indices), so accuracy differences come only from the methods' own
randomness (k-means seeding) and speed differences from batching over classes.

    python scripts/bench_methods.py                      # both built-in datasets (below)
    python scripts/bench_methods.py --data gmm           # 512-d Gaussian mixture, 10 classes x 500
    python scripts/bench_methods.py --data digits        # 64-d digits pixels, 10 classes x ~120
    python scripts/bench_methods.py --cache PATH --test-cache PATH   # embeddings from cache entries
    python scripts/bench_methods.py --seeds 2 --shots 1 5 all --out quick.json

The library is timed two ways: as a grid (``build_head_grid`` + ``score_heads``: every method
and seed of a shot count at once, each shared stage computed once), which is how the library
runs a grid, and one method at a time (``build_heads`` + ``predict`` per method), which shows
what batching alone gives. Both must predict the same labels. Timing runs in ``--repeats``
rounds, each timing every cell once on every side (reference, one at a time, grid, k-means
grid) in turn, and each cell keeps its best round: a shared machine's load drifts over seconds,
and timing the sides back to back in every round lets the drift hit all of them alike, where
timing each side's repeats together would fold a slow minute into one side only.

Prints accuracy side by side and the speed ratios (reference time / library time), overall and
per shot count, and the k-means grid alone (the k-means specs as one grid against the
reference's k-means rows), per dataset, and writes everything to a JSON file. With a GPU it also times the library
grid there (accuracy is not re-reported; it matches CPU up to float rounding).
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
from bench.imprint import SupportSet, build_head_grid, build_heads, score_heads

# The presets the reference below implements: the grid whose speed the docs report. Later presets
# (text heads, probes, DINOv2 kNN) use stages the reference has not got.
REFERENCE_GENS, REFERENCE_AGGS = ("mean", "all", "kmeans", "ls"), ("max", "mnn")
REFERENCE_PRESETS = [name for name, spec in PRESETS.items()
                     if (s := MethodSpec.parse(spec)).gen.name in REFERENCE_GENS and s.agg.name in REFERENCE_AGGS]
DEFAULT_METHODS = [
    *REFERENCE_PRESETS,
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
def load_embeddings(args, data: str = "gmm"):
    if args.cache is None and data == "digits":
        from bench.data.sources import DigitsSource  # noqa: PLC0415

        pool, test = DigitsSource("train"), DigitsSource("test")
        flat = [torch.from_numpy(s.images.reshape(len(s.images), -1)).float() / 255 for s in (pool, test)]
        counts = np.bincount(pool.labels)
        desc = f"digits: 10 classes, 64 dims (pixels), {counts.min()}-{counts.max()} support candidates per class"
        return flat[0], torch.from_numpy(pool.labels), flat[1], torch.from_numpy(test.labels), desc
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


def _cells(episodes):
    return sorted({key[0] for key in episodes}, key=str)


def run_library(specs, pool_x, pool_y, test_x, test_y, episodes, device):
    """One method at a time: all seeds of a (method, shots) cell imprinted in one batched call.

    Returns accuracies and times per (method, shots, seed); a cell's time is split evenly over
    its episodes.
    """
    px, py, tx = pool_x.to(device), pool_y.to(device), test_x.to(device)
    acc, times = {}, {}
    for shots in _cells(episodes):
        eps = [(key, ep) for key, ep in episodes.items() if key[0] == shots]
        support = [SupportSet(px[ep.support], py[ep.support], seed=ep.seed) for _, ep in eps]
        for spec in specs:
            start = _now(device)
            heads = build_heads(spec, support)
            preds = [head.predict(tx).cpu() for head in heads]
            took = _now(device) - start
            for (key, _), pred in zip(eps, preds):
                times[(spec.name, *key)] = took / len(eps)
                acc[(spec.name, *key)] = float((pred == test_y).float().mean())
    return acc, times


def run_library_grid(specs, pool_x, pool_y, test_x, test_y, episodes, device):
    """The whole grid of one shot count at once: every spec on every seed, sharing stages.

    Returns accuracies per (method, shots, seed) and the time per shot count.
    """
    px, py, tx = pool_x.to(device), pool_y.to(device), test_x.to(device)
    acc, times = {}, {}
    for shots in _cells(episodes):
        eps = [(key, ep) for key, ep in episodes.items() if key[0] == shots]
        support = [SupportSet(px[ep.support], py[ep.support], seed=ep.seed) for _, ep in eps]
        start = _now(device)
        grid = build_head_grid(specs, support)
        flat = [head for row in grid for head in row]
        preds = [h.classes[s.argmax(1)].cpu() for h, s in zip(flat, score_heads(flat, tx))]
        times[shots] = _now(device) - start
        for i, spec in enumerate(specs):
            for j, (key, _) in enumerate(eps):
                acc[(spec.name, *key)] = float((preds[i * len(eps) + j] == test_y).float().mean())
    return acc, times


def run_reference(specs, pool_x, pool_y, test_x, test_y, episodes):
    """The reference on every (method, shots, seed): accuracies and times."""
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


def best_of_rounds(sides: dict, rounds: int) -> dict:
    """Run each side (name -> callable returning (accuracies, times)) once per round, the sides
    one after another in every round, and keep each time key's best round.

    Returns name -> (accuracies, best times). Every side is seeded, so its accuracies cannot
    change between rounds; a change is an error, since the rounds would not time the same work.
    """
    out = {}
    for r in range(rounds):
        for name, run in sides.items():
            acc, times = run()
            if name not in out:
                out[name] = (acc, dict(times))
                continue
            if acc != out[name][0]:
                raise SystemExit(f"{name}: accuracies changed between timing rounds 1 and {r + 1}")
            best = out[name][1]
            for key, t in times.items():
                best[key] = min(best[key], t)
    return out


def _now(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def summarise(specs, shots, seeds, lib, ref, grid_acc):
    rows = []
    for spec in specs:
        for s in shots:
            la = np.mean([lib[0][(spec.name, s, seed)] for seed in seeds])
            ga = np.mean([grid_acc[(spec.name, s, seed)] for seed in seeds])
            ra = np.mean([ref[0][(spec.name, s, seed)] for seed in seeds])
            lt = sum(lib[1][(spec.name, s, seed)] for seed in seeds)
            rt = sum(ref[1][(spec.name, s, seed)] for seed in seeds)
            rows.append(dict(method=spec.name, spec=str(spec), shots=s, lib_acc=la, grid_acc=ga, ref_acc=ra,
                             acc_diff_points=100 * (la - ra), lib_time_s=lt, ref_time_s=rt))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=("both", "gmm", "digits"), default="both",
                    help="built-in data: the 512-d Gaussian mixture, the 64-d digits, or both (default)")
    ap.add_argument("--cache", help="embedding cache entry for the support pool (instead of --data)")
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
    ap.add_argument("--repeats", type=int, default=3,
                    help="timing rounds: every side times every cell once a round; each cell keeps its best")
    ap.add_argument("--out", default="bench_methods.json")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.seeds < 1 or args.threads < 1:
        ap.error("--repeats, --seeds and --threads must each be at least 1")
    torch.set_num_threads(args.threads)
    datasets = ["cache"] if args.cache else (["gmm", "digits"] if args.data == "both" else [args.data])
    results = {}
    for data in datasets:
        print(f"\n=== {data} ===")
        results[data] = compare(args, data)
    print(f"\nsummary: reference time / library time, CPU, {args.threads} threads, best of {args.repeats} rounds")
    print(f"  {'data':<8} {'grid':>7} {'k-means grid':>13} {'one at a time':>14} {'largest accuracy gap':>21}")
    for data, r in results.items():
        o = r["overall"]
        km = f"{r['kmeans']['speedup']:.1f}x" if r.get("kmeans") else "-"
        print(f"  {data:<8} {o['speedup']:6.1f}x {km:>13} {o['speedup_one_at_a_time']:13.1f}x "
              f"{o['max_abs_acc_diff_points']:17.2f} pt")
    # one dataset: its result at the top level, as before; several: one entry each
    out = results[datasets[0]] if len(datasets) == 1 else {"datasets": results}
    Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwrote {args.out}")
    return out


def compare(args, data: str) -> dict:
    """Reference against library grid (and one at a time) on one dataset; returns the record."""
    pool_x, pool_y, test_x, test_y, desc = load_embeddings(args, data)
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
    warm = {(shots[0], 0): episodes[(shots[0], 0)]}
    cpu = torch.device("cpu")
    run_library(specs, pool_x, pool_y, test_x, test_y, warm, cpu)
    run_library_grid(specs, pool_x, pool_y, test_x, test_y, warm, cpu)
    run_reference(specs, pool_x, pool_y, test_x, test_y, warm)

    r = args.repeats
    kmeans_specs = [spec for spec in specs if spec.gen.name == "kmeans"]
    data_args = (pool_x, pool_y, test_x, test_y, episodes)
    sides = {
        "reference": lambda: run_reference(specs, *data_args),
        "one at a time": lambda: run_library(specs, *data_args, cpu),
        "grid": lambda: run_library_grid(specs, *data_args, cpu),
    }
    if kmeans_specs:  # the k-means specs as a grid of their own, against the reference's k-means rows
        sides["k-means grid"] = lambda: run_library_grid(kmeans_specs, *data_args, cpu)
    timed = best_of_rounds(sides, r)
    ref, lib = timed["reference"], timed["one at a time"]
    grid_acc, grid_times = timed["grid"]
    rows = summarise(specs, shots, seeds, lib, ref, grid_acc)
    mismatch = [(row["method"], row["shots"]) for row in rows if row["grid_acc"] != row["lib_acc"]]
    if mismatch:  # the grid shares stages but must not change a prediction
        raise SystemExit(f"grid and one-at-a-time accuracies differ for {mismatch}")

    name_w = max(len(s.name) for s in specs)
    print(f"\naccuracy (%), mean over {len(seeds)} seeds: library / reference")
    print(f"{'method':<{name_w}} " + " ".join(f"{str(s):>13}" for s in shots))
    by = {(row["method"], row["shots"]): row for row in rows}
    for spec in specs:
        cells = [f"{100 * by[(spec.name, s)]['lib_acc']:5.1f}/{100 * by[(spec.name, s)]['ref_acc']:5.1f}" for s in shots]
        print(f"{spec.name:<{name_w}} " + " ".join(f"{c:>13}" for c in cells))

    kmeans = None
    if kmeans_specs:
        km_times = timed["k-means grid"][1]
        km_ref = sum(row["ref_time_s"] for row in rows if row["method"] in {s.name for s in kmeans_specs})
        kmeans = dict(methods=[s.name for s in kmeans_specs], grid_time_s=sum(km_times.values()),
                      ref_time_s=km_ref, speedup=km_ref / sum(km_times.values()))

    per_shot = {}
    for s in shots:
        lt = sum(row["lib_time_s"] for row in rows if row["shots"] == s)
        rt = sum(row["ref_time_s"] for row in rows if row["shots"] == s)
        per_shot[str(s)] = dict(grid_time_s=grid_times[s], lib_time_s=lt, ref_time_s=rt,
                                speedup=rt / grid_times[s], speedup_one_at_a_time=rt / lt)
    grid_total = sum(grid_times.values())
    lib_total = sum(row["lib_time_s"] for row in rows)
    ref_total = sum(row["ref_time_s"] for row in rows)
    worst = max(rows, key=lambda row: abs(row["acc_diff_points"]))
    print(f"\nspeed (reference time / library time), CPU, best of {r} interleaved rounds:")
    print("  grid = the library runs the whole grid at once (build_head_grid + score_heads);")
    print("  one at a time = the library builds and scores each method separately")
    for s, v in per_shot.items():
        print(f"  shots={s:>4}: grid {v['speedup']:6.1f}x   one at a time {v['speedup_one_at_a_time']:5.1f}x   "
              f"(grid {v['grid_time_s']:.3f}s, one at a time {v['lib_time_s']:.3f}s, reference {v['ref_time_s']:.3f}s)")
    print(f"  overall  : grid {ref_total / grid_total:6.1f}x   one at a time {ref_total / lib_total:5.1f}x   "
          f"(grid {grid_total:.3f}s, one at a time {lib_total:.3f}s, reference {ref_total:.3f}s)")
    if kmeans:
        print(f"  k-means  : grid {kmeans['speedup']:6.1f}x   (grid {kmeans['grid_time_s']:.3f}s, reference "
              f"{kmeans['ref_time_s']:.3f}s; {', '.join(kmeans['methods'])})")
    print(f"largest accuracy gap: {worst['acc_diff_points']:+.2f} points ({worst['method']}, shots={worst['shots']})")

    result = dict(
        data=desc, threads=args.threads, repeats=r, seeds=seeds, shots=[str(s) for s in shots],
        methods=[dict(name=s.name, spec=str(s)) for s in specs], dropped=grid.dropped,
        rows=rows, per_shot=per_shot, kmeans=kmeans,
        overall=dict(grid_time_s=grid_total, lib_time_s=lib_total, ref_time_s=ref_total,
                     speedup=ref_total / grid_total, speedup_one_at_a_time=ref_total / lib_total,
                     max_abs_acc_diff_points=abs(worst["acc_diff_points"])),
        machine=dict(python=platform.python_version(), torch=torch.__version__, cpu=platform.processor()),
    )
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        run_library_grid(specs, pool_x, pool_y, test_x, test_y, warm, dev)
        gpu_times = best_of_rounds({"gpu": lambda: run_library_grid(specs, *data_args, dev)}, r)["gpu"][1]
        gpu_total = sum(gpu_times.values())
        result["gpu"] = dict(device=torch.cuda.get_device_name(), grid_time_s=gpu_total,
                             speedup_vs_reference=ref_total / gpu_total)
        print(f"  GPU ({torch.cuda.get_device_name()}): grid {gpu_total:.3f}s, {ref_total / gpu_total:.1f}x the CPU reference")
    return result


if __name__ == "__main__":
    main()
