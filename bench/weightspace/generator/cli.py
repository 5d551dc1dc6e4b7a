"""``bench generator ...``: fit and inspect the support-conditioned head generator (D2NWG).

    bench generator fit --out runs/generator/d2nwg                         # digits + gmm:a, ~10 min on 2 CPU cores
    bench generator fit --source gmm:a --tasks 500 --vae-steps 200 --diffusion-steps 300 --out runs/generator/tiny
    bench generator fit --source digits --tasks 400 --train-classes digits=0-6 --test-classes digits=7-9
    bench generator fit sources=[gmm:a] tasks=[500] vae_steps=200 out=runs/generator/tiny   # the same as keys
    bench generator fit -c runs/generator/tiny/config.yaml out=runs/generator/again        # replay a fit
    bench generator show runs/generator/d2nwg

A fit's settings are keys of :class:`~bench.weightspace.generator.config.GeneratorFitConfig`,
given as in ``bench run``: ``-c FILE.yaml`` and ``key=value`` overrides; each ``--flag`` below is
the override of one key.

Use a checkpoint as a GEN: ``l2/d2nwg:ckpt=d2nwg/none/l2/max`` (a folder under
$BENCH_GENERATOR_DIR, default runs/generator) (NORM_pre and NORM_inf must be the normalisation it
was fitted in, ``l2`` by default; NORM_post ``none``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.errors import BenchError
from bench.weightspace.commands import FlagParser, add_config_arguments, load_fit_config

# --flag dest -> config key
FIT_FLAGS = {name: name for name in (
    "out", "sources", "tasks", "train_classes", "test_classes", "ways", "per_class", "shots", "norm", "latent",
    "width", "vae_steps", "diffusion_steps", "batch_size", "seed", "threads", "lr", "prediction", "cache_dir",
    "accelerator", "overwrite", "progress")} | {"wandb": "wandb.mode"}


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, classes = v.rpartition("=")
        if not sep or not key:
            raise BenchError(f"{what} '{v}' must look like DATASET=CLASSES, e.g. digits=0-4")
        out[key] = classes
    return out


def _parser() -> argparse.ArgumentParser:
    ap = FlagParser(prog="bench generator", description="fit or inspect the support-conditioned head generator")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=FlagParser)
    f = sub.add_parser("fit", help="meta-train a generator on cached / procedural embedding tasks")
    add_config_arguments(f, "sources=[gmm:a] tasks=[500] vae_steps=200 out=runs/generator/tiny")
    f.add_argument("--out", help="checkpoint folder (default runs/generator/d2nwg)")
    f.add_argument("--source", action="append", dest="sources",
                   help="digits | cache:<entry folder> | gmm:<family> (repeat; default: digits and gmm:a)")
    f.add_argument("--tasks", type=int, nargs="+", help="meta-training tasks per source (default 400 3000)")
    f.add_argument("--train-classes", action="append", metavar="DATASET=CLASSES",
                   help="meta-train classes of a dataset, e.g. digits=0-4 (default: digits 0-4, gmm 0-1999)")
    f.add_argument("--test-classes", action="append", metavar="DATASET=CLASSES",
                   help="meta-test classes, never used in training, e.g. digits=5-9")
    f.add_argument("--ways", type=int, nargs=2, metavar=("MIN", "MAX"))
    f.add_argument("--per-class", type=int, nargs=2, metavar=("MIN", "MAX"),
                   help="pool size per class of a meta-training task (the trained head sees all of it)")
    f.add_argument("--shots", type=int, nargs="+", help="support sizes drawn in training")
    f.add_argument("--norm", help="l2 | none")
    for name in ("latent", "width", "vae-steps", "diffusion-steps", "batch-size", "seed", "threads"):
        f.add_argument(f"--{name}", type=int)
    f.add_argument("--lr", type=float)
    f.add_argument("--prediction", help="what the denoiser predicts: epsilon | sample | v_prediction")
    f.add_argument("--cache-dir", help="embedding and meta-task cache (default .cache)")
    f.add_argument("--wandb", help="auto | offline | online | disabled")
    f.add_argument("--accelerator")
    f.add_argument("--overwrite", action="store_const", const=True)
    f.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    s = sub.add_parser("show", help="print a checkpoint's config")
    s.add_argument("checkpoint", type=Path)
    return ap


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "show":
        from bench.weightspace.generator.model import CONFIG_FILE, checkpoint_dir

        cfg = json.loads((checkpoint_dir(args.checkpoint) / CONFIG_FILE).read_text())
        for s in cfg["sources"]:
            for key in ("meta_train_classes", "meta_test_classes"):
                c = s[key]
                s[key] = f"{len(c)} classes, {c[0]}..{c[-1]}" if len(c) > 12 else c
        print(json.dumps(cfg, indent=1, sort_keys=True))
        return 0
    from bench.weightspace.generator.config import GeneratorFitConfig
    from bench.weightspace.generator.training import fit_generator

    for name in ("train_classes", "test_classes"):
        if getattr(args, name) is not None:
            setattr(args, name, _pairs(getattr(args, name), f"--{name.replace('_', '-')}"))
    path = fit_generator(load_fit_config(GeneratorFitConfig, args, FIT_FLAGS))
    cfg_json = json.loads((path / "config.json").read_text())
    t = cfg_json["training"]
    print(f"generator: {path} ({t['tasks']} meta-training tasks, {t['rows']} head rows; "
          f"data {t['data_seconds']:.0f}s, fit {t['fit_seconds']:.0f}s); replay: bench generator fit "
          f"-c {path}/config.yaml out=<another folder>")
    for k, acc in t["heldout_accuracy"].items():
        print(f"held-out meta-train tasks, {k}: " + ", ".join(f"{m} {100 * v:.1f}%" for m, v in acc.items()))
    return 0
