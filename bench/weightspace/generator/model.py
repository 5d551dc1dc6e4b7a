"""The support-conditioned head generator at use time: a checkpoint, its checks, generation.

A checkpoint is a folder written atomically (temporary folder, then one rename):

- ``model.safetensors``: the row VAE (``vae.*``) and the latent denoiser (``denoiser.*``);
- ``config.json``: the embedding dimension, the normalisation heads live in, the backbone
  fingerprint(s) and, per source, the dataset with its meta-train and meta-test classes, the
  model sizes, the diffusion schedule (a ``diffusers`` config), the latent scale, training
  facts and the sha256 of ``model.safetensors``;
- ``metatasks.safetensors``: the meta-training tasks and their trained heads (the retrieval
  baseline and the memorisation check read them).

Generation for one episode: encode each class's support, draw ``samples`` latents per class
by reverse diffusion (class c's noise from its own generator, seeded by the episode's seed and
the class id), decode rows, then keep the sample whose head gives the support set the highest
likelihood (``select="support"``, as D2NWG selects) or average the samples (``"mean"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from bench.errors import BenchError
from bench.extract.cache import file_sha256
from bench.runtime import replace_dir_atomic
from bench.weightspace.generator.diffusion import (
    LatentDenoiser,
    RowVAE,
    build_scheduler,
    head_log_likelihood,
    sample_latents,
)
from bench.weightspace.generator.metatasks import mix_seed

FORMAT = "bench-d2nwg/1"
MODEL_FILE, CONFIG_FILE, TASKS_FILE = "model.safetensors", "config.json", "metatasks.safetensors"
SELECT = ("support", "mean")


def checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint folder, given the folder or a file inside it."""
    p = Path(path)
    if p.is_file() and p.parent.joinpath(CONFIG_FILE).is_file():
        p = p.parent
    if not p.is_dir():
        raise BenchError(f"generator checkpoint {p} does not exist; make one with `bench generator fit --out {p}`")
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (p / name).is_file():
            raise BenchError(f"generator checkpoint {p} has no {name}; it is not a complete checkpoint "
                             "(refit with `bench generator fit`)")
    return p


class HeadGenerator(nn.Module):
    """Row VAE + latent denoiser + the config that says where they may be used."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        m = config["model"]
        d = int(config["embedding_dim"])
        self.vae = RowVAE(d + 1, m["latent"], m["vae_hidden"], m["vae_depth"])
        self.denoiser = LatentDenoiser(d, m["latent"], m["width"], m["heads"], m["set_layers"], m["class_layers"],
                                       m["set_width"])

    @property
    def dim(self) -> int:
        return int(self.config["embedding_dim"])

    # ---- files --------------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict[str, Callable[[Path], None]] | None = None,
             overwrite: bool = False) -> Path:
        """Write the checkpoint folder atomically; ``extra`` maps more file names to functions that
        write them (the meta-tasks, the fit's config)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not overwrite:
            raise BenchError(f"{path} exists; choose another out (--out) or pass overwrite=true (--overwrite)")
        config = dict(self.config)

        def fill(folder: Path) -> None:
            state = {k: v.detach().cpu().contiguous() for k, v in sorted(self.state_dict().items())}
            save_file(state, str(folder / MODEL_FILE), metadata={"format": FORMAT})
            config["weights_sha256"] = file_sha256(folder / MODEL_FILE)
            (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True))
            for name, write in (extra or {}).items():
                write(folder / name)

        replace_dir_atomic(path, fill, "the generator checkpoint")
        self.config = config
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> HeadGenerator:
        from safetensors.torch import load_file

        folder = checkpoint_dir(path)
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
        except json.JSONDecodeError as err:
            raise BenchError(f"{folder / CONFIG_FILE} is not valid JSON ({err}); refit the generator") from err
        if config.get("format") != FORMAT:
            raise BenchError(f"{folder} is a {config.get('format')!r} checkpoint, not {FORMAT}")
        if file_sha256(folder / MODEL_FILE) != config.get("weights_sha256"):
            raise BenchError(f"{folder / MODEL_FILE} does not match the sha256 in its config.json; the "
                             "checkpoint is damaged or was edited: refit it")
        gen = cls(config)
        try:
            gen.load_state_dict(load_file(str(folder / MODEL_FILE)))
        except RuntimeError as err:
            raise BenchError(f"{folder / MODEL_FILE} does not fit the model its config describes: "
                             f"{str(err).splitlines()[0]}") from err
        return gen.to(device).eval()

    # ---- where it may be used -----------------------------------------------------------
    def check_use(self, *, dim: int, backbone: str | None, dataset: str | None, classes: Sequence[int],
                  norm: str | None = None, where: str = "") -> None:
        """Refuse embeddings it was not trained for, and classes it was trained on."""
        cfg = self.config
        where = where or "this generator checkpoint"
        if dim != self.dim:
            raise BenchError(f"{where} was trained on {self.dim}-dim embeddings; this run's are {dim}-dim: fit a "
                             "generator on this run's backbone with `bench generator fit`")
        known = {s["backbone"]: s for s in cfg["sources"]}
        if backbone is None:
            raise BenchError(f"{where} needs the backbone fingerprint of the run's embeddings to check them "
                             f"(it was trained on {', '.join(s['backbone_name'] for s in cfg['sources'])}); "
                             "pass backbone=<Backbone.fingerprint>")
        if backbone not in known:
            names = ", ".join(f"{s['backbone_name']} ({s['backbone'][:12]})" for s in cfg["sources"])
            raise BenchError(f"{where} was trained on embeddings of {names}, not of backbone {backbone[:12]}: "
                             "fit a generator on this backbone with `bench generator fit`")
        if norm is not None and norm != cfg["norm"]:
            raise BenchError(f"{where} generates heads for '{cfg['norm']}'-normalised support; this head's "
                             f"NORM_pre is '{norm}': use {cfg['norm']} as NORM_pre and NORM_inf")
        for s in cfg["sources"]:
            if s["backbone"] != backbone:
                continue
            if dataset is None:
                raise BenchError(f"{where} cannot check these classes against its meta-train classes of "
                                 f"{s['dataset']}: the run does not name its dataset")
            if dataset == s["dataset"]:
                leaked = sorted(set(int(c) for c in classes) & set(s["meta_train_classes"]))
                if leaked:
                    raise BenchError(f"classes {leaked[:20]} of {dataset} were meta-train classes of {where}: "
                                     "a generator is evaluated on classes it never saw; use its meta-test "
                                     f"classes ({_short(s['meta_test_classes'])})")

    # ---- generation ---------------------------------------------------------------------
    def class_generators(self, seed: int | torch.Generator, classes: Sequence[int]) -> list[torch.Generator]:
        """One CPU generator per class, from the episode's seed and the class id."""
        if isinstance(seed, torch.Generator):
            seed = int(torch.randint(2**62, (1,), generator=seed))
        return [torch.Generator().manual_seed(mix_seed("d2nwg", int(seed), int(c))) for c in classes]

    @torch.no_grad()
    def generate(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        classes: Sequence[int],
        seed: int | torch.Generator,
        *,
        steps: int = 50,
        samples: int = 8,
        select: str = "support",
        sampler: str = "ddim",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Support (C, S, D) after the checkpoint's normalisation, mask (C, S) -> weights (C, D)
        and bias (C,): scores are ``x @ weights.T + bias``."""
        if select not in SELECT:
            raise BenchError(f"select='{select}' is not one of {', '.join(SELECT)}")
        if x.ndim != 3 or mask.shape != x.shape[:2] or len(classes) != len(x):
            raise BenchError(f"generate needs support (C, S, D), a mask (C, S) and C class ids; got "
                             f"{tuple(x.shape)}, {tuple(mask.shape)} and {len(classes)} ids")
        if not bool(mask.any(1).all()):
            raise BenchError("every class needs at least one support sample")
        device = next(self.parameters()).device
        x = x.to(device=device, dtype=torch.float32)
        mask = mask.to(device)
        cfg = self.config
        cond = self.denoiser.encode_support(x[None], mask[None])[0]
        scheduler = build_scheduler(sampler, cfg["schedule"])
        z = sample_latents(self.denoiser, cond, self.class_generators(seed, classes), samples=samples,
                           latent=cfg["model"]["latent"], scheduler=scheduler, steps=steps)
        rows = self.vae.decode(z / cfg["latent_scale"]).transpose(0, 1)  # (samples, C, D+1)
        rows = rows - rows.mean(1, keepdim=True)  # the class-mean row carries no decision
        rows = rows / rows[..., :-1].square().sum(-1).mean(-1).sqrt().clamp(min=1e-12)[:, None, None]
        flat_x = x[mask]
        flat_y = torch.arange(len(x), device=device)[:, None].expand_as(mask)[mask]
        candidates = rows.mean(0, keepdim=True) if select == "mean" else rows
        ll, temperature = head_log_likelihood(candidates, flat_x, flat_y)
        best = int(ll.argmax())
        # The head at the temperature that fits its support best: scores are then logits on a
        # sensible scale, not unit-scale ones (predictions do not depend on it).
        head = candidates[best] * temperature[best]
        return head[:, :-1], head[:, -1]


def _short(classes: Sequence[int]) -> str:
    classes = list(classes)
    if len(classes) > 8 and classes == list(range(classes[0], classes[-1] + 1)):
        return f"{classes[0]}-{classes[-1]}"
    return ", ".join(map(str, classes[:8])) + (", ..." if len(classes) > 8 else "")
