"""Predict accuracy from weights: SNE against StatNN and a flattened-weights MLP, side by side.

Reads a network zoo on digits, a second zoo on another dataset (digits with a fixed pixel
permutation) and, optionally, a head zoo (run folders of `bench run ... save_heads=true`). Fits
every predictor on each split and prints one table of Kendall's tau and R^2 of predicted against
true test accuracy:

- in-distribution: a random 80/20 split of the digits zoo (all architectures);
- fixed-arch: the test networks of that split that have the zoo's fixed architecture, where the
  flattened-weights MLP (trained on the fixed-arch training networks only) can read them;
- cross-architecture: train on the architecture families not held out, test on the held-out
  families (never seen in training); ``--holdout`` groups, one split each;
- cross-dataset: the in-distribution predictors applied to the whole second zoo;
- invariance: the largest change of each predictor's prediction over random hidden-unit
  permutations of the in-distribution test networks, in % of its prediction range;
- heads: predict each saved head's query accuracy (split by episode), then per test episode pick
  the method with the best predicted accuracy (label-free selection): regret against the oracle
  and against always using the preset that is best on average over the training episodes.

    python scripts/weight_encoder_eval.py --zoo .cache/zoo/digits --cross-zoo .cache/zoo/digits-permuted \\
        --heads runs/headzoo/runs/* --out runs/weight-encoder-eval

SNE variants (``--sne``, ``--cross-arch-sne``) are named by their training options: ``sne+li10``
has the logit-invariance regulariser at strength 10, ``sne+aug1`` sees every training network as
a freshly permuted copy (probability 1), ``sne+li100+aug1`` both.

Writes results.json, table.csv, predictions.csv and figures (predicted vs true per predictor and
split, permutation sensitivity, head-selection regret) to --out. ``scripts/weight_encoder_eval.py``
runs :func:`main`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bench.config import WandbConfig
from bench.errors import BenchError
from bench.runtime import atomic_path, configure_threads, write_json_atomic
from bench.statistics import kendall_tau
from bench.weightspace.commands import FlagParser, check_config, write_csv
from bench.weightspace.encoder.config import EncoderFitConfig
from bench.weightspace.encoder.flatmlp import FlatMLP
from bench.weightspace.encoder.scoring import permutation_sensitivity, r2_score, selection_regret
from bench.weightspace.encoder.sne import SNEConfig
from bench.weightspace.encoder.statnn import StatNN
from bench.weightspace.encoder.training import SNEPredictor, default_name, parse_variant
from bench.weightspace.zoo.architectures import permute_hidden_units
from bench.weightspace.zoo.heads import HeadZoo
from bench.weightspace.zoo.networks import NetworkZoo

DEFAULT_HOLDOUTS = ["conv3,conv3-bn,mlp2", "conv4,conv4-bn,mlp3"]


class Evaluation:
    """The rows of the table (one per split and predictor), the predictions behind them and the
    time each fit and check took."""

    def __init__(self, args) -> None:
        self.args = args
        self.wandb = check_config(WandbConfig, {"mode": args.wandb}, "--wandb")  # a bad mode stops it before any fit
        self.rows: list[dict] = []
        self.preds: list[dict] = []
        self.timings: dict[str, float] = {}

    def predictors(self, kind: str = "network", variants: list[str] | None = None) -> list:
        """StatNN (trees, MLP) and the SNE variants (``--sne``: with and without the logit-invariance
        regulariser and permutation augmentation). Heads have no hidden units to permute: plain SNE."""
        a = self.args
        # two set-to-set blocks per level: the encoder of the published tables
        model = SNEConfig(kind=kind, hidden=a.hidden, blocks=2)
        epochs = a.epochs if kind == "network" else a.head_epochs
        names = (a.sne if variants is None else variants) if kind == "network" else ["sne"]
        out = [StatNN("gbt", a.seed), StatNN("mlp", a.seed)]
        for name in names:
            fit = check_config(EncoderFitConfig, {"model": model, "epochs": epochs, "batch_size": a.batch_size,
                                                  "seed": a.seed, **parse_variant(name)})
            out.append(SNEPredictor(fit))
        return out

    def fit(self, predictor, items, y, split: str):
        start = time.perf_counter()
        if isinstance(predictor, SNEPredictor):
            predictor.fit(items, y, wandb=self.wandb, log_dir=self.args.out / "wandb",
                          progress=self.args.progress, run_name=f"{predictor.name}-{split}")
        else:
            predictor.fit(items, y)
        self.timings[f"fit {predictor.name} on {split}"] = time.perf_counter() - start
        return predictor

    def score(self, split: str, predictor, n_train: int, items, y, ids, **extra) -> np.ndarray:
        pred = np.asarray(predictor.predict(items), dtype=np.float64)
        row = {"split": split, "predictor": predictor.name, "train": n_train, "test": len(items),
               "kendall_tau": kendall_tau(pred, y), "r2": r2_score(pred, y), **extra}
        self.rows.append(row)
        self.preds += [{"split": split, "predictor": predictor.name, "id": i, "predicted": float(p), "true": float(t)}
                       for i, p, t in zip(ids, pred, y)]
        print(f"  {split:28s} {predictor.name:13s} tau={row['kendall_tau']:+.3f} R2={row['r2']:+.3f} "
              f"(train {n_train}, test {len(items)})", flush=True)
        return pred


def _layers(zoo: NetworkZoo) -> list:
    return [r.layers() for r in zoo]


def network_splits(ev: Evaluation, zoo: NetworkZoo, cross: NetworkZoo | None) -> None:
    a = ev.args
    layers, y, keys = _layers(zoo), zoo.targets().numpy(), [r.key for r in zoo]
    fixed = np.array([r.fixed_arch for r in zoo])
    g = np.random.default_rng(a.seed)
    is_test = np.zeros(len(zoo), dtype=bool)
    is_test[g.permutation(len(zoo))[: int(round(a.test_fraction * len(zoo)))]] = True
    tr, te = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    pick = lambda idx: [layers[i] for i in idx]  # noqa: E731
    cross_layers = _layers(cross) if cross is not None else None
    cross_y = cross.targets().numpy() if cross is not None else None
    cross_fixed = np.array([r.fixed_arch for r in cross]) if cross is not None else None

    print(f"\nin-distribution: {len(tr)} train / {len(te)} test networks (seed {a.seed})", flush=True)
    fitted = []
    for p in ev.predictors():
        ev.fit(p, pick(tr), y[tr], "in-distribution")
        ev.score("in-distribution", p, len(tr), pick(te), y[te], [keys[i] for i in te])
        fitted.append(p)
    fixed_tr, fixed_te = tr[fixed[tr]], te[fixed[te]]
    flat = ev.fit(FlatMLP(a.seed), pick(fixed_tr), y[fixed_tr], "fixed-arch")
    for p in fitted:
        ev.score("fixed-arch", p, len(tr), pick(fixed_te), y[fixed_te], [keys[i] for i in fixed_te])
    ev.score("fixed-arch", flat, len(fixed_tr), pick(fixed_te), y[fixed_te], [keys[i] for i in fixed_te])

    if cross is not None:
        print(f"\ncross-dataset: trained on {zoo.root}, tested on {cross.root}", flush=True)
        ids = [r.key for r in cross]
        for p in fitted:
            ev.score("cross-dataset", p, len(tr), cross_layers, cross_y, ids)
        cf = np.flatnonzero(cross_fixed)
        for p in fitted + [flat]:
            ev.score("cross-dataset fixed-arch", p, len(fixed_tr) if p is flat else len(tr),
                     [cross_layers[i] for i in cf], cross_y[cf], [ids[i] for i in cf])

    print(f"\ninvariance: {a.permutations} random hidden-unit permutations of each of {len(te)} test networks",
          flush=True)
    for p in fitted + [flat]:
        idx = fixed_te if p is flat else te
        start = time.perf_counter()
        s = permutation_sensitivity(p.predict, pick(idx), permute_hidden_units, a.permutations, a.seed + 17)
        ev.timings[f"invariance {p.name}"] = time.perf_counter() - start
        ev.rows.append({"split": "invariance" + (" (fixed-arch)" if p is flat else ""), "predictor": p.name,
                        "test": len(idx), "perm_max_abs": s["max_abs"], "perm_mean_abs": s["mean_abs"],
                        "perm_max_pct_of_range": s["max_pct_of_range"], "prediction_range": s["range"],
                        "perm_mean_pct_of_range": 100.0 * s["mean_abs"] / s["range"]})
        print(f"  {p.name:13s} max change {s['max_abs']:.2e} ({s['max_pct_of_range']:.3f}% of range "
              f"{s['range']:.3f}), mean max change {s['mean_abs']:.2e}", flush=True)

    families = np.array(zoo.families())
    for holdout in a.holdout:
        held = set(holdout.split(","))
        unknown = held - set(families)
        if unknown:
            raise BenchError(f"--holdout families {sorted(unknown)} are not in the zoo; it has {sorted(set(families))}")
        test_mask = np.isin(families, list(held))
        tr_x, te_x = np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
        split = f"cross-arch [{holdout}]"
        print(f"\n{split}: train on {sorted(map(str, set(families[tr_x])))} ({len(tr_x)}), "
              f"test on {sorted(held)} ({len(te_x)})", flush=True)
        # fewer SNE variants than in-distribution: each SNE fit costs minutes on 2 cores
        for p in ev.predictors(variants=a.cross_arch_sne):
            ev.fit(p, pick(tr_x), y[tr_x], split)
            ev.score(split, p, len(tr_x), pick(te_x), y[te_x], [keys[i] for i in te_x])


def head_split(ev: Evaluation, heads: HeadZoo) -> None:
    from bench.imprint import PRESETS

    a = ev.args
    episodes = heads.episodes()
    names = list(episodes)
    g = np.random.default_rng(a.seed)
    order = g.permutation(len(names))
    n_test = int(round(a.test_fraction * len(names)))
    test_eps = {names[i] for i in order[:n_test]}
    is_test = np.array([r.episode in test_eps for r in heads])
    tr, te = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    print(f"\nheads: {heads.describe()}\n  {len(names) - n_test} train / {n_test} test episodes "
          f"({len(tr)} / {len(te)} heads, seed {a.seed})", flush=True)
    start = time.perf_counter()
    weights = [r.weights() for r in heads]
    ev.timings["read heads"] = time.perf_counter() - start
    y = heads.targets().numpy()
    ids = [f"{r.run}/{'/'.join(map(str, r.episode[3:]))}/{r.method}" for r in heads]
    pick = lambda idx: [weights[i] for i in idx]  # noqa: E731
    position = {int(i): k for k, i in enumerate(te)}  # zoo index -> row among the test heads
    test_episode_idx = [[position[i] for i in idx] for e, idx in episodes.items() if e in test_eps]

    methods = np.array([r.method for r in heads])
    presets = [m for m in dict.fromkeys(methods) if m in PRESETS]
    if not presets:
        presets = list(dict.fromkeys(methods))
    mean_acc = {m: float(y[tr][methods[tr] == m].mean()) for m in presets if (methods[tr] == m).any()}
    best_preset = max(mean_acc, key=mean_acc.get)
    y_te = y[te]
    preset_acc = np.array([y_te[idx][methods[te][idx] == best_preset].max() if (methods[te][idx] == best_preset).any()
                           else np.nan for idx in map(np.asarray, test_episode_idx)])
    oracle = np.array([y_te[np.asarray(idx)].max() for idx in test_episode_idx])
    ev.rows.append({"split": "heads selection", "predictor": f"always {best_preset}", "test": len(test_episode_idx),
                    "regret_vs_oracle": float(np.nanmean(oracle - preset_acc)), "gain_vs_best_preset": 0.0})
    print(f"  best preset on average over training episodes: {best_preset} "
          f"(regret vs oracle {100 * np.nanmean(oracle - preset_acc):.2f} points)", flush=True)
    for p in ev.predictors("head"):
        ev.fit(p, pick(tr), y[tr], "heads")
        pred = ev.score("heads", p, len(tr), pick(te), y_te, [ids[i] for i in te])
        regret = selection_regret(test_episode_idx, y_te, pred)
        chosen = oracle - regret
        gain = float(np.nanmean(chosen - preset_acc))
        ev.rows.append({"split": "heads selection", "predictor": p.name, "test": len(test_episode_idx),
                        "regret_vs_oracle": float(regret.mean()), "gain_vs_best_preset": gain})
        print(f"  {p.name:13s} selection regret vs oracle {100 * regret.mean():.2f} points, "
              f"vs always {best_preset} {100 * gain:+.2f} points", flush=True)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'split':34s} {'predictor':14s} {'train':>5s} {'test':>5s} {'tau':>7s} {'R2':>7s}"]
    for r in rows:
        if "kendall_tau" in r:
            lines.append(f"{r['split']:34s} {r['predictor']:14s} {r['train']:5d} {r['test']:5d} "
                         f"{r['kendall_tau']:+7.3f} {r['r2']:+7.3f}")
    lines.append("")
    lines.append(f"{'invariance':34s} {'predictor':14s} {'max |change|':>12s} {'max, % range':>12s} "
                 f"{'mean, % range':>13s}")
    for r in rows:
        if "perm_max_abs" in r:
            lines.append(f"{r['split']:34s} {r['predictor']:14s} {r['perm_max_abs']:12.2e} "
                         f"{r['perm_max_pct_of_range']:12.3f} {r['perm_mean_pct_of_range']:13.3f}")
    sel = [r for r in rows if "regret_vs_oracle" in r]
    if sel:
        lines.append("")
        lines.append(f"{'head selection (test episodes)':34s} {'predictor':14s} {'regret vs oracle':>17s} "
                     f"{'vs best preset':>15s}")
        for r in sel:
            lines.append(f"{'':34s} {r['predictor']:14s} {100 * r['regret_vs_oracle']:14.2f} pt "
                         f"{100 * r['gain_vs_best_preset']:+12.2f} pt")
    return "\n".join(lines)


def figures(out: Path, rows: list[dict], preds: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    splits = list(dict.fromkeys(p["split"] for p in preds))
    predictors = list(dict.fromkeys(p["predictor"] for p in preds))
    fig, axes = plt.subplots(len(splits), len(predictors), figsize=(3.0 * len(predictors), 2.9 * len(splits)),
                             squeeze=False, sharex=True, sharey=True)
    score = {(r["split"], r["predictor"]): r for r in rows if "kendall_tau" in r}
    for i, split in enumerate(splits):
        for j, name in enumerate(predictors):
            ax = axes[i][j]
            pts = [(p["true"], p["predicted"]) for p in preds if p["split"] == split and p["predictor"] == name]
            ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, zorder=0)
            if pts:
                t, q = np.array(pts).T
                ax.scatter(t, q, s=6, alpha=0.6, color=f"C{j}")
                r = score[(split, name)]
                ax.text(0.03, 0.97, f"tau {r['kendall_tau']:+.2f}\nR2 {r['r2']:+.2f}\nn={len(pts)}",
                        transform=ax.transAxes, va="top", fontsize=7)
            else:
                ax.text(0.5, 0.5, "n/a", transform=ax.transAxes, ha="center", color="0.5")
            ax.set_xlim(0, 1.02)
            ax.set_ylim(-0.05, 1.1)
            if i == 0:
                ax.set_title(name, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{split}\npredicted acc", fontsize=7)
            if i == len(splits) - 1:
                ax.set_xlabel("true test acc", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle("Predicted against true accuracy (grey: y = x)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # keep the title off the column names
    paths.append(_save_png(fig, out / "predicted_vs_true.png"))

    inv = [r for r in rows if "perm_max_abs" in r]
    if inv:
        fig, ax = plt.subplots(figsize=(6.5, 3.2))
        names = [r["predictor"] for r in inv]
        vals = [max(r["perm_max_pct_of_range"], 1e-6) for r in inv]
        ax.barh(names, vals, color=[f"C{k}" for k in range(len(inv))])
        ax.set_xscale("log")
        for k, r in enumerate(inv):  # a log axis cannot show 0: say it
            ax.text(vals[k] * 1.5, k, f"{r['perm_max_pct_of_range']:.3g}%", va="center", fontsize=7)
        ax.axvline(1.0, color="k", ls="--", lw=0.8, label="1% of range")
        ax.set_xlim(right=max(vals) * 20)
        ax.set_xlabel("largest change under hidden-unit permutations\n"
                      "(% of prediction range, log scale; values below 1e-6 drawn at 1e-6)")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        paths.append(_save_png(fig, out / "permutation_sensitivity.png"))

    sel = [r for r in rows if "regret_vs_oracle" in r]
    if sel:
        fig, ax = plt.subplots(figsize=(6, 2.6))
        ax.barh([r["predictor"] for r in sel], [100 * r["regret_vs_oracle"] for r in sel],
                color=[f"C{k}" for k in range(len(sel))])
        ax.set_xlabel("head selection: mean regret vs oracle (accuracy points)")
        fig.tight_layout()
        paths.append(_save_png(fig, out / "head_selection_regret.png"))
    return paths


def parser() -> argparse.ArgumentParser:
    ap = FlagParser(prog="weight_encoder_eval.py", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=Path(".cache/zoo/digits"), help="network zoo; 'none': heads only")
    ap.add_argument("--cross-zoo", type=Path, default=Path(".cache/zoo/digits-permuted"),
                    help="a zoo trained on a second dataset; 'none' skips the cross-dataset split")
    ap.add_argument("--heads", type=Path, nargs="*", default=[], help="run folders with saved heads")
    ap.add_argument("--out", type=Path, default=Path("runs/weight-encoder-eval"))
    ap.add_argument("--holdout", nargs="*", default=DEFAULT_HOLDOUTS,
                    help="cross-architecture splits: comma-separated families held out of training, one split each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--head-epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--sne", nargs="+", default=["sne", "sne+li10", "sne+aug1", "sne+li100+aug1"],
                    help="SNE variants: sne[+liSTRENGTH][+augPROBABILITY] (logit-invariance regulariser, "
                         "permutation augmentation)")
    ap.add_argument("--cross-arch-sne", nargs="+", default=["sne", "sne+aug1"],
                    help="the SNE variants fitted on each cross-architecture split")
    ap.add_argument("--permutations", type=int, default=5, help="random permutations per test network")
    ap.add_argument("--wandb", default="disabled", help="W&B mode for the SNE fits: auto | offline | online | disabled")
    ap.add_argument("--progress", action="store_true", help="Lightning progress bars for the SNE fits")
    return ap


def main(argv: list[str] | None = None) -> dict:
    """Run every split the arguments ask for; print the table, write the files; returns the results."""
    args = parser().parse_args(argv)
    for flag, names in (("--sne", args.sne), ("--cross-arch-sne", args.cross_arch_sne)):
        # a typo stops the script before minutes of fitting; two names for one config (sne, sne+li0)
        # would write two rows under one predictor name, and the table and figures would mix them
        canonical = [default_name(check_config(EncoderFitConfig, parse_variant(name))) for name in names]
        if len(set(canonical)) < len(canonical):
            raise BenchError(f"{flag} names one SNE config twice: {names} are {canonical}")
    ev = Evaluation(args)
    configure_threads()
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    if str(args.zoo) != "none":
        zoo = NetworkZoo.load(args.zoo)
        cross = None if str(args.cross_zoo) == "none" else NetworkZoo.load(args.cross_zoo)
        print(zoo.describe())
        if cross is not None:
            print(cross.describe())
        network_splits(ev, zoo, cross)
    if args.heads:
        head_split(ev, HeadZoo.load(args.heads))
    total = time.perf_counter() - start
    table = format_table(ev.rows)
    print("\n" + table)
    paths = figures(args.out, ev.rows, ev.preds)
    result = {"rows": ev.rows, "seconds": total, "timings": ev.timings, "seed": args.seed,
              "args": {k: str(v) for k, v in vars(args).items()}, "torch_threads": torch.get_num_threads()}
    write_json_atomic(args.out / "results.json", result)
    write_csv(args.out / "table.csv", ev.rows)
    write_csv(args.out / "predictions.csv", ev.preds)
    print(f"\nevaluation took {total:.0f}s; results: {args.out / 'results.json'}; figures: "
          + ", ".join(str(p) for p in paths))
    return result


def _save_png(fig, path: Path) -> Path:
    """One figure as PNG, written atomically, then closed."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
