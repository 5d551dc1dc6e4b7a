"""``bench weights ...``: fit and apply the SNE encoder.

    bench weights fit --zoo .cache/zoo/digits --out runs/sne --invariance 1
    bench weights fit zoo=.cache/zoo/digits out=runs/sne invariance=1 model.hidden=64
    bench weights fit -c runs/sne/config.yaml                      # replay a fit from its saved config
    bench weights predict --checkpoint runs/sne --zoo .cache/zoo/digits-permuted --csv preds.csv

A fit's settings are keys of :class:`~bench.weightspace.encoder.config.EncoderFitConfig`, given
as in ``bench run``: ``-c FILE.yaml`` and ``key=value`` overrides; each ``--flag`` below is the
override of one key.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.weightspace.commands import FlagParser, add_config_arguments, load_fit_config, write_csv

# --flag dest -> config key
FIT_FLAGS = {"zoo": "zoo", "heads": "heads", "families": "families", "out": "out", "epochs": "epochs",
             "batch_size": "batch_size", "lr": "lr", "weight_decay": "weight_decay", "invariance": "invariance",
             "augment": "augment", "hidden": "model.hidden", "blocks": "model.blocks", "combine": "model.combine",
             "seed": "seed", "wandb": "wandb.mode", "progress": "progress"}


def _parser() -> argparse.ArgumentParser:
    ap = FlagParser(prog="bench weights", description="fit or apply the set-based weight encoder (SNE)")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=FlagParser)
    f = sub.add_parser("fit", help="train SNE to predict test accuracy from weights (Lightning)")
    add_config_arguments(f, "zoo=.cache/zoo/digits out=runs/sne epochs=30 model.hidden=64")
    _add_source(f)
    f.add_argument("--out", help="checkpoint folder (model.safetensors, config.json, config.yaml)")
    f.add_argument("--epochs", type=int)
    f.add_argument("--batch-size", type=int)
    f.add_argument("--lr", type=float)
    f.add_argument("--weight-decay", type=float)
    f.add_argument("--invariance", type=float, help="logit-invariance strength (0: off)")
    f.add_argument("--augment", type=float,
                   help="probability that a drawn training network is a hidden-unit permuted copy (0: off)")
    f.add_argument("--hidden", type=int)
    f.add_argument("--blocks", type=int, help="set-to-set blocks per level")
    f.add_argument("--combine", help="how layers combine in depth order: set | gru")
    f.add_argument("--seed", type=int)
    f.add_argument("--wandb", help="auto | offline | online | disabled")
    f.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    p = sub.add_parser("predict", help="predict accuracy with a fitted SNE; scores it when accuracies are known")
    _add_source(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--csv", help="write one row per item: id, predicted and true accuracy")
    return ap


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--zoo", help="a network zoo folder")
    p.add_argument("--heads", nargs="+", help="run folders with saved heads")
    p.add_argument("--families", help="only these architecture families, comma-separated (e.g. conv2,mlp1)")


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from bench.runtime import configure_threads

    configure_threads()
    if args.command == "fit":
        from bench.weightspace.encoder.config import EncoderFitConfig
        from bench.weightspace.encoder.training import fit_encoder

        config = load_fit_config(EncoderFitConfig, args, FIT_FLAGS)
        start = time.perf_counter()
        predictor, items, y = fit_encoder(config)
        tau, r2 = _scores(predictor.predict(items), y)
        print(f"fitted SNE on {len(items)} {predictor.model_cfg.kind}s in {time.perf_counter() - start:.0f}s; "
              f"train Kendall tau {tau:.3f}, R2 {r2:.3f}; checkpoint: {config.out} (replay: bench weights fit "
              f"-c {config.out}/config.yaml)")
        if predictor.info.get("wandb"):
            print(f"W&B: {predictor.info['wandb']}")
        return 0
    from bench.weightspace.encoder.training import SNEPredictor, load_items

    families = [f for f in (args.families or "").split(",") if f]
    items, y, ids = load_items(args.zoo, args.heads or [], families)
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
