"""GEN ``d2nwg``: heads from a support-conditioned diffusion generator (Soro et al. 2024).

    l2/d2nwg:ckpt=d2nwg[,steps=50,samples=8,select=support,sampler=ddim]/none/l2/max

A spec separates its stages with ``/``, so ``ckpt`` names a checkpoint folder under
``$BENCH_GENERATOR_DIR`` (default ``runs/generator``); from Python, a full path also works.

The checkpoint (``bench generator fit``) must match the run: the embedding dimension, the
backbone fingerprint and the normalisation (NORM_pre, and use the same NORM_inf), and the
episode's classes may not be meta-train classes of the same dataset and backbone. Each
mismatch stops the run with one line that says what to change.

The rows are those of a linear classifier (scores = query . proxy + bias), one per class;
every class's row depends on the other classes of the episode, and the episode's seed picks
the diffusion noise (class by class, so reordering classes reorders the head).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bench.errors import BenchError
from bench.imprint.gen import GenContext, GenResult, RowRandom
from bench.imprint.registry import Option, register_gen

_LOADED: dict[tuple, object] = {}


def resolve_checkpoint(ckpt: str) -> Path:
    """``ckpt`` as given if it exists, else a folder of that name under the generator folder."""
    given = Path(ckpt).expanduser()
    if given.exists():
        return given
    root = Path(os.environ.get("BENCH_GENERATOR_DIR", "runs/generator"))
    if (root / ckpt).exists():
        return root / ckpt
    raise BenchError(f"generator checkpoint '{ckpt}' is neither a path nor a folder in {root}/ (set "
                     "BENCH_GENERATOR_DIR to the folder that holds it, or fit one with `bench generator fit "
                     f"--out {root}/{ckpt}`)")


def load_generator(ckpt: str | Path, device: torch.device | str = "cpu"):
    """A checkpoint loaded once per process (keyed by its files' identity and the device)."""
    from bench.weightspace.generator.model import CONFIG_FILE, MODEL_FILE, HeadGenerator, checkpoint_dir

    folder = checkpoint_dir(resolve_checkpoint(str(ckpt))).resolve()
    stats = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in (folder / CONFIG_FILE, folder / MODEL_FILE))
    key = (str(folder), stats, str(device))
    if key not in _LOADED:
        _LOADED[key] = HeadGenerator.load(folder, device)
    return _LOADED[key]


def _problem(spec) -> str | None:
    """The generated rows are a classifier for queries normalised like the support."""
    if spec.norm_post.name != "none":
        return "d2nwg yields classifier rows with a bias; a NORM_post would rescale rows without their bias (use none)"
    if spec.norm_inf.name != spec.norm_pre.name:
        return (f"d2nwg rows score queries normalised as the support was; use NORM_inf '{spec.norm_pre.name}' "
                f"(the NORM_pre), not '{spec.norm_inf.name}'")
    return None


@register_gen(
    "d2nwg",
    options={"ckpt": Option(str), "steps": Option(int, 50, minimum=1, maximum=1000),
             "samples": Option(int, 8, minimum=1), "select": Option(str, "support", choices=("support", "mean")),
             "sampler": Option(str, "ddim", choices=("ddim", "ddpm"))},
    seeded=True,
    coupled=True,
    linear=True,
    single_proxy=True,
    problem=_problem,
    summary="support-conditioned diffusion generator of linear heads (a checkpoint of `bench generator fit`); "
            "S samples, best support likelihood or their mean",
    reference="Soro et al. 2024",
)
def gen_d2nwg(x: torch.Tensor, mask: torch.Tensor, *, rng: RowRandom | int, ctx: GenContext | None = None,
              ckpt: str, steps: int = 50, samples: int = 8, select: str = "support",
              sampler: str = "ddim") -> GenResult:
    if ctx is None:
        raise BenchError("GEN d2nwg needs the episode's classes, dataset and backbone fingerprint; build heads "
                         "through bench's grid (build_head / build_head_grid with dataset= and backbone=)")
    gen = load_generator(ckpt, x.device)
    classes = [int(c) for c in ctx.classes]
    gen.check_use(dim=x.shape[-1], backbone=ctx.backbone, dataset=ctx.dataset, classes=classes,
                  norm=ctx.norm_pre, where=f"generator checkpoint {Path(ckpt)}")
    rng = RowRandom.of(rng, len(x))
    if len(rng.generators) != 1:
        raise BenchError("GEN d2nwg is coupled: it builds one episode at a time (got a batch of "
                         f"{len(rng.generators)} episodes)")
    weights, bias = gen.generate(x, mask, classes, rng.generators[0], steps=steps, samples=samples,
                                 select=select, sampler=sampler)
    c = len(x)
    ones = torch.ones(c, 1, dtype=torch.bool, device=x.device)
    return GenResult(weights.to(x)[:, None], ones, torch.ones(c, dtype=torch.long, device=x.device),
                     bias.to(x)[:, None])
