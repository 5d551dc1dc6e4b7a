"""Fitting the head generator with Lightning: meta-task data, the VAE stage, the diffusion stage.

``fit_generator(GeneratorFitConfig(...))`` does the whole job (``bench generator fit``):

1. meta-training tasks and their trained heads (:mod:`bench.weightspace.generator.metatasks`), cached
   under ``cache_dir`` by a hash of everything that changes them;
2. the row VAE (:class:`RowVAEModule`) on the rows of the training tasks' heads;
3. the latent denoiser (:class:`LatentDiffusionModule`) on the VAE's latents of those heads,
   conditioned on a fresh k-shot support draw from the task's pool at every step (k varies
   per batch), several noise levels per support draw;
4. a check on held-out meta-train tasks (new class combinations and samples, same classes):
   accuracy of generated, trained and mean-imprinted heads on the task pools;
5. the checkpoint (:mod:`bench.weightspace.generator.model`), with the meta-tasks and the resolved
   config (``config.yaml``, which ``bench generator fit -c`` replays) next to it.

Both stages log to W&B (offline unless asked otherwise) and show Lightning's progress bar.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from bench.errors import BenchError
from bench.runtime import finish_wandb, quiet_lightning, torch_threads, wandb_logger
from bench.weightspace.commands import CONFIG_YAML, fit_config_yaml
from bench.weightspace.generator.config import GeneratorFitConfig
from bench.weightspace.generator.metatasks import (
    ClassSplit,
    MetaSource,
    MetaTaskSet,
    build_meta_source,
    build_metatasks,
    mix_seed,
)
from bench.weightspace.generator.model import FORMAT, TASKS_FILE, HeadGenerator


# ---- data ------------------------------------------------------------------------------------
class ShotBatchSampler(Sampler):
    """Batches of (task, shots, draw seed): one shot count per batch (no padding across shot
    counts), a new task order and new support draws each pass, all from ``seed``."""

    def __init__(self, tasks: Sequence[int], batch_size: int, shots: Sequence[int], seed: int) -> None:
        self.tasks, self.batch_size, self.shots, self.seed = list(tasks), batch_size, list(shots), seed
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.tasks) / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        g = torch.Generator().manual_seed(mix_seed("batches", self.seed, self.epoch))
        self.epoch += 1
        order = torch.randperm(len(self.tasks), generator=g).tolist()
        for start in range(0, len(order), self.batch_size):
            k = self.shots[int(torch.randint(len(self.shots), (1,), generator=g))]
            yield [(self.tasks[i], k, int(torch.randint(2**62, (1,), generator=g)))
                   for i in order[start: start + self.batch_size]]


class SupportDraws(Dataset):
    """Item (task, k, seed) -> the task's k-shot support per class and its target latents."""

    def __init__(self, taskset: MetaTaskSet, sources: Sequence[MetaSource], latents: torch.Tensor) -> None:
        self.taskset, self.sources, self.latents = taskset, sources, latents

    def __len__(self) -> int:
        return len(self.taskset)

    def __getitem__(self, item: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        i, k, seed = item
        x, y = self.taskset.pool(i, self.sources)
        c = int(self.taskset.num_classes[i])
        support = draw_support(x, y, c, k, torch.Generator().manual_seed(seed))
        return {"support": support, "latents": self.latents[i, :c]}


def draw_support(x: torch.Tensor, y: torch.Tensor, num_classes: int, k: int, g: torch.Generator) -> torch.Tensor:
    """k samples of each class position, at random: (C, k, D)."""
    out = []
    for c in range(num_classes):
        idx = (y == c).nonzero()[:, 0]
        out.append(x[idx[torch.randperm(len(idx), generator=g)[:k]]])
    return torch.stack(out)


def collate_tasks(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad tasks to the batch's largest class count: support (B, C, k, D), masks, latents."""
    cmax = max(len(it["support"]) for it in items)
    b, (_, k, d), lat = len(items), items[0]["support"].shape, items[0]["latents"].shape[-1]
    support = torch.zeros(b, cmax, k, d)
    latents = torch.zeros(b, cmax, lat)
    class_mask = torch.zeros(b, cmax, dtype=torch.bool)
    for j, it in enumerate(items):
        c = len(it["support"])
        support[j, :c], latents[j, :c], class_mask[j, :c] = it["support"], it["latents"], True
    return {"support": support, "support_mask": class_mask[..., None].expand(-1, -1, k).clone(),
            "class_mask": class_mask, "latents": latents}


class MetaTaskDataModule(L.LightningDataModule):
    """Meta-training tasks for both stages: rows of trained heads (``stage='vae'``) or k-shot
    support draws with target latents (``stage='diffusion'``, after ``set_latents``)."""

    def __init__(self, taskset: MetaTaskSet, sources: Sequence[MetaSource], train_ids: Sequence[int],
                 shots: Sequence[int], batch_size: int, seed: int, row_batch: int = 512) -> None:
        super().__init__()
        self.taskset, self.sources, self.train_ids = taskset, sources, list(train_ids)
        self.shots, self.batch_size, self.seed, self.row_batch = shots, batch_size, seed, row_batch
        self.stage = "vae"
        self.latents: torch.Tensor | None = None

    def train_rows(self) -> torch.Tensor:
        ids = torch.tensor(self.train_ids)
        rows, n = self.taskset.rows[ids], self.taskset.num_classes[ids]
        keep = torch.arange(rows.shape[1])[None] < n[:, None]
        return rows[keep]

    def set_latents(self, latents: torch.Tensor) -> None:
        self.latents, self.stage = latents, "diffusion"

    def train_dataloader(self) -> DataLoader:
        if self.stage == "vae":
            rows = self.train_rows()
            g = torch.Generator().manual_seed(mix_seed("rows", self.seed))
            return DataLoader(torch.utils.data.TensorDataset(rows), batch_size=self.row_batch, shuffle=True,
                              generator=g, drop_last=len(rows) > self.row_batch)
        sampler = ShotBatchSampler(self.train_ids, self.batch_size, self.shots, self.seed)
        return DataLoader(SupportDraws(self.taskset, self.sources, self.latents), batch_sampler=sampler,
                          collate_fn=collate_tasks)


# ---- models ----------------------------------------------------------------------------------
class RowVAEModule(L.LightningModule):
    """Stage 1: reconstruct head rows (standardised MSE) with a small KL term. The decoder also
    sees slightly perturbed latents, so it tolerates the diffusion model's imprecision."""

    def __init__(self, generator: HeadGenerator, lr: float, kl_weight: float, steps: int,
                 latent_noise: float = 0.1) -> None:
        super().__init__()
        self.generator, self.lr, self.kl_weight, self.steps = generator, lr, kl_weight, steps
        self.latent_noise = latent_noise

    def training_step(self, batch, batch_idx):
        (rows,) = batch
        vae = self.generator.vae
        mu, logvar = vae.encode(rows)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        z = z + self.latent_noise * torch.randn_like(z)
        recon = (vae.decode(z) - rows) / vae.row_std
        mse = recon.square().mean()
        kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(-1).mean()
        loss = mse + self.kl_weight * kl
        self.log_dict({"vae/loss": loss, "vae/mse": mse, "vae/kl": kl}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.generator.vae.parameters(), lr=self.lr, weight_decay=1e-4)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.lr, total_steps=self.steps, pct_start=0.05)}


class LatentDiffusionModule(L.LightningModule):
    """Stage 2: epsilon prediction on the VAE's (scaled) latents of trained heads, conditioned
    on each class's support; ``noise_levels`` timesteps share one support encoding."""

    def __init__(self, generator: HeadGenerator, lr: float, steps: int, noise_levels: int) -> None:
        super().__init__()
        from bench.weightspace.generator.diffusion import training_schedule

        self.generator, self.lr, self.steps, self.noise_levels = generator, lr, steps, noise_levels
        sched = generator.config["schedule"]
        self.schedule = training_schedule(sched["num_train_timesteps"], sched["prediction_type"])

    def training_step(self, batch, batch_idx):
        den = self.generator.denoiser
        cond = den.encode_support(batch["support"], batch["support_mask"])
        z0, keep = batch["latents"], batch["class_mask"]
        r = self.noise_levels
        z0, cond, keep = z0.repeat(r, 1, 1), cond.repeat(r, 1, 1), keep.repeat(r, 1)
        t = torch.randint(0, self.schedule.config.num_train_timesteps, (len(z0),), device=z0.device)
        noise = torch.randn_like(z0)
        zt = self.schedule.add_noise(z0, noise, t)
        kind = self.schedule.config.prediction_type
        target = noise if kind == "epsilon" else z0 if kind == "sample" else self.schedule.get_velocity(z0, noise, t)
        err = (den(zt, t, cond, keep) - target).square().mean(-1)
        loss = (err * keep).sum() / keep.sum()
        self.log("diffusion/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.generator.denoiser.parameters(), lr=self.lr, weight_decay=1e-4)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.lr, total_steps=self.steps, pct_start=0.05)}


# ---- the job -------------------------------------------------------------------------------
def fit_logger(cfg: GeneratorFitConfig, out: Path):
    """The fit's W&B logger (both stages log to one run) beside the checkpoint folder, or None."""
    return wandb_logger(cfg.wandb.mode, out.parent / "wandb", f"{out.name}-fit", cfg.to_dict(),
                        project=cfg.wandb.project, entity=cfg.wandb.entity, job_type="generator-fit")


def _trainer(cfg: GeneratorFitConfig, steps: int, logger) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator=cfg.accelerator, devices=1, logger=logger or False,
                     enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=25,
                     enable_progress_bar=cfg.progress, deterministic=False)


def load_sources(cfg: GeneratorFitConfig) -> list[tuple[MetaSource, ClassSplit, int]]:
    built = [build_meta_source(s, dim=cfg.dim, cache_dir=Path(cfg.cache_dir) / "embeddings") for s in cfg.sources]
    dims = {s.dim for s in built if s.classes is not None}
    if len(dims) == 1 and cfg.dim not in dims:  # procedural families follow the cached backbone's width
        built = [build_meta_source(s, dim=dims.pop(), cache_dir=Path(cfg.cache_dir) / "embeddings")
                 if b.classes is None else b for s, b in zip(cfg.sources, built)]
    known = {b.dataset for b in built}
    for what in (cfg.train_classes, cfg.test_classes):
        unknown = sorted(set(what) - known)
        if unknown:
            raise BenchError(f"class lists given for {unknown}, which are not among the sources {sorted(known)}")
    return [(b, ClassSplit.default(b, cfg.train_classes.get(b.dataset), cfg.test_classes.get(b.dataset)), n)
            for b, n in zip(built, cfg.tasks)]


def metatasks_for(cfg: GeneratorFitConfig, entries) -> MetaTaskSet:
    """Build (or reuse from ``cache_dir``) the meta-training tasks and their trained heads."""
    key_fields = {"sources": [{**s.info(), "train": list(sp.train), "test": list(sp.test), "tasks": n}
                              for s, sp, n in entries],
                  "ways": cfg.ways, "per_class": cfg.per_class, "norm": cfg.norm, "seed": cfg.seed, "version": 1}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cfg.cache_dir) / "metatasks" / f"{key}.safetensors"
    if path.is_file():
        return MetaTaskSet.load(path)
    taskset = build_metatasks(entries, ways=cfg.ways, per_class=cfg.per_class, norm=cfg.norm, seed=cfg.seed,
                              progress=cfg.progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    taskset.save(path)
    return taskset


def model_config(cfg: GeneratorFitConfig, taskset: MetaTaskSet, dim: int) -> dict[str, Any]:
    from bench.weightspace.generator.diffusion import training_schedule

    real = [s for s in taskset.sources if not s["dataset"].startswith("gmm:")]
    return {
        "format": FORMAT,
        "embedding_dim": dim,
        "norm": cfg.norm,
        "backbone_fingerprint": (real or taskset.sources)[0]["backbone"],
        "sources": taskset.sources,
        "model": {k: getattr(cfg, k) for k in ("latent", "vae_hidden", "vae_depth", "width", "set_width", "heads",
                                               "set_layers", "class_layers")},
        "schedule": dict(training_schedule(1000, cfg.prediction).config),
        "latent_scale": 1.0,
    }


@torch.no_grad()
def encode_latents(gen: HeadGenerator, taskset: MetaTaskSet) -> torch.Tensor:
    return gen.vae.encode(taskset.rows)[0]


@torch.no_grad()
def heldout_check(gen: HeadGenerator, taskset: MetaTaskSet, sources, ids: Sequence[int], shots: int,
                  seed: int, steps: int = 25, samples: int = 4) -> dict[str, float]:
    """Accuracy on held-out tasks' pools of: generated heads from ``shots`` shots, the trained
    heads, the VAE's reconstruction of them, and l2 mean imprinting from the same shots."""
    acc = {"generated": [], "trained": [], "reconstructed": [], "mean_imprint": []}
    for j, i in enumerate(ids):
        x, y = taskset.pool(i, sources)
        c = int(taskset.num_classes[i])
        support = draw_support(x, y, c, shots, torch.Generator().manual_seed(mix_seed("check", seed, j)))
        w, b = gen.generate(support, torch.ones(support.shape[:2], dtype=torch.bool), taskset.task_classes(i),
                            seed + j, steps=steps, samples=samples)
        rows = taskset.rows[i, :c]
        recon = gen.vae.decode(gen.vae.encode(rows)[0])
        means = F.normalize(support.mean(1), dim=-1)
        for name, (wt, bt) in {"generated": (w, b), "trained": (rows[:, :-1], rows[:, -1]),
                               "reconstructed": (recon[:, :-1], recon[:, -1]),
                               "mean_imprint": (means, torch.zeros(c))}.items():
            acc[name].append(float(((x @ wt.T + bt).argmax(1) == y).float().mean()))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def fit_generator(cfg: GeneratorFitConfig) -> Path:
    """Fit a generator and write its checkpoint to ``cfg.out``; returns the path."""
    with torch_threads(cfg.threads):
        return _fit(cfg)


def _fit(cfg: GeneratorFitConfig) -> Path:
    quiet_lightning()
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise BenchError(f"{out} exists; choose another out (--out) or pass overwrite=true (--overwrite)")
    started = time.perf_counter()
    entries = load_sources(cfg)
    taskset = metatasks_for(cfg, entries)
    sources = [s for s, _, _ in entries]
    dim = sources[0].dim
    data_seconds = time.perf_counter() - started

    g = torch.Generator().manual_seed(mix_seed("val-tasks", cfg.seed))
    order = torch.randperm(len(taskset), generator=g).tolist()
    n_val = max(1, int(len(order) * cfg.val_tasks)) if len(order) > 1 else 0
    val_ids, train_ids = sorted(order[:n_val]), sorted(order[n_val:])

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    gen = HeadGenerator(model_config(cfg, taskset, dim))
    data = MetaTaskDataModule(taskset, sources, train_ids, cfg.shots, cfg.batch_size, cfg.seed)
    rows = data.train_rows()
    gen.vae.row_mean.copy_(rows.mean(0))
    gen.vae.row_std.copy_(rows.std(0).clamp(min=1e-6))

    vae_module = RowVAEModule(gen, cfg.lr, cfg.kl_weight, cfg.vae_steps)
    logger = fit_logger(cfg, out)
    stage_start = time.perf_counter()
    _trainer(cfg, cfg.vae_steps, logger).fit(vae_module, datamodule=data)
    vae_seconds = time.perf_counter() - stage_start
    gen.cpu().eval()
    latents = encode_latents(gen, taskset)
    keep = torch.arange(latents.shape[1])[None] < taskset.num_classes[:, None]
    latent_scale = float(1.0 / latents[torch.tensor(train_ids)][keep[torch.tensor(train_ids)]].std())
    gen.config["latent_scale"] = latent_scale
    data.set_latents(latents * latent_scale)

    gen.train()
    diff_module = LatentDiffusionModule(gen, cfg.lr, cfg.diffusion_steps, cfg.noise_levels)
    stage_start = time.perf_counter()
    _trainer(cfg, cfg.diffusion_steps, logger).fit(diff_module, datamodule=data)
    diffusion_seconds = time.perf_counter() - stage_start
    gen.cpu().eval()
    fit_seconds = time.perf_counter() - started

    checks = {}
    if val_ids:
        for k in (1, 5):
            checks[f"{k}shot"] = heldout_check(gen, taskset, sources, val_ids[:64], k, cfg.seed)
    gen.config["training"] = {
        "config": cfg.to_dict(),
        "tasks": len(taskset), "train_tasks": len(train_ids), "val_tasks": len(val_ids),
        "rows": int(keep.sum()), "data_seconds": round(data_seconds, 1), "vae_seconds": round(vae_seconds, 1),
        "diffusion_seconds": round(diffusion_seconds, 1), "fit_seconds": round(fit_seconds, 1),
        "heldout_accuracy": checks, "torch": torch.__version__,
        "trained_head_weight_decays": {str(float(w)): int(n) for w, n in
                                       zip(*taskset.weight_decay.unique(return_counts=True))},
    }
    if logger:
        logger.log_metrics({f"heldout/{k}/{m}": v for k, d in checks.items() for m, v in d.items()})
        finish_wandb(logger)
    config_yaml = fit_config_yaml(cfg)
    return gen.save(out, {TASKS_FILE: taskset.save, CONFIG_YAML: lambda path: path.write_text(config_yaml)},
                    overwrite=cfg.overwrite)
