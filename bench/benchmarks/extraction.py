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
    python scripts/bench_extract.py --hashing                         # content hashing against decoding

--hashing writes an image folder and reads it (from the page cache) three ways: decoding every
image with PIL, as extraction does; hashing every file for the cache key, as a first run does;
and a re-run's memo lookups. It prints each in images/s and MB/s with its ratio to decoding.
"""

from __future__ import annotations

import argparse
import json
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
from bench.runtime import configure_threads


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
from bench.runtime import configure_threads
configure_threads()
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


def _write_jpeg_folder(root: Path, n: int, size: int, classes: int = 10) -> list[Path]:
    """Photo-like JPEGs: smooth colour fields plus grain, so they compress like photographs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(img, dtype=np.int16) + rng.integers(-12, 12, (size, size, 3))
        folder = root / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        files.append(folder / f"{i:06d}.jpg")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(files[-1], quality=90)
    return files


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def hashing(args) -> dict:
    import hashlib

    import xxhash

    from bench.data.sources import build_source
    from bench.data import hashing as digests

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        files = _write_jpeg_folder(root, args.hash_images, args.hash_size)
        src = build_source(f"imagefolder:{root}")
        nbytes = sum(f.stat().st_size for f in files)
        for f in files:  # every variant below reads from the page cache, as a re-read would
            f.read_bytes()

        def decode():
            for i in range(len(src)):
                src.load(i).convert("RGB")

        def hash_all(factory):
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            for f in files:
                h = factory()
                with open(f, "rb", buffering=0) as fh:
                    while n := fh.readinto(buf):
                        h.update(view[:n])
                h.hexdigest()

        memo = Path(tmp) / "memo.sqlite"
        time.sleep(digests.SETTLE_NS / 1e9)  # files this fresh are never memoised
        digests.files_digest(files, root, memo=memo)  # fills the memo
        stats = digests.HashStats()
        digests.files_digest(files, root, memo=memo, stats=stats)
        assert stats.hashed == 0, "the memo should answer a re-run without reading any file"
        threads = digests.THREADS
        rows = {
            "decode (PIL, 1 thread)": _best(decode, args.repeats),
            "read + xxh3_128, 1 thread": _best(lambda: hash_all(xxhash.xxh3_128), args.repeats),
            "read + blake2b, 1 thread": _best(lambda: hash_all(hashlib.blake2b), args.repeats),
            "cache key, 1 thread (first run)": _best(
                lambda: digests.files_digest(files, root, memo=None, threads=1), args.repeats),
            f"cache key, {threads} threads (first run)": _best(
                lambda: digests.files_digest(files, root, memo=None), args.repeats),
            "cache key from the memo (re-run)": _best(
                lambda: digests.files_digest(files, root, memo=memo), args.repeats),
        }
    base = rows["decode (PIL, 1 thread)"]
    n = len(files)
    print(f"{n} JPEG images of {args.hash_size} px, {nbytes / n / 1024:.1f} KiB each on average, from the page "
          f"cache; best of {args.repeats}:")
    print(f"  {'':38s} {'images/s':>10s} {'MB/s':>9s} {'x decode':>9s}")
    for name, sec in rows.items():
        print(f"  {name:38s} {n / sec:10.0f} {nbytes / sec / 1e6:9.1f} {base / sec:9.1f}")
    return {"images": n, "size": args.hash_size, "bytes": nbytes, "repeats": args.repeats,
            "seconds": rows, "images_per_s": {k: n / v for k, v in rows.items()},
            "ratio_to_decode": {k: base / v for k, v in rows.items()}}


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
    ap.add_argument("--hashing", action="store_true", help="measure content hashing against decoding instead")
    ap.add_argument("--hash-images", type=int, default=2000)
    ap.add_argument("--hash-size", type=int, default=256, help="image side in pixels for --hashing")
    ap.add_argument("--repeats", type=int, default=3, help="--hashing keeps the best of this many runs")
    ap.add_argument("--out", default=None, help="write the figures as JSON")
    args = ap.parse_args(argv)
    configure_threads()  # the CPUs' share, or BENCH_THREADS / OMP_NUM_THREADS when set
    result = memory(args) if args.memory else hashing(args) if args.hashing else throughput(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
