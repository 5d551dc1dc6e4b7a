"""``bench weights ...``: fit and apply the SNE encoder.

    bench weights fit --zoo .cache/zoo/digits --out runs/sne --invariance 1
    bench weights predict --checkpoint runs/sne --zoo .cache/zoo/digits-permuted --csv preds.csv
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.errors import BenchError
from bench.weightspace.commands import FlagParser, write_csv


def _weights_parser() -> argparse.ArgumentParser:
    ap = FlagParser(prog="bench weights", description="fit or apply the set-based weight encoder (SNE)")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=FlagParser)
    f = sub.add_parser("fit", help="train SNE to predict test accuracy from weights (Lightning)")
    _add_source(f)
    f.add_argument("--out", required=True, type=Path, help="checkpoint folder (model.safetensors + config.json)")
    f.add_argument("--epochs", type=int, default=60)
    f.add_argument("--batch-size", type=int, default=16)
    f.add_argument("--lr", type=float, default=2e-3)
    f.add_argument("--weight-decay", type=float, default=1e-4)
    f.add_argument("--invariance", type=float, default=0.0, help="logit-invariance strength (0: off)")
    f.add_argument("--augment", type=float, default=0.0,
                   help="probability that a drawn training network is a hidden-unit permuted copy (0: off)")
    f.add_argument("--hidden", type=int, default=32)
    f.add_argument("--blocks", type=int, default=1, help="set-to-set blocks per level")
    f.add_argument("--combine", default="set", help="how layers combine in depth order: set | gru")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--wandb", default="auto", help="auto | offline | online | disabled")
    f.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("predict", help="predict accuracy with a fitted SNE; scores it when accuracies are known")
    _add_source(p)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--csv", type=Path, help="write one row per item: id, predicted and true accuracy")
    return ap


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--zoo", type=Path, help="a network zoo folder")
    p.add_argument("--heads", type=Path, nargs="+", help="run folders with saved heads")
    p.add_argument("--families", help="only these architecture families, comma-separated (e.g. conv2,mlp1)")


def _load_items(args) -> tuple[list, np.ndarray, list[str]]:
    if (args.zoo is None) == (args.heads is None):
        raise BenchError("give exactly one of --zoo DIR or --heads RUN_DIR...")
    if args.zoo is not None:
        from bench.weightspace.zoo.networks import NetworkZoo

        zoo = NetworkZoo.load(args.zoo)
        if args.families:
            wanted = set(args.families.split(","))
            unknown = wanted - set(zoo.families())
            if unknown:
                raise BenchError(f"families {sorted(unknown)} are not in {args.zoo}; it has {sorted(set(zoo.families()))}")
            zoo = zoo.subset([f in wanted for f in zoo.families()])
        return [r.layers() for r in zoo], zoo.targets().numpy(), [r.key for r in zoo]
    if args.families:
        raise BenchError("--families applies to network zoos, not heads")
    from bench.weightspace.zoo.heads import HeadZoo

    heads = HeadZoo.load(args.heads)
    ids = [f"{r.run}/{'/'.join(map(str, r.episode[3:]))}/{r.method}" for r in heads]
    return [r.weights() for r in heads], heads.targets().numpy(), ids


def main(argv: list[str]) -> int:
    args = _weights_parser().parse_args(argv)
    from bench.runtime import configure_threads

    configure_threads()
    items, y, ids = _load_items(args)
    if args.command == "fit":
        from bench.weightspace.encoder.sne import SNEConfig
        from bench.weightspace.encoder.training import FitConfig, SNEPredictor

        model = SNEConfig(kind="head" if args.heads else "network", hidden=args.hidden, blocks=args.blocks,
                          combine=args.combine)
        fit = FitConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        weight_decay=args.weight_decay, invariance=args.invariance,
                        augment=args.augment, seed=args.seed)
        start = time.perf_counter()
        predictor = SNEPredictor(model, fit).fit(items, y, wandb=args.wandb, log_dir=args.out / "wandb",
                                                 progress=not args.no_progress)
        source = {"zoo": str(args.zoo)} if args.zoo else {"heads": [str(h) for h in args.heads]}
        predictor.save(args.out, {"trained_on": {**source, "families": args.families, "items": len(items)}})
        tau, r2 = _scores(predictor.predict(items), y)
        print(f"fitted SNE on {len(items)} {model.kind}s in {time.perf_counter() - start:.0f}s; "
              f"train Kendall tau {tau:.3f}, R2 {r2:.3f}; checkpoint: {args.out}")
        if predictor.info.get("wandb"):
            print(f"W&B: {predictor.info['wandb']}")
        return 0
    from bench.weightspace.encoder.training import SNEPredictor

    predictor = SNEPredictor.load(args.checkpoint)
    pred = predictor.predict(items)
    tau, r2 = _scores(pred, y)
    print(f"{len(items)} item(s): Kendall tau {tau:.3f}, R2 {r2:.3f}, mean |error| {np.mean(np.abs(pred - y)):.3f}")
    if args.csv:
        write_csv(args.csv, [{"id": i, "predicted_acc": float(p), "true_acc": float(t)}
                             for i, p, t in zip(ids, pred, y)])
        print(f"wrote {args.csv}")
    return 0


def _scores(pred: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from bench.statistics import kendall_tau
    from bench.weightspace.encoder.scoring import r2_score

    return kendall_tau(pred, y), r2_score(pred, y)

