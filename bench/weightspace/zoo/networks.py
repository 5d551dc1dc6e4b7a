"""The network zoo: hundreds of small networks of mixed architectures trained on digits.

``plan_zoo`` draws each member's architecture and training recipe from (seed, index), so a
zoo is a deterministic list; ``build_zoo`` trains the members whose file is missing (Lightning,
one small Trainer per network, several worker processes) and writes each as
``networks/<key>.safetensors``: the state dict, with the architecture, the recipe and the
measured accuracies as JSON in the header. ``key`` is a hash of architecture + recipe, so the
zoo is content-addressed and resumable: a re-run, or a bigger ``count``, trains only what is
missing. Files are written under a temporary name and renamed, so an interrupted build never
leaves a file that reads as complete. ``NetworkZoo`` reads a zoo back.

Datasets (all offline): ``digits`` (scikit-learn's 8x8 digits, the fixed train/test split of
``bench.data``) and ``digits-permuted`` (the same images with one fixed pixel permutation: a
second dataset with the same shapes, for the cross-dataset split).
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

import lightning as L
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bench.errors import BenchError
from bench.runtime import atomic_path, configure_threads, quiet_lightning, write_json_atomic, write_text_atomic
from bench.weightspace.zoo.architectures import Layer, NetSpec, build_network, network_layers

RECIPE_VERSION = 1  # part of every key: bump it when training changes the numbers
FIXED_SPEC = NetSpec(kind="conv", depth=2, width=16, kernel=3, batchnorm=False)
PIXEL_MEAN, PIXEL_STD = 0.3, 0.4
DATASETS = ("digits", "digits-permuted")


@dataclass(frozen=True)
class TrainRecipe:
    dataset: str = "digits"
    optimizer: str = "sgd"  # sgd (momentum 0.9) | adam
    lr: float = 0.05
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 5
    label_noise: float = 0.0  # fraction of training labels replaced by a wrong label
    seed: int = 0  # initialisation, batch order and label noise

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise BenchError(f"zoo dataset '{self.dataset}' is not one of {DATASETS}")
        if self.optimizer not in ("sgd", "adam"):
            raise BenchError(f"optimizer '{self.optimizer}' is not one of sgd, adam")
        if not 0.0 <= self.label_noise < 1.0:
            raise BenchError(f"label_noise must be in [0, 1), got {self.label_noise}")


@dataclass(frozen=True)
class ZooMember:
    spec: NetSpec
    recipe: TrainRecipe

    @property
    def key(self) -> str:
        text = json.dumps({"recipe_version": RECIPE_VERSION, "spec": self.spec.to_dict(),
                           "train": asdict(self.recipe)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class ZooRecord:
    """One trained network of a zoo: where it is and what it scored."""

    key: str
    path: Path
    spec: NetSpec
    recipe: TrainRecipe
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def fixed_arch(self) -> bool:
        return self.spec == FIXED_SPEC

    def state(self) -> dict[str, torch.Tensor]:
        with safe_open(str(self.path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def layers(self) -> list[Layer]:
        return network_layers(self.spec, self.state())

    def row(self) -> dict[str, Any]:
        return {"key": self.key, "family": self.spec.family, "fixed_arch": self.fixed_arch,
                **{f"arch.{k}": v for k, v in self.spec.to_dict().items()},
                **{f"train.{k}": v for k, v in asdict(self.recipe).items()}, **self.metrics}


# -- data -------------------------------------------------------------------------------------

@lru_cache(maxsize=4)
def zoo_data(dataset: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): standardised (N, 1, 8, 8) images and labels."""
    from bench.data.sources import build_source

    if dataset not in DATASETS:
        raise BenchError(f"zoo dataset '{dataset}' is not one of {DATASETS}")
    out = []
    for split in ("train", "test"):
        src = build_source("digits", split)
        x = torch.from_numpy(np.stack([np.asarray(src.load(i)) for i in range(len(src))])).float()
        x = x.div(255).sub(PIXEL_MEAN).div(PIXEL_STD)
        if dataset == "digits-permuted":
            perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
            x = x.reshape(len(x), 64)[:, perm].reshape(len(x), 8, 8)
        out += [x[:, None].contiguous(), torch.from_numpy(np.asarray(src.labels)).long()]
    return tuple(out)


def noisy_labels(y: torch.Tensor, fraction: float, seed: int, num_classes: int = 10) -> torch.Tensor:
    """A copy of y where round(fraction * N) labels, chosen by seed, are moved to a wrong class."""
    g = torch.Generator().manual_seed(seed + 7919)
    n = int(round(fraction * len(y)))
    idx = torch.randperm(len(y), generator=g)[:n]
    out = y.clone()
    out[idx] = (y[idx] + torch.randint(1, num_classes, (n,), generator=g)) % num_classes
    return out


# -- sampling ---------------------------------------------------------------------------------

def sample_member(seed: int, index: int, dataset: str = "digits", fixed_fraction: float = 1 / 3) -> ZooMember:
    """Member ``index`` of the zoo drawn with ``seed``; the same (seed, index) gives the same member."""
    rng = np.random.default_rng([seed, index])
    if rng.random() < fixed_fraction:
        spec = FIXED_SPEC
    elif rng.random() < 0.7:
        spec = NetSpec("conv", int(rng.choice([2, 3, 4])), int(rng.choice([8, 16, 32, 64])),
                       int(rng.choice([3, 5])), bool(rng.random() < 0.5))
    else:
        spec = NetSpec("mlp", int(rng.choice([1, 2, 3])), int(rng.choice([8, 16, 32, 64])), 3,
                       bool(rng.random() < 0.5))
    optimizer = "sgd" if rng.random() < 0.5 else "adam"
    lo, hi = (3e-3, 0.3) if optimizer == "sgd" else (3e-4, 3e-2)
    recipe = TrainRecipe(
        dataset=dataset, optimizer=optimizer,
        lr=float(f"{np.exp(rng.uniform(np.log(lo), np.log(hi))):.3g}"),
        weight_decay=float(rng.choice([0.0, 1e-4, 1e-3, 1e-2])),
        batch_size=int(rng.choice([32, 64, 128])),
        epochs=int(rng.choice([1, 2, 5, 10, 20])),
        label_noise=float(rng.choice([0.0, 0.0, 0.1, 0.3, 0.5, 0.7])),
        seed=int(rng.integers(0, 2**31 - 1)),
    )
    return ZooMember(spec, recipe)


def plan_zoo(count: int, seed: int = 0, dataset: str = "digits", fixed_fraction: float = 1 / 3) -> list[ZooMember]:
    if count < 1:
        raise BenchError(f"zoo count must be >= 1, got {count}")
    if not 0.0 <= fixed_fraction <= 1.0:
        raise BenchError(f"fixed_fraction must be in [0, 1], got {fixed_fraction}")
    return [sample_member(seed, i, dataset, fixed_fraction) for i in range(count)]


# -- training (Lightning) ---------------------------------------------------------------------

class ZooNetModule(L.LightningModule):
    """One zoo network trained with its recipe's optimiser (SGD with momentum 0.9, or Adam) on
    cross-entropy."""

    def __init__(self, spec: NetSpec, recipe: TrainRecipe) -> None:
        super().__init__()
        self.net = build_network(spec)
        self.recipe = recipe

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        r = self.recipe
        if r.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=r.lr, momentum=0.9, weight_decay=r.weight_decay)
        return torch.optim.Adam(self.parameters(), lr=r.lr, weight_decay=r.weight_decay)


class ZooDataModule(L.LightningDataModule):
    """A zoo network's (noisy) training split, shuffled by the recipe's seed."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
        super().__init__()
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed

    def train_dataloader(self):
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=True,
            generator=torch.Generator().manual_seed(self.seed))


@torch.no_grad()
def _accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((net(x).argmax(1) == y).float().mean())


def train_member(member: ZooMember) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train one member; returns its state dict and metrics (accuracies, gap, seconds)."""
    quiet_lightning()
    start = time.perf_counter()
    r = member.recipe
    x_tr, y_tr, x_te, y_te = zoo_data(r.dataset)
    y_noisy = noisy_labels(y_tr, r.label_noise, r.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r.seed)
        module = ZooNetModule(member.spec, r)
    trainer = L.Trainer(max_epochs=r.epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(module, datamodule=ZooDataModule(x_tr, y_noisy, r.batch_size, r.seed))
    net = module.net.eval()
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    finite = all(bool(torch.isfinite(v).all()) for v in state.values())
    test_acc = _accuracy(net, x_te, y_te) if finite else float("nan")
    train_acc = _accuracy(net, x_tr, y_noisy) if finite else float("nan")
    metrics = {
        "test_acc": test_acc, "train_acc": train_acc, "gap": train_acc - test_acc,
        "train_acc_clean": _accuracy(net, x_tr, y_tr) if finite else float("nan"),
        "diverged": not finite, "num_params": sum(v.numel() for k, v in state.items() if "running" not in k),
        "train_seconds": time.perf_counter() - start,
    }
    return state, metrics


def save_member(path: Path, member: ZooMember, state: dict[str, torch.Tensor], metrics: dict[str, Any]) -> None:
    header = {"spec": json.dumps(member.spec.to_dict(), sort_keys=True),
              "train": json.dumps(asdict(member.recipe), sort_keys=True),
              "metrics": json.dumps(metrics, sort_keys=True), "recipe_version": str(RECIPE_VERSION)}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=header)


def _train_and_save(member: ZooMember, path: Path) -> dict[str, Any]:
    state, metrics = train_member(member)
    save_member(path, member, state, metrics)
    return metrics


def _init_worker(workers: int) -> None:
    configure_threads(workers)
    quiet_lightning()


def build_zoo(
    out: str | Path,
    members: list[ZooMember],
    workers: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every member whose file is missing; returns a summary (counts, seconds per network)."""
    from tqdm import tqdm

    out = Path(out)
    datasets = sorted({m.recipe.dataset for m in members})
    record = out / "zoo.json"
    if record.is_file():
        before = json.loads(record.read_text()).get("datasets", [])
        if before != datasets:
            raise BenchError(f"zoo {out} holds networks trained on {before}, not {datasets}; "
                             "build each dataset's zoo in its own folder")
    (out / "networks").mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, {"datasets": datasets, "recipe_version": RECIPE_VERSION})
    todo = [m for m in dict.fromkeys(members) if not (out / "networks" / f"{m.key}.safetensors").exists()]
    log(f"zoo {out}: {len(members)} networks planned, {len(members) - len(todo)} already built, "
        f"{len(todo)} to train on {workers} process(es)")
    start = time.perf_counter()
    seconds: list[float] = []
    bar = tqdm(total=len(todo), unit="net", desc="train zoo", disable=not todo)

    def report(member: ZooMember, metrics: dict[str, Any]) -> None:
        seconds.append(metrics["train_seconds"])
        r = member.recipe
        bar.update(1)
        bar.write(f"[{len(seconds):4d}/{len(todo)}] {member.key} {str(member.spec):22s} {r.optimizer:4s} "
                  f"lr={r.lr:<7g} ep={r.epochs:<2d} bs={r.batch_size:<3d} noise={r.label_noise:.1f} "
                  f"test={metrics['test_acc']:.3f} train={metrics['train_acc']:.3f} "
                  f"{metrics['train_seconds']:.2f}s/net")

    paths = [out / "networks" / f"{m.key}.safetensors" for m in todo]
    if workers <= 1 or len(todo) <= 1:
        quiet_lightning()
        for m, p in zip(todo, paths):
            report(m, _train_and_save(m, p))
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                 initargs=(workers,)) as pool:
            futures = {pool.submit(_train_and_save, m, p): m for m, p in zip(todo, paths)}
            from concurrent.futures import as_completed

            for fut in as_completed(futures):
                report(futures[fut], fut.result())
    bar.close()
    wall = time.perf_counter() - start
    zoo = NetworkZoo.load(out, include_diverged=True)
    zoo.write_index()
    summary = {
        "networks": len(zoo), "trained_now": len(todo), "wall_seconds": wall, "workers": workers,
        "seconds_per_network_mean": float(np.mean(seconds)) if seconds else 0.0,
        "seconds_per_network_max": float(np.max(seconds)) if seconds else 0.0,
        "wall_seconds_per_network": wall / len(todo) if todo else 0.0,
    }
    write_json_atomic(out / "build.json", summary)
    return summary


# -- reading ----------------------------------------------------------------------------------

class NetworkZoo:
    """The networks of a zoo folder, read from their safetensors headers."""

    def __init__(self, root: Path, records: list[ZooRecord]) -> None:
        self.root = root
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __getitem__(self, i: int) -> ZooRecord:
        return self.records[i]

    @classmethod
    def load(cls, root: str | Path, include_diverged: bool = False) -> NetworkZoo:
        root = Path(root)
        folder = root / "networks"
        if not folder.is_dir():
            raise BenchError(f"{root} is not a network zoo (no networks/ folder); build one with "
                             f"`bench zoo build --out {root}`")
        records = []
        for path in sorted(folder.glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                spec = NetSpec.from_dict(json.loads(meta["spec"]))
                recipe = TrainRecipe(**json.loads(meta["train"]))
                metrics = json.loads(meta["metrics"])
            except (KeyError, ValueError, OSError, Exception) as err:  # safetensors has its own errors
                raise BenchError(f"cannot read zoo network {path}: {err}; delete it and rebuild the zoo") from err
            rec = ZooRecord(path.stem, path, spec, recipe, metrics)
            if include_diverged or not metrics.get("diverged", False):
                records.append(rec)
        if not records:
            raise BenchError(f"zoo {root} holds no trained networks; build it with `bench zoo build --out {root}`")
        return cls(root, records)

    def subset(self, keep: Iterable[bool]) -> NetworkZoo:
        return NetworkZoo(self.root, [r for r, k in zip(self.records, keep) if k])

    def targets(self, name: str = "test_acc") -> torch.Tensor:
        return torch.tensor([float(r.metrics[name]) for r in self.records])

    def families(self) -> list[str]:
        return [r.spec.family for r in self.records]

    def write_index(self) -> Path:
        """index.csv: one row per network (architecture, recipe, accuracies), for people and pandas."""
        rows = [r.row() for r in self.records]
        cols = list(dict.fromkeys(c for r in rows for c in r))
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
        path = self.root / "index.csv"
        write_text_atomic(path, buf.getvalue())
        return path

    def describe(self) -> str:
        acc = self.targets().numpy()
        fams: dict[str, int] = {}
        for f in self.families():
            fams[f] = fams.get(f, 0) + 1
        q = np.quantile(acc, [0, 0.25, 0.5, 0.75, 1])
        return (f"{len(self)} networks in {self.root} ({sum(r.fixed_arch for r in self)} of the fixed architecture "
                f"{FIXED_SPEC})\nfamilies: " + ", ".join(f"{k} {v}" for k, v in sorted(fams.items())) +
                "\ntest accuracy quantiles (0, .25, .5, .75, 1): " + " ".join(f"{v:.3f}" for v in q))
