"""Run configuration: YAML files under ``configs/`` plus ``key.sub=value`` overrides.

The defaults are the quickstart: the embedded tiny backbone on digits, base and novel classes.
Every key is declared here, so a typo is an error that names the key and lists the known ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.errors import BenchError
from bench.imprint.presets import PRESETS

# Every preset, plus a k-means grid: the quickstart's method grid.
QUICKSTART_METHODS = [*PRESETS, "l2/kmeans:k=[2,5,10]/l2/l2/max"]


@dataclass
class BackboneConfig:
    name: str = "tiny-digits"
    # torchvision/timm/hf: DEFAULT (the hub), a local file, or null (random); openclip: a tag
    weights: Any = None
    transform: dict | None = None  # override the backbone's transform (see backbones.transforms)
    pool: str | None = None  # timm: global_pool (avg, token, ...)
    pooling: str | None = None  # hf: cls or mean
    config: dict | None = None  # hf: a model config for random init without a network

    def options(self) -> dict[str, Any]:
        family = self.name.split(":", 1)[0]
        allowed = {"torchvision": {"weights"}, "timm": {"weights", "pool"}, "openclip": {"weights"},
                   "hf": {"weights", "pooling", "config"}}.get(family, set())
        opts: dict[str, Any] = {}
        for key in ("weights", "pool", "pooling", "config"):
            value = getattr(self, key)
            if key in allowed and (value is not None or key == "weights"):
                opts[key] = value
            elif value is not None:
                raise BenchError(f"backbone.{key} does not apply to {self.name}")
        if self.transform is not None:
            opts["transform"] = self.transform
        return opts


@dataclass
class DatasetConfig:
    name: str | None = None  # default: the task suite's dataset
    train_split: str = "train"
    test_split: str = "test"
    options: dict = field(default_factory=dict)  # e.g. image_key / label_key for hf datasets


@dataclass
class ExtractConfig:
    batch_size: int = 256
    num_workers: Any = "auto"  # or an int; see workers_for
    dtype: str = "float32"
    skip_corrupt: bool = False
    rebuild: bool = False
    shard_size: int = 65536


def workers_for(num_workers: Any, accelerator: str, devices: Any) -> int:
    """DataLoader workers per process. ``auto``: none on the CPU, where workers would compete
    with the model for the same cores; on accelerators, the CPUs per device minus one, at most 8."""
    if num_workers != "auto":
        if not isinstance(num_workers, int) or num_workers < 0:
            raise BenchError(f"extract.num_workers must be 'auto' or an int >= 0, got {num_workers!r}")
        return num_workers
    if accelerator == "cpu":
        return 0
    import os

    per_device = (os.cpu_count() or 2) // max(int(devices) if str(devices).isdigit() else 1, 1)
    return max(0, min(8, per_device - 1))


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"

    def kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto (online only with credentials) | offline | online | disabled
    project: str = "bench"
    entity: str | None = None


@dataclass
class DiagnoseConfig:
    backbones: list = field(default_factory=list)  # names or backbone sections; empty: `backbone`
    methods: list = field(default_factory=lambda: ["qi2018", "l2/kmeans:k=5/l2/l2/max"])
    gc_samples: int = 256
    gc_probes: int = 16
    pool_split: str | None = None  # default: the test split when the task has one

    def backbone_configs(self, default: BackboneConfig) -> list[BackboneConfig]:
        if not self.backbones:
            return [default]
        out = []
        for item in self.backbones:
            out.append(_build(BackboneConfig, {"name": item} if isinstance(item, str) else item,
                              "diagnose.backbones"))
        return out


@dataclass
class RunConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    task: str = "digits-base-novel"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    methods: list = field(default_factory=lambda: list(QUICKSTART_METHODS))
    center: str | None = None  # center-l2 reference: null (support mean) or a class subset, e.g. base
    name: str | None = None
    cache_dir: str = ".cache/bench"
    out_dir: str = "runs"
    batch_size: int = 4096
    save_heads: bool = False
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    diagnose: DiagnoseConfig = field(default_factory=DiagnoseConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise BenchError(f"config section '{where or 'root'}' must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        prefix = f"{where}." if where else ""
        raise BenchError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; known keys in "
            f"'{where or 'root'}': {sorted(known)}"
        )
    kwargs = {}
    for key, value in data.items():
        ftype = known[key].default_factory if known[key].default_factory is not dataclasses.MISSING else None
        if ftype is not None and dataclasses.is_dataclass(ftype):
            kwargs[key] = _build(ftype, value or {}, f"{where}.{key}" if where else key)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = data
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise BenchError(f"cannot set '{dotted}': '{p}' is not a section")
    cur[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file, then ``key.sub=value`` overrides (values parsed as YAML)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise BenchError(f"config file {p} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise BenchError(f"config file {p} must hold a YAML mapping")
        data = loaded
    for item in overrides or []:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise BenchError(f"override '{item}' must look like key=value, e.g. trainer.devices=2")
        _set_path(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    cfg = _build(RunConfig, data, "")
    if isinstance(cfg.methods, str):
        cfg.methods = [cfg.methods]
    return cfg
