#!/usr/bin/env python
"""Extraction throughput: the model alone against the full pipeline, and peak memory.

(a) model alone: forward passes on synthetic tensors already on the device, inside the same
    inference mode and autocast as extraction;
(b) full pipeline: ``bench.extract.extract`` (Lightning Trainer.predict, DataLoader, shard
    writer, merge, cache write) from a dataset whose images are already decoded tensors.
It prints images per second for each and the ratio b/a.

    python scripts/bench_extract.py                                   # CPU: resnet18 at 112 px
    python scripts/bench_extract.py --arch resnet50 --size 224 --precision bf16-mixed --channels-last
    python scripts/bench_extract.py --arch vit_b_16 --size 224 --precision bf16-mixed
    python scripts/bench_extract.py --memory                          # peak RSS at N and 10 N images
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.backbones import build_backbone
from bench.data.sources import Source
from bench.extract import EmbeddingCache, extract


class DecodedSource(Source):
    """Images already decoded and transformed: the pipeline's own overhead is all that is left."""

    def __init__(self, tensors: torch.Tensor, classes: int = 10) -> None:
        self.tensors = tensors
        super().__init__("decoded", "train", np.arange(len(tensors)) % classes, [str(c) for c in range(classes)])

    def load(self, index: int) -> torch.Tensor:
        return self.tensors[index]


def model_alone(model, x, precision, device, iters) -> float:
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for _ in range(2):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return iters * len(x) / (time.perf_counter() - start)


def throughput(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    bb = build_backbone(f"torchvision:{args.arch}", weights=None,
                        transform={"size": args.size, "channels": 3})
    model = bb.model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    a = model_alone(model, x, args.precision, device, args.iters)

    data = torch.randn(args.batch_size * args.iters, 3, args.size, args.size)
    src = DecodedSource(data)
    bb.transform = lambda t: t  # already decoded and transformed
    with tempfile.TemporaryDirectory() as tmp:
        kwargs = {"accelerator": device.type, "devices": 1, "precision": args.precision, "enable_progress_bar": False}
        start = time.perf_counter()
        extract(bb, src, EmbeddingCache(tmp), trainer_kwargs=kwargs, batch_size=args.batch_size,
                num_workers=args.workers, channels_last=args.channels_last, compile=args.compile)
        b = len(src) / (time.perf_counter() - start)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    out = {"arch": args.arch, "size": args.size, "precision": args.precision, "device": name,
           "batch_size": args.batch_size, "images": len(src), "model_alone_img_s": a, "pipeline_img_s": b,
           "ratio": b / a}
    print(f"{args.arch} {args.size}px {args.precision} on {name}, batch {args.batch_size}:")
    print(f"  (a) model alone     {a:9.1f} images/s")
    print(f"  (b) full pipeline   {b:9.1f} images/s   ({len(src)} images, Trainer.predict -> shards -> cache)")
    print(f"  ratio b/a           {b / a:9.2f}")
    return out


def _peak_rss_child(n: int, arch: str, size: int, shard: int) -> int:
    code = f"""
import tempfile, torch
from bench.backbones import build_backbone
from bench.data.sources import build_source
from bench.extract import EmbeddingCache, extract
torch.set_num_threads(2)
bb = build_backbone('torchvision:{arch}', weights=None, transform={{'size': {size}, 'channels': 3}})
with tempfile.TemporaryDirectory() as tmp:
    extract(bb, build_source('synthetic:{n}', size={size}), EmbeddingCache(tmp),
            trainer_kwargs={{'enable_progress_bar': False}}, batch_size=64, shard_size={shard})
print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])  # kB


def memory(args) -> dict:
    small = _peak_rss_child(args.memory_n, args.arch, args.size, args.shard_size)
    large = _peak_rss_child(10 * args.memory_n, args.arch, args.size, args.shard_size)
    print(f"peak RSS of extraction ({args.arch}, {args.size}px, shard size {args.shard_size}):")
    print(f"  {args.memory_n:7d} images: {small / 1024:8.1f} MiB")
    print(f"  {10 * args.memory_n:7d} images: {large / 1024:8.1f} MiB   (ratio {large / small:.3f})")
    return {"n": args.memory_n, "peak_kib_n": small, "peak_kib_10n": large, "ratio": large / small}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    ap.add_argument("--memory", action="store_true", help="measure peak memory at N and 10 N images instead")
    ap.add_argument("--memory-n", type=int, default=2000)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--out", default=None, help="write the figures as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 2)))
    result = memory(args) if args.memory else throughput(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
