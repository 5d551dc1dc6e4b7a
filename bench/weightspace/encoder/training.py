"""Training SNE with Lightning, predicting with it, and its checkpoint (safetensors + JSON).

``SNEPredictor(EncoderFitConfig(...)).fit(items, accuracies)`` trains an :class:`SNERegressor`
(LightningModule) on a :class:`WeightSetDataModule` (LightningDataModule): items are networks
(lists of ``Layer``) or heads (``HeadWeights``), chunked once up front. The loss is the mean
squared error on standardised targets plus ``invariance`` times the logit-invariance loss on a
freshly permuted copy of each network in the batch. With ``augment`` > 0, each training network
is, with that probability, replaced by a freshly permuted copy each time it is drawn: the
regression loss then sees many orderings of the same function, which the regulariser alone (one
pair per step) does not teach as well. ``save(dir)`` writes ``model.safetensors`` and
``config.json`` (architecture, training settings, target scaling, the weights' sha256);
``SNEPredictor.load(dir)`` refuses a folder whose weights do not match its config.

``fit_encoder(config)`` is ``bench weights fit``: it reads the config's zoo or heads, fits, and
writes the checkpoint with the resolved config as ``config.yaml`` beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch

from bench.config import WandbConfig
from bench.errors import BenchError
from bench.extract.cache import file_sha256
from bench.runtime import atomic_path, deterministic_ops, finish_wandb, quiet_lightning, wandb_logger, write_json_atomic
from bench.weightspace.commands import check_config, save_fit_config
from bench.weightspace.encoder.chunking import chunk_head, chunk_network, collate_heads, collate_networks
from bench.weightspace.encoder.config import EncoderFitConfig
from bench.weightspace.encoder.sne import SNE, SNEConfig, logit_invariance_loss
from bench.weightspace.zoo.architectures import Layer, permute_hidden_units
from bench.weightspace.zoo.heads import HeadWeights

CHECKPOINT_FORMAT = "bench-sne/1"
HEAD_ELEMENT_DIM = 16


def default_name(fit: EncoderFitConfig) -> str:
    """``sne``, ``sne+li10`` (regulariser strength), ``sne+li10+aug0.5`` (augmentation)."""
    name = "sne" + (f"+li{fit.invariance:g}" if fit.invariance > 0 else "")
    return name + (f"+aug{fit.augment:g}" if fit.augment > 0 else "")


def parse_variant(name: str) -> dict[str, float]:
    """The inverse of :func:`default_name`: ``sne+li100+aug1`` -> {invariance: 100, augment: 1}."""
    error = BenchError(f"SNE variant {name!r} is not sne[+liSTRENGTH][+augPROBABILITY], "
                       "e.g. sne, sne+li10, sne+aug1, sne+li100+aug1")
    head, *parts = name.split("+")
    if head != "sne":
        raise error
    keys = {"li": "invariance", "aug": "augment"}
    options: dict[str, float] = {}
    for part in parts:
        prefix = next((k for k in keys if part.startswith(k)), None)
        if prefix is None or keys[prefix] in options:
            raise error
        try:
            options[keys[prefix]] = float(part[len(prefix):])
        except ValueError:
            raise error from None
    return options


def item_kind(items: Sequence) -> str:
    kinds = {"head" if isinstance(it, HeadWeights) else "network" for it in items}
    if len(kinds) != 1:
        raise BenchError("SNE reads either networks or heads in one call, not a mix" if kinds
                         else "no networks or heads were given")
    return kinds.pop()


def chunk_items(items: Sequence, element_dim: int) -> list:
    if item_kind(items) == "head":
        return [chunk_head(h.proxies, h.proxy_labels, h.classes, element_dim) for h in items]
    return [chunk_network(layers, element_dim) for layers in items]


def collate(kind: str, chunks: list):
    return collate_heads(chunks) if kind == "head" else collate_networks(chunks)


class WeightSetDataModule(L.LightningDataModule):
    """Chunked items and their standardised targets; for networks, also their layers, which the
    invariance loss permutes and augmentation swaps for permuted copies (``augment``: the
    probability per draw)."""

    def __init__(self, kind: str, chunks: list, targets: torch.Tensor, raw: list | None,
                 batch_size: int, seed: int, augment: float = 0.0, element_dim: int = 0) -> None:
        super().__init__()
        self.kind, self.chunks, self.targets, self.raw = kind, chunks, targets, raw
        self.batch_size, self.seed = batch_size, seed
        self.augment, self.element_dim = augment, element_dim
        self.augment_generator = torch.Generator().manual_seed(seed + 2)

    def _collate(self, idx: list[int]):
        raw = [self.raw[i] for i in idx] if self.raw is not None else None
        chunks = [self.chunks[i] for i in idx]
        if self.augment > 0 and raw is not None:
            g = self.augment_generator
            draws = torch.rand(len(idx), generator=g).tolist()
            for k, u in enumerate(draws):
                if u < self.augment:  # the same function, its hidden units in a new order
                    raw[k] = permute_hidden_units(raw[k], g)
                    chunks[k] = chunk_network(raw[k], self.element_dim)
        return collate(self.kind, chunks), self.targets[idx], raw

    def train_dataloader(self):
        return torch.utils.data.DataLoader(
            list(range(len(self.chunks))), batch_size=self.batch_size, shuffle=True,
            collate_fn=self._collate, generator=torch.Generator().manual_seed(self.seed))


class SNERegressor(L.LightningModule):
    """SNE with a regression loss on standardised accuracy, plus the logit-invariance loss on
    permuted copies when ``invariance`` > 0; AdamW with a cosine schedule over the epochs.
    ``model`` and ``fit`` are the dumps of an :class:`SNEConfig` and an :class:`EncoderFitConfig`."""

    def __init__(self, model: dict, fit: dict, target_mean: float, target_std: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = SNE(SNEConfig(**model))
        self.fit_cfg = EncoderFitConfig.model_validate(fit)
        self.perm_generator = torch.Generator().manual_seed(self.fit_cfg.seed + 1)

    def predict_networks(self, networks: list[list[Layer]]) -> torch.Tensor:
        chunks = [chunk_network(layers, self.model.cfg.element_dim) for layers in networks]
        return self.model(collate_networks(chunks).to(self.device))

    def training_step(self, batch, _):
        sets, y, raw = batch
        pred = self.model(sets)
        loss = torch.nn.functional.mse_loss(pred, y)
        self.log("train/mse", loss, prog_bar=True, batch_size=len(y))
        lam = self.fit_cfg.invariance
        if lam > 0 and raw is not None:
            inv = logit_invariance_loss(self.predict_networks, raw, self.perm_generator, reference=pred)
            self.log("train/logit_invariance", inv, prog_bar=True, batch_size=len(y))
            loss = loss + lam * inv
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.fit_cfg.lr, weight_decay=self.fit_cfg.weight_decay)
        return {"optimizer": opt,
                "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.fit_cfg.epochs)}


class SNEPredictor:
    """Fit SNE on items and accuracies; predict accuracies of new items; save and load."""

    def __init__(self, config: EncoderFitConfig | None = None, name: str | None = None) -> None:
        self.fit_cfg = config or EncoderFitConfig()
        self.model_cfg = self.fit_cfg.model
        self.name = name or default_name(self.fit_cfg)
        self.model: SNE | None = None
        self.target_mean, self.target_std = 0.0, 1.0
        self.info: dict[str, Any] = {}

    def fit(self, items: Sequence, y, wandb: WandbConfig | None = None, log_dir: str | Path = "runs/weights",
            progress: bool = True, run_name: str | None = None) -> SNEPredictor:
        """Fit on ``items`` and their accuracies ``y``; ``wandb`` (None: no run) logs the losses."""
        quiet_lightning()
        kind = item_kind(items)
        if kind != self.model_cfg.kind:
            element_dim = HEAD_ELEMENT_DIM if kind == "head" else self.model_cfg.element_dim
            self.model_cfg = SNEConfig(**{**self.model_cfg.to_dict(), "kind": kind, "element_dim": element_dim})
        if kind == "head" and (self.fit_cfg.invariance > 0 or self.fit_cfg.augment > 0):
            raise BenchError("--invariance and --augment permute a network's hidden units; a head's encoding is "
                             "already invariant to class and proxy order by construction: use 0 for heads")
        y = torch.as_tensor(np.asarray(y, dtype=np.float32))
        if len(y) != len(items) or len(items) < 2:
            raise BenchError(f"SNE needs at least 2 items with one target each, got {len(items)} items "
                             f"and {len(y)} targets")
        self.target_mean, self.target_std = float(y.mean()), float(y.std().clamp_min(1e-6))
        chunks = chunk_items(items, self.model_cfg.element_dim)
        wants_raw = self.fit_cfg.invariance > 0 or self.fit_cfg.augment > 0
        raw = list(items) if kind == "network" and wants_raw else None
        dm = WeightSetDataModule(kind, chunks, (y - self.target_mean) / self.target_std, raw, self.fit_cfg.batch_size,
                                 self.fit_cfg.seed, self.fit_cfg.augment, self.model_cfg.element_dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.fit_cfg.seed)
            module = SNERegressor(self.model_cfg.to_dict(), self.fit_cfg.to_dict(), self.target_mean, self.target_std)
        module.model.set_value_scale(collate(kind, chunks))
        config = {"model": self.model_cfg.to_dict(), "fit": self.fit_cfg.to_dict(), "items": len(items)}
        wandb = wandb or WandbConfig(mode="disabled")
        logger = wandb_logger(wandb.mode, Path(log_dir), run_name or self.name, config, project=wandb.project,
                              entity=wandb.entity, job_type="weights-fit")
        trainer = L.Trainer(max_epochs=self.fit_cfg.epochs, accelerator="cpu", devices=1, logger=logger or False,
                            enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
                            gradient_clip_val=1.0, log_every_n_steps=5, num_sanity_val_steps=0)
        with deterministic_ops():
            trainer.fit(module, datamodule=dm)
        self.info = {"wandb": finish_wandb(logger), "items": len(items),
                     "final_loss": float(trainer.callback_metrics.get("train/mse", float("nan")))}
        self.model = module.model.eval()
        return self

    @torch.no_grad()
    def predict(self, items: Sequence, batch_size: int = 64) -> np.ndarray:
        if self.model is None:
            raise BenchError("SNE predict before fit or load")
        if item_kind(items) != self.model_cfg.kind:
            raise BenchError(f"this SNE was trained on {self.model_cfg.kind}s and cannot read {item_kind(items)}s")
        self.model.eval()
        out = []
        with deterministic_ops():
            for start in range(0, len(items), batch_size):
                chunks = chunk_items(items[start:start + batch_size], self.model_cfg.element_dim)
                out.append(self.model(collate(self.model_cfg.kind, chunks)))
        return (torch.cat(out) * self.target_std + self.target_mean).double().numpy()

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
        from safetensors.torch import save_file

        if self.model is None:
            raise BenchError("nothing to save: fit SNE first")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = folder / "model.safetensors"
        with atomic_path(weights) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}, str(tmp))
        write_json_atomic(folder / "config.json", {
            "format": CHECKPOINT_FORMAT, "name": self.name, "model": self.model_cfg.to_dict(),
            "fit": self.fit_cfg.to_dict(), "target_mean": self.target_mean, "target_std": self.target_std,
            "weights_sha256": file_sha256(weights), "info": self.info, **(extra or {}),
        })
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> SNEPredictor:
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg_path, weights = folder / "config.json", folder / "model.safetensors"
        if not cfg_path.is_file() or not weights.is_file():
            raise BenchError(f"{folder} is not an SNE checkpoint (needs config.json and model.safetensors); "
                             "make one with `bench weights fit`")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("format") != CHECKPOINT_FORMAT:
            raise BenchError(f"{cfg_path} has format {cfg.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        if file_sha256(weights) != cfg["weights_sha256"]:
            raise BenchError(f"{weights} does not match {cfg_path} (sha256 differs); the checkpoint was "
                             "overwritten or cut short; refit it")
        fit = check_config(EncoderFitConfig, {k: v for k, v in cfg["fit"].items() if k != "model"})
        out = cls(fit.model_copy(update={"model": SNEConfig(**cfg["model"])}), cfg.get("name"))
        out.target_mean, out.target_std, out.info = cfg["target_mean"], cfg["target_std"], cfg.get("info", {})
        out.model = SNE(out.model_cfg)
        out.model.load_state_dict(load_file(str(weights)))
        out.model.eval()
        return out


def load_items(zoo: str | Path | None, heads: Sequence[str | Path] = (), families: Sequence[str] = ()
               ) -> tuple[list, np.ndarray, list[str]]:
    """(items, true accuracies, ids) of a network zoo (only ``families`` if given) or of the heads
    saved in run folders."""
    if (zoo is None) == (not heads):
        raise BenchError("give exactly one of zoo=DIR (--zoo) or heads=[RUN_DIR, ...] (--heads)")
    if zoo is not None:
        from bench.weightspace.zoo.networks import NetworkZoo

        networks = NetworkZoo.load(zoo)
        if families:
            unknown = set(families) - set(networks.families())
            if unknown:
                raise BenchError(f"families {sorted(unknown)} are not in {zoo}; it has "
                                 f"{sorted(set(networks.families()))}")
            networks = networks.subset([f in families for f in networks.families()])
        return [r.layers() for r in networks], networks.targets().numpy(), [r.key for r in networks]
    if families:
        raise BenchError("families applies to network zoos, not heads")
    from bench.weightspace.zoo.heads import HeadZoo

    saved = HeadZoo.load(heads)
    ids = [f"{r.run}/{'/'.join(map(str, r.episode[3:]))}/{r.method}" for r in saved]
    return [r.weights() for r in saved], saved.targets().numpy(), ids


def fit_encoder(config: EncoderFitConfig) -> tuple[SNEPredictor, list, np.ndarray]:
    """``bench weights fit``: fit SNE on the config's source and write the checkpoint to
    ``config.out`` with the resolved config as ``config.yaml`` (``bench weights fit -c`` replays it).
    Returns the predictor and the items and accuracies it was fitted on."""
    if config.out is None:
        raise BenchError("a fit needs a checkpoint folder: give out=DIR (--out)")
    items, y, _ = load_items(config.zoo, config.heads, config.families)
    out = Path(config.out)
    predictor = SNEPredictor(config).fit(items, y, wandb=config.wandb, log_dir=out / "wandb",
                                         progress=config.progress)
    source = {"zoo": config.zoo} if config.zoo is not None else {"heads": list(config.heads)}
    predictor.save(out, {"trained_on": {**source, "families": list(config.families), "items": len(items)}})
    save_fit_config(config, out)
    return predictor, items, y
