"""``bench``: extract | imprint | run | quickstart | suite | methods.

Every command takes ``-c/--config FILE.yaml`` and any number of ``key.sub=value`` overrides,
e.g. ``bench run -c configs/quickstart.yaml trainer.devices=2 trainer.strategy=ddp``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import runtime
from bench.errors import BenchError

QUICKSTART_CONFIG = "configs/quickstart.yaml"  # ./configs/quickstart.yaml if there is one, else the shipped one


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    helps = {
        "extract": "extract embeddings into the cache (skipped when cached)",
        "imprint": "imprint and evaluate the method grid from cached embeddings",
        "run": "extract if not cached, then imprint and evaluate the whole grid",
        "quickstart": "the embedded default: digits, the tiny backbone, base and novel classes",
        "diagnose": "neural collapse, CDNV, geometric complexity and transferability per backbone",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("-c", "--config", help="YAML run config (see configs/)")
        p.add_argument("--dry-run", action="store_true",
                       help="check the config, task suite and method grid and print the plan; load nothing")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    for name, (_, _, text) in GROUPS.items():
        sub.add_parser(name, help=text, add_help=False)
    sub.add_parser("suite", help=SUITE_HELP, add_help=False)  # parsed by _suite_parser
    m = sub.add_parser("methods", help="list presets, or expand a method grid")
    m.add_argument("grid", nargs="*", help="grid entries, e.g. 'l2/kmeans:k=[1,5]/l2/l2/max'")
    m.add_argument("--markdown", action="store_true", help="print the method table as markdown (the README's)")
    return ap


def _methods(grid_entries: list[str], markdown: bool = False) -> None:
    import textwrap

    from bench.imprint import PRESET_TABLE, expand_grid
    from bench.imprint.registry import REGISTRY, STAGE_TITLES, STAGES, load_lazy, method_table

    if markdown:
        print(method_table())
        return
    if not grid_entries:
        problems = load_lazy()
        print("presets:")
        for name, (spec, source) in PRESET_TABLE.items():
            print(f"  {name:16s} {spec:40s} {source}")
        print("\nmethods, by stage (NORM_pre/GEN/NORM_post/NORM_inf/AGG; `bench methods --markdown` for options):")
        for stage in STAGES:
            print(f"  {STAGE_TITLES[stage]}")
            for method in REGISTRY[stage].values():
                lines = textwrap.wrap(method.summary, 70) or [""]
                print(f"    {method.option_text().strip('`'):44s} {lines[0]}")
                for line in lines[1:]:
                    print(f"    {'':44s} {line}")
        for problem in problems:
            print(f"  {problem}")
        return
    grid = expand_grid(grid_entries)
    for spec in grid.specs:
        print(spec.name if spec.label is None else f"{spec.name:16s} {spec}")
    for text, why in grid.dropped:
        print(f"dropped {text}: {why}")


SUITE_HELP = "run every member task of a benchmark suite (tasks/NAME.suite.yaml), e.g. vtab-1k or elevater-20"


def _suite_parser() -> argparse.ArgumentParser:
    """Its own parser, read intermixed, so --dry-run or -c may stand between the suite's name and
    the overrides (a subcommand's positionals would stop at the first option)."""
    p = argparse.ArgumentParser(prog="bench suite", description=SUITE_HELP)
    p.add_argument("suite", help="a benchmark suite name or a .suite.yaml path")
    p.add_argument("-c", "--config", help="YAML run config (backbone, methods, ...); each member sets task and dataset")
    p.add_argument("--dry-run", action="store_true", help="check every member's plan; load nothing, no network")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied after each member's own")
    return p


def _suite(name: str, config: str | None, overrides: list[str], dry_run: bool) -> int:
    """Every member of a benchmark suite, one run each (its own task, dataset split and revision)."""
    from bench import pipeline
    from bench.config import load_config
    from bench.data.benchmarks import BenchmarkSuite

    bench_suite = BenchmarkSuite.load(name)
    configs = [load_config(config, [*member.overrides(), *overrides]) for member in bench_suite.members]
    if len(configs) > 1 and configs[0].name:
        raise BenchError(f"name={configs[0].name} would give every member of {bench_suite.name} the same output "
                         "folder; drop it (each member's run is named <task>-<backbone>) or set out_dir instead")
    unpinned = bench_suite.unpinned()
    print(f"benchmark suite {bench_suite.name} version {bench_suite.version}: {len(configs)} member tasks"
          + (f"; revision not pinned for {len(unpinned)}: {', '.join(unpinned)}" if unpinned else ""))
    if dry_run:
        for cfg in configs:  # every member is checked before any is printed as fine
            pipeline.plan(cfg, "run")
        for member, cfg in zip(bench_suite.members, configs):
            print(pipeline.plan(cfg, "run"))
            print(f"  revision  {member.revision or 'NOT PINNED (see the suite file)'}")
        return 0
    for cfg in configs:
        result = pipeline.run(cfg)
        if pipeline.is_rank_zero():
            print(pipeline.report(result))
    return 0


def _diagnose(cfg) -> int:
    from bench import pipeline
    from bench.diagnostics.diagnose import diagnose, format_correlations, write_diagnostics
    from bench.report.wandb_log import log_tables

    d = cfg.diagnose
    result = diagnose(cfg, d.backbone_configs(cfg.backbone), d.methods, d.gc_samples, d.gc_probes, d.pool_split)
    if not pipeline.is_rank_zero():
        return 0
    name = cfg.name or runtime.slug(f"{cfg.task}-diagnose")
    out_dir = Path(cfg.out_dir) / name
    paths = write_diagnostics(result, out_dir)
    summary = {f"{r['backbone']}/{r['classes']}/{k}": v for r in result["diagnostics"]
               for k, v in r.items() if isinstance(v, float)}
    where = log_tables({k: result[k] for k in ("diagnostics", "correlations", "cka")}, summary,
                       cfg.to_dict(), name, out_dir, cfg.wandb.mode, cfg.wandb.project, cfg.wandb.entity)
    cols = ["nc1", "l2_nc1", "cdnv", "ncc_accuracy", "logme", "h_score", "gc", "gc_normalized"]
    print(f"{'backbone':28s} {'classes':8s} " + " ".join(f"{c:>13s}" for c in cols))
    for r in result["diagnostics"]:
        print(f"{r['backbone'][:28]:28s} {r['classes'][:8]:8s} " + " ".join(f"{r[c]:13.4g}" for c in cols))
    print("\n" + format_correlations(result["correlations"]))
    print(f"\ndiagnostics: {', '.join(map(str, paths))}")
    print(f"W&B: {where}" if where else "W&B: disabled")
    return 0


# Command groups with parsers of their own: ``bench <group> ...`` hands the rest of the
# command line to ``module:function(argv) -> exit code``.
GROUPS = {
    "report": ("bench.report.cli", "main", "merge runs: tables, statistics, figures, HTML, W&B"),
    "zoo": ("bench.weightspace.zoo.cli", "main", "build or inspect a zoo of trained networks or heads"),
    "weights": ("bench.weightspace.encoder.cli", "main", "fit or apply the set-based weight encoder (SNE)"),
    "generator": ("bench.weightspace.generator.cli", "main", "fit the support-conditioned head generator (D2NWG)"),
}


def _run_group(name: str, argv: list[str]) -> int:
    import importlib

    module, func, _ = GROUPS[name]
    try:
        return int(getattr(importlib.import_module(module), func)(argv) or 0)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    runtime.remember_user_threads()  # before any launch: Lightning sets OMP_NUM_THREADS in its processes
    if argv and argv[0] in GROUPS:
        return _run_group(argv[0], argv[1:])
    suite_args = _suite_parser().parse_intermixed_args(argv[1:]) if argv and argv[0] == "suite" else None
    args = _parser().parse_args(argv) if suite_args is None else None
    try:
        if suite_args is not None:
            return _suite(suite_args.suite, suite_args.config, suite_args.overrides, suite_args.dry_run)
        if args.command == "methods":
            _methods(args.grid, args.markdown)
            return 0
        from bench import pipeline
        from bench.config import load_config

        config = args.config
        if args.command == "quickstart" and config is None:
            config = QUICKSTART_CONFIG
        cfg = load_config(config, args.overrides)
        if args.dry_run:
            print(pipeline.plan(cfg, args.command))
            return 0
        if args.command == "extract":
            runtime.quiet_lightning()
            pipeline.launch(cfg)
            emb = pipeline.extract_stage(cfg)
            if pipeline.is_rank_zero():
                for entry in (emb.pool, emb.queries):
                    if entry is not None:
                        print(f"{entry.manifest['fields']['split']}: {entry.path} "
                              f"({entry.manifest['num_samples']} x {entry.manifest['dim']})")
            return 0
        if args.command == "diagnose":
            return _diagnose(cfg)
        result = pipeline.run(cfg, require_cached=args.command == "imprint")
        if pipeline.is_rank_zero():
            print(pipeline.report(result))
        return 0
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
