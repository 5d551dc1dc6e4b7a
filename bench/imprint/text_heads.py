"""Heads from a vision-language backbone's text tower: zero-shot CLIP and training-free Tip-Adapter.

Both fit the method space rather than needing a head type of their own, because their scores are
functions of query-proxy inner products:

- ``zeroshot`` (GEN): one proxy per class, the class's text embedding (prompt templates, see
  :mod:`bench.text`). It reads no support samples (``needs_support=False``), so it also runs at
  0 shots. ``none/zeroshot/none/l2/max`` is CLIP's zero-shot classifier: the argmax of
  100 * q.t over classes does not depend on the logit scale.
- ``tip`` (GEN) + ``tip`` (AGG): Tip-Adapter's training-free form (Zhang et al. 2022). The GEN
  puts the class's text embedding first and its (l2-normalised) support samples after it; the
  AGG knows that the first proxy of each class is the text one and scores
  100 * q.t_c + alpha * sum_i exp(-beta (1 - q.k_i)) over the class's cache keys k_i, which is
  Tip-Adapter's logits = 100 f W^T + alpha A L with one-hot values L.
- ``cache`` (AGG): the image-only cache part alone, sum_i exp(-beta (1 - q.k_i)) over a class's
  proxies; with GEN ``all`` it needs no text tower.

alpha and beta are options, so `select:` families choose them on a validation part (the `tip`
family); without one the paper's defaults alpha=1, beta=5.5 apply.
"""

from __future__ import annotations

import torch

from bench.errors import BenchError
from bench.imprint.gen import GenContext, GenResult, _one_per_class
from bench.imprint.registry import Option, register_agg, register_gen

CLIP_LOGIT_SCALE = 100.0  # CLIP's learned temperature, fixed at 100 in Tip-Adapter's logits


def _text(ctx: GenContext | None, x: torch.Tensor, name: str) -> torch.Tensor:
    if ctx is None or ctx.text is None:
        raise BenchError(f"GEN '{name}' reads the classes' text embeddings; use a backbone with a text tower "
                         "(openclip:..., a CLIP/SigLIP hf model) through bench run, or pass SupportSet.text")
    if ctx.text.shape != (x.shape[0], x.shape[2]):
        raise BenchError(f"GEN '{name}' got text embeddings of shape {tuple(ctx.text.shape)}; expected "
                         f"({x.shape[0]}, {x.shape[2]}): one per class, in the image embedding space")
    return ctx.text.to(x)


@register_gen("zeroshot", single_proxy=True, needs_text=True, needs_support=False,
              summary="zero-shot: the class's text embedding (templates averaged, l2-normalised); no support, "
                      "so it also runs at 0 shots",
              reference="Radford et al. 2021 (CLIP)")
def gen_zeroshot(x: torch.Tensor, mask: torch.Tensor, ctx: GenContext | None = None) -> GenResult:
    return _one_per_class(_text(ctx, x, "zeroshot"))


def _tip_problem(spec) -> str | None:
    if spec.gen.name == "tip" and spec.agg.name != "tip":
        return "GEN 'tip' puts each class's text embedding before its cache keys; only AGG 'tip' reads that layout"
    if spec.agg.name == "tip" and spec.gen.name != "tip":
        return "AGG 'tip' treats each class's first proxy as its text embedding; it needs GEN 'tip'"
    return None


@register_gen("tip", needs_text=True, problem=_tip_problem,
              summary="Tip-Adapter's proxies: the class's text embedding, then every support sample (the cache "
                      "keys); score with AGG tip",
              reference="Zhang et al. 2022 (Tip-Adapter)")
def gen_tip(x: torch.Tensor, mask: torch.Tensor, ctx: GenContext | None = None) -> GenResult:
    text = _text(ctx, x, "tip")
    ones = torch.ones(len(text), 1, dtype=torch.bool, device=x.device)
    pmask = torch.cat([ones, mask], 1)
    return GenResult(torch.cat([text[:, None], x], 1), pmask, pmask.sum(1))


def _first_of_class(proxy_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C,) index of each class's first proxy: the flat proxies are grouped class by class in slot
    order, so that is GEN tip's text proxy."""
    positions = torch.arange(len(proxy_labels), device=proxy_labels.device)
    first = torch.full((num_classes,), len(proxy_labels), device=proxy_labels.device, dtype=torch.long)
    return first.scatter_reduce(0, proxy_labels, positions, reduce="amin")


def _affinity_sums(sim: torch.Tensor, keys: torch.Tensor, proxy_labels: torch.Tensor, num_classes: int,
                   beta: float) -> torch.Tensor:
    """(N, C): per class, sum over its cache keys of exp(-beta (1 - q.k)) (Tip-Adapter's A L)."""
    affinity = torch.exp(-beta * (1 - sim)) * keys.to(sim.dtype)
    return sim.new_zeros(len(sim), num_classes).index_add_(1, proxy_labels, affinity)


def _sim(matrix: torch.Tensor, kind: str) -> torch.Tensor:
    return matrix if kind == "dot" else 1 - matrix  # cosine distance back to similarity


def _cosine_matrix(opts: dict, unit_inputs: bool) -> str:
    # Tip-Adapter's affinities read cosine similarities: the shared dot matrix when rows are unit
    return "dot" if unit_inputs else "cosine"


_BETA = {"beta": Option(float, 5.5, minimum=0.0)}


@register_agg("tip", matrix=_cosine_matrix, problem=_tip_problem,
              options={"alpha": Option(float, 1.0, minimum=0.0), **_BETA},
              summary="Tip-Adapter (training-free): 100 * cos(q, text) + alpha * sum over the class's cache keys of "
                      "exp(-beta (1 - cos(q, key))); with GEN tip",
              reference="Zhang et al. 2022 (Tip-Adapter)")
def agg_tip(matrix: torch.Tensor, kind: str, proxy_labels: torch.Tensor, num_classes: int, alpha: float = 1.0,
            beta: float = 5.5) -> torch.Tensor:
    sim = _sim(matrix, kind)
    first = _first_of_class(proxy_labels, num_classes)
    keys = torch.ones(sim.shape[1], dtype=torch.bool, device=sim.device)
    keys[first] = False
    zero_shot = CLIP_LOGIT_SCALE * sim[:, first]
    return zero_shot + alpha * _affinity_sums(sim, keys, proxy_labels, num_classes, beta)


@register_agg("cache", matrix=_cosine_matrix, options=dict(_BETA),
              summary="Tip-Adapter's image-only cache: sum over a class's proxies of exp(-beta (1 - cos(q, proxy))); "
                      "with GEN all it needs no text tower",
              reference="Zhang et al. 2022 (Tip-Adapter, cache model alone)")
def agg_cache(matrix: torch.Tensor, kind: str, proxy_labels: torch.Tensor, num_classes: int,
              beta: float = 5.5) -> torch.Tensor:
    sim = _sim(matrix, kind)
    keys = torch.ones(sim.shape[1], dtype=torch.bool, device=sim.device)
    return _affinity_sums(sim, keys, proxy_labels, num_classes, beta)
