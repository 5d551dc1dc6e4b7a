"""Does geometric complexity / neural collapse predict few-shot transfer? A zoo on digits.

Pretrains a zoo of tiny CNNs on digits classes 0-4 with different regularisation (learning
rate, batch size, weight decay), then for each measures, with the library:

- geometric complexity (GC) of the embedding map on base classes 0-4,
- NC1 and CDNV of the embeddings of novel classes 5-9 (test split, kept apart from support),
- few-shot accuracy on novel classes of mean imprinting (qi2018) and multi-proxy k-means
  imprinting (l2/kmeans:k=5/l2/l2/max), mean over seeds,

and prints Kendall's tau between them. The published claims: lower GC goes with stronger
collapse on novel classes and better few-shot transfer; the gain of multi-proxy over mean
imprinting grows as NC1 grows.

    python scripts/zoo_collapse.py                 # 12 models, a few minutes on 2 cores
    python scripts/zoo_collapse.py --epochs 10 --out runs/zoo
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from bench.backbones import save_checkpoint
from bench.backbones.tiny_build import TRANSFORM, train
from bench.config import BackboneConfig, load_config
from bench.diagnostics.diagnose import diagnose, kendall, tau_undefined
from bench.runtime import configure_threads
from bench.statistics import mean_std

MEAN, MULTI = "qi2018", "l2/kmeans:k=5/l2/l2/max"
TASK = """name: zoo-digits
dataset: digits
class_splits: {base: [0, 1, 2, 3, 4], novel: [5, 6, 7, 8, 9]}
classes: [base, novel]
shots: [5, 20]
queries: test
seeds: [0, 1, 2]
"""


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/zoo"))
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--weight-decays", type=float, nargs="+", default=[0.0, 5e-3])
    ap.add_argument("--gc-samples", type=int, default=256, help="images per model for geometric complexity")
    ap.add_argument("--gc-probes", type=int, default=16, help="random probes per image for geometric complexity")
    args = ap.parse_args(argv)
    configure_threads()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "task.yaml").write_text(TASK)

    start = time.time()
    backbones, settings = [], {}
    for i, (lr, bs, wd) in enumerate(itertools.product(args.lrs, args.batch_sizes, args.weight_decays)):
        path = args.out / "checkpoints" / f"tiny-lr{lr}-bs{bs}-wd{wd}.safetensors"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            model = train(epochs=args.epochs, lr=lr, batch_size=bs, weight_decay=wd, seed=i)
            save_checkpoint(model, path, arch="tiny-cnn", transform=TRANSFORM, width=model.width, in_channels=1)
        backbones.append(BackboneConfig(name=f"checkpoint:{path}"))
        settings[f"checkpoint:{path.name}"] = {"lr": lr, "batch_size": bs, "weight_decay": wd}
        print(f"[{time.time() - start:5.0f}s] model {i + 1}: lr={lr} batch={bs} wd={wd}", flush=True)

    cfg = load_config(None, [f"task={args.out / 'task.yaml'}", f"cache_dir={args.out / 'cache'}",
                             "wandb.mode=disabled"])
    result = diagnose(cfg, backbones, [MEAN, MULTI], gc_samples=args.gc_samples, gc_probes=args.gc_probes)

    rows = {}
    for r in result["diagnostics"]:
        rows.setdefault(r["backbone"], {})[r["classes"]] = r
    acc = {}
    for r in result["accuracy"]:
        acc.setdefault((r["backbone"], r["classes"], r["method"], r["shots"]), []).append(float(r["acc"]))
    names = list(rows)
    table = []
    for b in names:
        entry = {"backbone": b, **settings[b], "gc_base": rows[b]["base"]["gc"],
                 "gc_base_normalized": rows[b]["base"]["gc_normalized"],
                 "nc1_novel": rows[b]["novel"]["nc1"], "cdnv_novel": rows[b]["novel"]["cdnv"]}
        for shots in ("5", "20"):
            m = mean_std(acc[(b, "novel", MEAN, shots)])[0]
            k = mean_std(acc[(b, "novel", MULTI, shots)])[0]
            entry.update({f"acc_mean_{shots}": m, f"acc_multi_{shots}": k, f"gain_{shots}": k - m})
        table.append(entry)

    print(f"\n{'model':36s} {'GC(base)':>9s} {'NC1(nov)':>9s} {'CDNV(nov)':>9s} {'mean@20':>8s} {'multi@20':>8s} {'gain@20':>8s}")
    for e in table:
        print(f"{e['backbone'][11:47]:36s} {e['gc_base']:9.3g} {e['nc1_novel']:9.3g} {e['cdnv_novel']:9.3g} "
              f"{100 * e['acc_mean_20']:8.1f} {100 * e['acc_multi_20']:8.1f} {100 * e['gain_20']:+8.1f}")

    col = lambda key: [e[key] for e in table]  # noqa: E731
    pairs = [
        ("GC(base) vs NC1(novel)", "gc_base", "nc1_novel", "+ (lower GC, stronger collapse)"),
        ("GC(base) vs CDNV(novel)", "gc_base", "cdnv_novel", "+"),
        ("GC(base) vs mean acc@20", "gc_base", "acc_mean_20", "- (lower GC, better transfer)"),
        ("GC(base) vs multi acc@20", "gc_base", "acc_multi_20", "-"),
        ("GC(base, normalised) vs mean acc@20", "gc_base_normalized", "acc_mean_20", "-"),
        ("NC1(novel) vs mean acc@20", "nc1_novel", "acc_mean_20", "-"),
        ("NC1(novel) vs multi-proxy gain@5", "nc1_novel", "gain_5", "+ (gain grows with NC1)"),
        ("NC1(novel) vs multi-proxy gain@20", "nc1_novel", "gain_20", "+"),
    ]
    taus = []
    print(f"\nKendall's tau across {len(table)} models (claimed sign in brackets):")
    for label, a, b, claim in pairs:
        tau, wtau = kendall(col(a), col(b))
        why = tau_undefined(col(a), col(b), [e["backbone"] for e in table])
        agrees = None if why else (tau > 0) == claim.startswith("+")
        verdict = f"undefined ({why})" if why else ("agrees" if agrees else "DISAGREES")
        taus.append({"pair": label, "kendall_tau": tau, "weighted_tau": wtau, "claim": claim, "agrees": agrees,
                     "undefined": why})
        print(f"  {label:38s} tau={tau:+.2f} weighted={wtau:+.2f}   claim {claim}: {verdict}")
    summary = {"models": table, "taus": taus, "seconds": time.time() - start}
    (args.out / "zoo.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {args.out / 'zoo.json'} in {time.time() - start:.0f}s")
    return summary


if __name__ == "__main__":
    main()
