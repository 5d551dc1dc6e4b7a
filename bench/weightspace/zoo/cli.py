"""``bench zoo ...``: build and inspect zoos of trained networks, and of the heads ``bench run`` saves.

    bench zoo build --out .cache/zoo/digits --count 400            # resumable, content-addressed
    bench zoo show .cache/zoo/digits
    bench zoo heads runs/headzoo/runs/*                            # a head zoo made by bench run
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.weightspace.commands import FlagParser, write_csv


def _zoo_parser() -> argparse.ArgumentParser:
    ap = FlagParser(prog="bench zoo", description="build or inspect a zoo of trained networks or heads")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=FlagParser)
    b = sub.add_parser("build", help="train the zoo's missing networks (Lightning), resumable")
    b.add_argument("--out", required=True, type=Path, help="zoo folder (e.g. .cache/zoo/digits)")
    b.add_argument("--count", type=int, default=400, help="networks in the zoo (default 400)")
    b.add_argument("--seed", type=int, default=0, help="seed that draws architectures and recipes")
    b.add_argument("--dataset", default="digits", help="digits | digits-permuted")
    b.add_argument("--fixed-fraction", type=float, default=1 / 3,
                   help="share of networks with the one fixed architecture (conv2 w=16 k=3)")
    b.add_argument("--workers", type=int, default=2, help="training processes (default 2)")
    s = sub.add_parser("show", help="summarise a network zoo")
    s.add_argument("zoo", type=Path)
    h = sub.add_parser("heads", help="summarise the heads saved by `bench run ... save_heads=true`")
    h.add_argument("runs", nargs="+", type=Path, help="run folders (runs/<name>)")
    h.add_argument("--csv", type=Path, help="write one row per head (episode, method, acc, path)")
    return ap


def main(argv: list[str]) -> int:
    args = _zoo_parser().parse_args(argv)
    if args.command == "build":
        from bench.weightspace.zoo.networks import NetworkZoo, build_zoo, plan_zoo

        members = plan_zoo(args.count, args.seed, args.dataset, args.fixed_fraction)
        summary = build_zoo(args.out, members, workers=max(1, args.workers))
        print(NetworkZoo.load(args.out).describe())
        print(f"trained {summary['trained_now']} network(s) in {summary['wall_seconds']:.0f}s "
              f"({summary['wall_seconds_per_network']:.2f}s wall per network on {summary['workers']} process(es), "
              f"{summary['seconds_per_network_mean']:.2f}s mean per network in its process); "
              f"index: {args.out / 'index.csv'}")
        return 0
    if args.command == "show":
        from bench.weightspace.zoo.networks import NetworkZoo

        print(NetworkZoo.load(args.zoo, include_diverged=True).describe())
        return 0
    from bench.weightspace.zoo.heads import HeadZoo

    zoo = HeadZoo.load(args.runs)
    print(zoo.describe())
    if args.csv:
        rows = [{"episode": "/".join(map(str, r.episode)), "method": r.method, "acc": r.acc, "path": str(r.path)}
                for r in zoo]
        write_csv(args.csv, rows)
        print(f"wrote {args.csv}")
    return 0
