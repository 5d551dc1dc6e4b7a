"""Rebuild the embedded default backbone, bench/assets/tiny_digits.safetensors.

A TinyCNN is trained with a temporary linear classifier on scikit-learn's digits, train split,
classes 0-4 only; the classifier is then dropped. Everything is seeded and runs on one CPU
thread with deterministic algorithms, so the same torch version on the same kind of CPU rebuilds
the file bit for bit. Other versions (or CPU kernels) round differently, and thirty epochs of SGD
carry that into the weights, so the asset records the torch version and CPU capability that made
it (tests compare bits only when both match, and predictions otherwise):

    python scripts/build_tiny_backbone.py                 # overwrite the shipped asset
    python scripts/build_tiny_backbone.py --out /tmp/t.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.backbones import save_checkpoint, tiny_asset_path
from bench.backbones.tiny import TinyCNN
from bench.data.sources import DigitsSource

BASE_CLASSES = [0, 1, 2, 3, 4]
MEAN, STD = 0.3, 0.4  # of digits pixels scaled to [0, 1]
TRANSFORM = {"size": 8, "channels": 1, "mean": [MEAN], "std": [STD]}


def train(epochs: int = 30, width: int = 16, seed: int = 0, weight_decay: float = 5e-4,
          lr: float = 0.05, batch_size: int = 64) -> TinyCNN:
    torch.manual_seed(seed)
    src = DigitsSource("train")
    keep = np.isin(src.labels, BASE_CLASSES)
    x = torch.from_numpy(src.images[keep]).float().div(255).sub(MEAN).div(STD)[:, None]
    y = torch.from_numpy(src.labels[keep])
    model = TinyCNN(width)
    clf = nn.Linear(model.dim, len(BASE_CLASSES))
    params = list(model.parameters()) + list(clf.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), batch_size):
            idx = perm[start:start + batch_size]
            loss = nn.functional.cross_entropy(clf(model(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def build_environment() -> dict[str, str]:
    """What decides the asset's bits besides this script: the torch build and its CPU kernels, and
    the libraries that make its training images (digits from scikit-learn, decoded and resized by
    Pillow and torchvision). A rebuild is bit for bit only where all of them match."""
    import PIL
    import sklearn
    import torchvision

    return {"torch_version": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torchvision_version": torchvision.__version__, "pillow_version": PIL.__version__,
            "numpy_version": np.__version__, "sklearn_version": sklearn.__version__}


def build(out: Path, **kwargs) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        model = train(**kwargs)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_checkpoint(model, tmp, arch="tiny-cnn", transform=TRANSFORM, width=model.width,
                    in_channels=1, layer="global-avg-pool", trained_on="digits train, classes 0-4",
                    **build_environment())
    tmp.replace(out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=tiny_asset_path())
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args(argv)
    path = build(args.out, epochs=args.epochs)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
