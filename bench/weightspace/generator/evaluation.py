"""The head generator (D2NWG) side by side with imprinting, retrieval and the trained head.

    python scripts/generator_eval.py --ckpt runs/generator/d2nwg                 # 100 tasks per shot count
    python scripts/generator_eval.py --ckpt runs/generator/d2nwg --tasks 10 --out runs/generator_eval/quick

On the checkpoint's meta-test classes of every source it was trained on (classes it never
saw), N-way tasks with ``--queries`` queries per class and 1, 5 and 20 shots drawn from the
rest, task ``i`` seeded by ``i`` (queries and support do not depend on the shot count; more
shots add samples). Per source and shot count it prints accuracy mean ± std over tasks of:

- ``d2nwg``: the generator as a GEN (``l2/d2nwg:.../none/l2/max``), the best of ``--samples``
  samples by support likelihood, and ``d2nwg-mean``, their average;
- the imprinting presets qi2018, simpleshot (centred on the meta-train classes' mean, as
  SimpleShot centres on base classes), westerhoff2025, and dc (Distribution Calibration with
  the meta-train classes as reference; the `dc` preset if there is one, else `l2/dc/l2/l2/max`);
- ``trained``: logistic regression on all of the task's non-query samples (upper bound);
- ``retrieval``: the meta-training head whose support encoding (class means, matched class to
  class by the Hungarian method) is nearest: the memorisation baseline.

Then: the gap closed, (gen - best imprinting) / (trained - best imprinting); memorisation
(each generated head's nearest training head by cosine of its matched, flattened rows, against
the same for training heads among themselves; and the margin over retrieval); robustness
(20% of support labels flipped, at 5 and 20 shots; tasks of an embedding family the
generator never saw, ``--cross``, for which the GEN's backbone check is bypassed on purpose);
and cost (seconds per head, generation against imprinting, best of ``--repeats``).

Writes ``results.csv`` (one row per task, method, shot count and condition), ``summary.json``
and ``accuracy.png`` under ``--out``. ``scripts/generator_eval.py`` runs :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

from bench.errors import BenchError
from bench.imprint import PRESETS, Reference, build_head
from bench.runtime import atomic_path, torch_threads, write_json_atomic
from bench.weightspace.commands import FlagParser, write_csv
from bench.weightspace.generator.d2nwg import load_generator
from bench.weightspace.generator.metatasks import MetaTaskSet, build_meta_source, draw_task, mix_seed, normalize
from bench.weightspace.generator.target_heads import canonical_rows, fit_logistic_heads

IMPRINTING = ("qi2018", "simpleshot", "westerhoff2025", "dc")


def parser() -> argparse.ArgumentParser:
    ap = FlagParser(prog="generator_eval.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, type=Path, help="a checkpoint folder of `bench generator fit`")
    ap.add_argument("--tasks", type=int, default=100, help="meta-test tasks per source and shot count")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5, 20])
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--queries", type=int, default=15, help="queries per class")
    ap.add_argument("--per-class", type=int, default=100, help="pool per class of a procedural task")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps")
    ap.add_argument("--samples", type=int, default=8, help="samples per head (S)")
    ap.add_argument("--cross", nargs="*", default=["gmm:b"],
                    help="sources the generator never saw, for the robustness rows (default gmm:b)")
    ap.add_argument("--flip", type=float, default=0.2, help="share of support labels flipped (robustness)")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (best kept)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads: the work is many small operations, for which one thread is fastest "
                         "and does not stall when the cores are shared (default 1)")
    ap.add_argument("--cache-dir", default=".cache")
    ap.add_argument("--out", type=Path, default=Path("runs/generator_eval"))
    return ap


# ---- tasks -----------------------------------------------------------------------------------
class TestTask:
    """One meta-test task: queries, the rest (support candidates in random order), its classes."""

    def __init__(self, source, classes, seed, per_class, queries, norm):
        x, y, _ = draw_task(source, classes, seed, per_class)  # each class's samples in random order
        x = normalize(x, norm)
        self.classes = sorted(classes)
        c = len(classes)
        pos = torch.arange(len(y)) - torch.searchsorted(y, y)  # rank within class
        self.xq, self.yq = x[pos < queries], y[pos < queries]
        rest = pos >= queries
        self.x_rest, self.y_rest = x[rest], y[rest]
        self.by_class = torch.stack([self.x_rest[self.y_rest == k] for k in range(c)])  # (C, n_rest, D)

    def support(self, shots):
        s = self.by_class[:, :shots]
        return s.reshape(-1, s.shape[-1]), torch.arange(len(s)).repeat_interleave(shots)


def make_tasks(source, classes_pool, n, ways, per_class, queries, norm, tag):
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(mix_seed("eval-task", tag, i))
        pool = torch.tensor(classes_pool)
        classes = sorted(pool[torch.randperm(len(pool), generator=g)[:ways]].tolist())
        out.append(TestTask(source, classes, mix_seed("eval-pool", tag, i), per_class, queries, norm))
    return out


def flip_labels(labels, num_classes, share, g):
    """``share`` of each class's support labels (rounded) moved to another class at random."""
    labels = labels.clone()
    for c in range(num_classes):
        idx = (labels == c).nonzero()[:, 0]
        m = int(round(share * len(idx)))
        chosen = idx[torch.randperm(len(idx), generator=g)[:m]]
        labels[chosen] = (c + torch.randint(1, num_classes, (m,), generator=g)) % num_classes
    return labels


# ---- baselines -------------------------------------------------------------------------------
def accuracy(scores, y):
    return float((scores.argmax(1) == y).float().mean())


def trained_heads(tasks):
    """Logistic regression on each task's non-query samples, all tasks in one batched fit."""
    x = torch.stack([t.x_rest for t in tasks])
    y = torch.stack([t.y_rest for t in tasks])
    fit = fit_logistic_heads(x, y, len(tasks[0].classes), generator=torch.Generator().manual_seed(0))
    return fit.weights, fit.bias


def match(cost):
    """Hungarian matching: perm[c] = the candidate row matched to class c."""
    r, c = linear_sum_assignment(cost)
    return c[np.argsort(r)]


class TrainingHeads:
    """The meta-training heads with their pools' class means (their support encoding)."""

    def __init__(self, tasks: MetaTaskSet, sources):
        self.tasks = tasks
        self.n = tasks.num_classes
        means = torch.zeros(len(tasks), tasks.classes.shape[1], tasks.rows.shape[-1] - 1)
        for i in tqdm(range(len(tasks)), desc="training-task encodings", leave=False, mininterval=5):
            x, y = tasks.pool(i, sources)
            c = int(self.n[i])
            means[i, :c] = F.normalize(torch.stack([x[y == k].mean(0) for k in range(c)]), dim=-1)
        self.means = means

    def retrieve(self, support_means):
        """Rows of the training head nearest to ``support_means`` (C, D), matched to its classes."""
        c = len(support_means)
        ids = (self.n == c).nonzero()[:, 0]
        if len(ids) == 0:
            return None
        cand = self.means[ids, :c]  # (T, C, D)
        cost = torch.cdist(support_means[None].expand(len(ids), -1, -1), cand).square()  # (T, C, C)
        # a cheap lower bound (each class to its nearest candidate class) prunes the exact search
        bound = cost.min(2).values.sum(1)
        best, best_rows = math.inf, None
        for j in bound.argsort().tolist():
            if float(bound[j]) >= best:
                break
            perm = match(cost[j].numpy())
            total = float(cost[j][torch.arange(c), torch.as_tensor(perm)].sum())
            if total < best:
                best, best_rows = total, self.tasks.rows[ids[j], perm]
        return best_rows

    def nearest_cosine(self, rows, exclude=None):
        """Largest cosine between flattened ``rows`` (C, D+1) and any training head of C classes
        with rows matched (Hungarian on row cosines)."""
        c = len(rows)
        ids = (self.n == c).nonzero()[:, 0]
        if exclude is not None:
            ids = ids[ids != exclude]
        if len(ids) == 0:
            return float("nan")
        cand = self.tasks.rows[ids, :c]
        a = rows / rows.norm()
        b = cand / cand.flatten(1).norm(dim=1)[:, None, None]
        sim = torch.einsum("cd,tkd->tck", a, b)  # (T, C, C)
        bound = sim.max(2).values.sum(1)
        best = -math.inf
        for j in bound.argsort(descending=True).tolist():
            if float(bound[j]) <= best:
                break
            perm = match(-sim[j].numpy())
            best = max(best, float(sim[j][torch.arange(c), torch.as_tensor(perm)].sum()))
        return best


def imprinting_specs(references):
    specs = {m: m for m in IMPRINTING if m in PRESETS}
    if "dc" not in specs:
        specs["dc"] = "l2/dc/l2/l2/max"
    return {name: (spec, references["dc" if name == "dc" else "mean"]) for name, spec in specs.items()}


def references_for(source, split_train, norm, per_class=100, max_classes=64):
    """Reference statistics of meta-train classes: their raw mean (SimpleShot's centre) and,
    in the heads' normalisation, class means and covariances (Distribution Calibration)."""
    g = torch.Generator().manual_seed(mix_seed("reference", source.dataset))
    classes = torch.tensor(split_train)[torch.randperm(len(split_train), generator=g)[:max_classes]].tolist()
    n = min([per_class, *(source.class_size(c) for c in classes)])
    x, y, _ = source.draw(sorted(classes), n, g)
    return {"mean": x.mean(0), "dc": Reference.from_embeddings(normalize(x, norm), y)}


# ---- the evaluation --------------------------------------------------------------------------
@contextmanager
def generator_dir(folder: Path) -> Iterator[None]:
    """A spec names its checkpoint as a folder under $BENCH_GENERATOR_DIR (``/`` separates a
    spec's stages): point it at the checkpoint's parent inside the block, the caller's value after."""
    before = os.environ.get("BENCH_GENERATOR_DIR")
    os.environ["BENCH_GENERATOR_DIR"] = str(folder.parent)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("BENCH_GENERATOR_DIR", None)
        else:
            os.environ["BENCH_GENERATOR_DIR"] = before


def evaluate(args):
    """Every source's clean, flipped and memorisation blocks, the never-seen families and the cost:
    (rows, summary, figure data)."""
    gen = load_generator(args.ckpt)
    cfg = gen.config
    norm = cfg["norm"]
    folder = args.ckpt.resolve()
    gen_spec = f"{norm}/d2nwg:ckpt={folder.name},steps={args.steps},samples={args.samples}/none/{norm}/max"
    gen_mean_spec = gen_spec.replace(f"samples={args.samples}", f"samples={args.samples},select=mean")
    cache = Path(args.cache_dir) / "embeddings"
    train_sources = [build_meta_source(s["dataset"] if not s["dataset"].startswith("cache") else s["dataset"],
                                       dim=cfg["embedding_dim"], cache_dir=cache) for s in cfg["sources"]]
    for s, info in zip(train_sources, cfg["sources"]):
        if s.backbone != info["backbone"]:
            raise BenchError(f"source {info['dataset']} now has backbone {s.backbone[:12]}, the checkpoint "
                             f"{info['backbone'][:12]}: refit the generator")
    metatasks = MetaTaskSet.load(folder / "metatasks.safetensors")
    heads = TrainingHeads(metatasks, train_sources)

    rows = []
    summary: dict = {"checkpoint": str(folder), "config": {k: v for k, v in vars(args).items()
                                                             if k not in ("ckpt", "out")}, "sources": {}}

    def run_condition(source, info, tasks, refs, condition, shots_list, check=True, flip=0.0):
        ways = len(tasks[0].classes)
        specs = imprinting_specs(refs)
        acc: dict[tuple[str, int], list[float]] = {}
        gen_rows = []
        w_tr, b_tr = trained_heads(tasks)
        for i, t in enumerate(tqdm(tasks, desc=f"{info['dataset']} {condition}", leave=False, mininterval=5)):
            trained = accuracy(t.xq @ w_tr[i].T + b_tr[i], t.yq)
            for k in shots_list:
                xs, ys = t.support(k)
                if flip:
                    ys = flip_labels(ys, ways, flip, torch.Generator().manual_seed(mix_seed("flip", i, k)))
                labels = torch.tensor(t.classes)[ys]
                yq = torch.tensor(t.classes)[t.yq]
                seed = mix_seed("eval-seed", i, k)
                res = {"trained": trained}
                for name, (spec, ref) in specs.items():
                    h = build_head(spec, xs, labels, seed=seed, reference=ref)
                    res[name] = accuracy(h(t.xq), torch.searchsorted(h.classes, yq))
                for name, spec in (("d2nwg", gen_spec), ("d2nwg-mean", gen_mean_spec)):
                    if check:
                        h = build_head(spec, xs, labels, seed=seed, dataset=info["dataset"],
                                       backbone=info["backbone"])
                        res[name] = accuracy(h(t.xq), torch.searchsorted(h.classes, yq))
                        if name == "d2nwg":
                            gen_rows.append((k, i, head_rows(h)))
                    else:  # a family it never saw: the GEN would refuse it, so call the model directly
                        xg = torch.stack([xs[ys == c] for c in range(ways)]) if not flip else None
                        if xg is None:
                            raise AssertionError("cross-family rows are clean-label only")
                        w, b = gen.generate(xg, torch.ones(xg.shape[:2], dtype=torch.bool), t.classes,
                                            torch.Generator().manual_seed(seed), steps=args.steps,
                                            samples=args.samples, select="support" if name == "d2nwg" else "mean")
                        res[name] = accuracy(t.xq @ w.T + b, t.yq)
                means = F.normalize(torch.stack([xs[ys == c].mean(0) if (ys == c).any() else xs.mean(0)
                                                 for c in range(ways)]), dim=-1)
                r = heads.retrieve(means)
                res["retrieval"] = float("nan") if r is None else accuracy(t.xq @ r[:, :-1].T + r[:, -1], t.yq)
                for name, a in res.items():
                    acc.setdefault((name, k), []).append(a)
                    rows.append({"dataset": info["dataset"], "condition": condition, "task": i, "shots": k,
                                 "method": name, "accuracy": a})
        return acc, gen_rows, (w_tr, b_tr)

    figure_data = {}
    for source, info in zip(train_sources, cfg["sources"]):
        test = info["meta_test_classes"]
        ways = min(args.ways, len(test))
        per_class = min([args.per_class if source.classes is None else 10**9,
                         *(source.class_size(c) for c in test if source.classes is not None)])
        tasks = make_tasks(source, test, args.tasks, ways, per_class, args.queries, norm, info["dataset"])
        refs = references_for(source, info["meta_train_classes"], norm)
        acc, gen_rows, (w_tr, b_tr) = run_condition(source, info, tasks, refs, "clean", args.shots)
        block = {"ways": ways, "per_class_pool": per_class, "queries": args.queries,
                 "clean": table(acc, args.shots)}
        flip_shots = [k for k in args.shots if round(args.flip * k) >= 1]
        if flip_shots and args.flip > 0:
            acc_f, _, _ = run_condition(source, info, tasks, refs, f"flip{args.flip:g}", flip_shots, flip=args.flip)
            block["flipped"] = table(acc_f, flip_shots)
        block["memorisation"] = memorisation(heads, gen_rows, tasks, w_tr, b_tr)
        summary["sources"][info["dataset"]] = block
        figure_data[info["dataset"]] = block["clean"]
    for name in args.cross or []:
        source = build_meta_source(name, dim=cfg["embedding_dim"], cache_dir=cache)
        if source.dim != cfg["embedding_dim"]:
            print(f"skip cross-family source {name}: {source.dim}-dim embeddings")
            continue
        info = {**source.info()}
        if any(s["backbone"] == source.backbone for s in cfg["sources"]):
            print(f"skip cross-family source {name}: the generator was trained on it")
            continue
        pool = list(range(1_000_000, 1_001_000)) if source.classes is None else source.classes
        per_class = args.per_class if source.classes is None else min(source.class_size(c) for c in pool)
        ways = min(args.ways, len(pool))
        tasks = make_tasks(source, pool, args.tasks, ways, per_class, args.queries, norm, name)
        refs = references_for(source, list(range(2000)) if source.classes is None else pool, norm)
        acc, _, _ = run_condition(source, info, tasks, refs, "cross-family", args.shots, check=False)
        summary["sources"][f"{name} (never seen)"] = {"ways": ways, "clean": table(acc, args.shots)}
        figure_data[f"{name} (never seen)"] = summary["sources"][f"{name} (never seen)"]["clean"]

    summary["cost"] = cost(args, train_sources[0], cfg["sources"][0], gen_spec, norm)
    return rows, summary, figure_data


def head_rows(head):
    """[w, b] rows of a linear head built by the grid (one proxy per class)."""
    bias = getattr(head, "bias", None)
    if bias is None or not torch.is_tensor(bias) or bias.numel() != head.num_classes:
        raise RuntimeError("cannot read the bias of a d2nwg head; ImprintedHead stores it as `bias`")
    return torch.cat([head.proxies.reshape(head.num_classes, -1), bias.reshape(-1, 1)], 1)


def memorisation(heads: TrainingHeads, gen_rows, tasks, w_tr, b_tr, max_heads=200):
    """Nearest training head (cosine of matched, flattened rows) of generated heads, of the
    meta-test tasks' own trained heads, and of training heads among themselves."""
    g = torch.Generator().manual_seed(0)
    out = {}
    by_k = {}
    for k, i, r in gen_rows:
        r = r - r.mean(0, keepdim=True)
        by_k.setdefault(k, []).append(heads.nearest_cosine(r))
    for k, v in by_k.items():
        out[f"generated_{k}shot_nearest_training_cos_median"] = float(np.median(v))
    own, _ = canonical_rows(w_tr, b_tr)
    out["meta_test_trained_nearest_training_cos_median"] = float(np.median(
        [heads.nearest_cosine(own[i]) for i in range(min(len(own), max_heads))]))
    c = len(tasks[0].classes)
    ids = (heads.n == c).nonzero()[:, 0]
    ids = ids[torch.randperm(len(ids), generator=g)[:max_heads]]
    between = [heads.nearest_cosine(heads.tasks.rows[j, :c], exclude=int(j)) for j in ids]
    out["training_heads_nearest_other_cos_median"] = float(np.median(between)) if between else float("nan")
    out["training_heads_nearest_other_cos_p10_p90"] = ([float(np.percentile(between, 10)),
                                                        float(np.percentile(between, 90))] if between else [])
    return out


def cost(args, source, info, gen_spec, norm, shots=5, n=10):
    """Seconds per head, best of ``--repeats`` over ``n`` tasks: generation vs imprinting."""
    test = info["meta_test_classes"]
    ways = min(args.ways, len(test))
    per_class = min([args.per_class if source.classes is None else 10**9,
                     *(source.class_size(c) for c in test if source.classes is not None)])
    tasks = make_tasks(source, test, n, ways, per_class, args.queries, norm, "cost")
    out = {}
    for name, spec in (("qi2018", "qi2018"), ("westerhoff2025", "westerhoff2025"), ("d2nwg", gen_spec)):
        best = math.inf
        for _ in range(args.repeats):
            start = time.perf_counter()
            for i, t in enumerate(tasks):
                xs, ys = t.support(shots)
                build_head(spec, xs, torch.tensor(t.classes)[ys], seed=i, dataset=info["dataset"],
                           backbone=info["backbone"])
            best = min(best, (time.perf_counter() - start) / len(tasks))
        out[f"{name}_seconds_per_head"] = best
    out["d2nwg_over_qi2018"] = out["d2nwg_seconds_per_head"] / out["qi2018_seconds_per_head"]
    out["setting"] = f"{ways}-way {shots}-shot, {args.steps} DDIM steps, {args.samples} samples, {n} heads"
    return out


def table(acc, shots_list):
    methods = sorted({m for m, _ in acc}, key=_order)
    out = {}
    for m in methods:
        out[m] = {}
        for k in shots_list:
            v = np.array(acc.get((m, k), []), dtype=float)
            if len(v):
                out[m][k] = {"mean": float(np.nanmean(v)), "std": float(np.nanstd(v)), "n": int(np.isfinite(v).sum())}
    imprint = [m for m in out if m in IMPRINTING]
    out["_gap_closed"] = {}
    out["_margin_over_retrieval"] = {}
    for k in shots_list:
        best = max(imprint, key=lambda m: out[m][k]["mean"])
        g, tr, bi = out["d2nwg"][k]["mean"], out["trained"][k]["mean"], out[best][k]["mean"]
        out["_gap_closed"][k] = {"best_imprinting": best,
                                 "gap_closed": (g - bi) / (tr - bi) if tr != bi else float("nan"),
                                 "gen_minus_best": g - bi, "spread_over_tasks": out[best][k]["std"]}
        if "retrieval" in out:
            out["_margin_over_retrieval"][k] = g - out["retrieval"][k]["mean"]
    return out


def _order(m):
    order = ["d2nwg", "d2nwg-mean", "qi2018", "simpleshot", "westerhoff2025", "dc", "retrieval", "trained"]
    return order.index(m) if m in order else len(order)


def print_table(title, tab, shots_list):
    print(f"\n{title}: accuracy (%) mean ± std over tasks")
    print(f"{'method':16s}" + "".join(f"{f'{k}-shot':>16s}" for k in shots_list))
    for m, per in tab.items():
        if m.startswith("_"):
            continue
        print(f"{m:16s}" + "".join(f"{100 * per[k]['mean']:9.1f} ± {100 * per[k]['std']:4.1f}" if k in per
                                   else f"{'-':>16s}" for k in shots_list))
    gc = tab["_gap_closed"]
    print(f"{'gap closed':16s}" + "".join(f"{gc[k]['gap_closed']:>16.2f}" if k in gc else f"{'-':>16s}"
                                          for k in shots_list))
    print(f"{'gen - best imp.':16s}" + "".join(
        f"{100 * gc[k]['gen_minus_best']:>+10.1f} ({gc[k]['best_imprinting'][:4]})" if k in gc else f"{'-':>16s}"
        for k in shots_list))
    mr = tab["_margin_over_retrieval"]
    print(f"{'gen - retrieval':16s}" + "".join(f"{100 * mr[k]:>+16.1f}" if k in mr else f"{'-':>16s}"
                                               for k in shots_list))


def figure(figure_data, path, shots_list):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(figure_data)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.0), squeeze=False)
    styles = {"d2nwg": ("C3", "o", "-"), "d2nwg-mean": ("C3", "s", ":"), "qi2018": ("C0", "^", "-"),
              "simpleshot": ("C1", "v", "-"), "westerhoff2025": ("C2", "D", "-"), "dc": ("C4", "P", "-"),
              "retrieval": ("C7", "x", "--"), "trained": ("k", "*", "--")}
    for ax, (name, tab) in zip(axes[0], figure_data.items()):
        for m, per in tab.items():
            if m.startswith("_"):
                continue
            ks = [k for k in shots_list if k in per]
            color, marker, ls = styles.get(m, ("C8", ".", "-"))
            ax.errorbar(range(len(ks)), [100 * per[k]["mean"] for k in ks], yerr=[100 * per[k]["std"] for k in ks],
                        color=color, marker=marker, linestyle=ls, capsize=3, label=m, alpha=0.9)
        ax.set_xticks(range(len(shots_list)), [str(k) for k in shots_list])
        ax.set_xlabel("shots per class")
        ax.set_ylabel("query accuracy (%)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(8, len(labels)), frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Evaluate the checkpoint the arguments name; print the tables, write the files; returns the summary."""
    args = parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with torch_threads(args.threads), generator_dir(args.ckpt.resolve()):
        rows, summary, figure_data = evaluate(args)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    for name, block in summary["sources"].items():
        print_table(f"{name}, {block['ways']}-way, clean support", block["clean"], args.shots)
        if "flipped" in block:
            print_table(f"{name}, {args.flip:.0%} of support labels flipped", block["flipped"],
                        [k for k in args.shots if k in block["flipped"]["d2nwg"]])
        if "memorisation" in block:
            print(f"memorisation ({name}): " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                                         for k, v in block["memorisation"].items()}))
    c = summary["cost"]
    print(f"\ncost ({c['setting']}): d2nwg {1e3 * c['d2nwg_seconds_per_head']:.1f} ms/head, qi2018 "
          f"{1e3 * c['qi2018_seconds_per_head']:.2f} ms/head, westerhoff2025 "
          f"{1e3 * c['westerhoff2025_seconds_per_head']:.2f} ms/head: generation costs "
          f"{c['d2nwg_over_qi2018']:.0f}x mean imprinting")
    write_csv(args.out / "results.csv", rows)
    write_json_atomic(args.out / "summary.json", summary)
    figure(figure_data, args.out / "accuracy.png", args.shots)
    print(f"\nresults: {args.out / 'results.csv'}, {args.out / 'summary.json'}, {args.out / 'accuracy.png'} "
          f"({summary['seconds']:.0f}s)")
    return summary
