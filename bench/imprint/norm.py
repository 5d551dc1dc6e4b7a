"""NORM: normalisation before generation (NORM_pre), on proxies (NORM_post) and on queries
(NORM_inf), as registered methods.

Every function works on the last dimension of a tensor of any leading shape, so the same code
serves padded (classes, samples, dim) support tensors, flat proxy matrices and query batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.errors import BenchError
from bench.imprint.registry import Option, get, register_norm

_EPS = 1e-12
VECTOR = ("norm_pre", "norm_inf")


@register_norm("none", stages=("norm_pre", "norm_post", "norm_inf"), summary="leave the vectors as they are")
def identity(x: torch.Tensor, **_) -> torch.Tensor:
    return x


@register_norm("l2", stages=("norm_pre", "norm_post", "norm_inf"), unit=True, summary="unit length rows")
def l2(x: torch.Tensor, **_) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=_EPS)


@register_norm("center-l2", stages=VECTOR, unit=True, needs_reference=True,
               summary="subtract a reference mean (the run's `reference` classes, else the support "
                       "mean), then l2", reference="SimpleShot's CL2N, Wang et al. 2019")
def center_l2(x: torch.Tensor, *, center: torch.Tensor | None = None, **_) -> torch.Tensor:
    if center is None:
        raise BenchError("center-l2 needs a reference mean (pass reference_mean=... or set reference: base)")
    if center.shape[-1] != x.shape[-1]:
        raise BenchError(
            f"center-l2 reference mean has {center.shape[-1]} dims but embeddings have "
            f"{x.shape[-1]}; compute the reference mean from embeddings of the same backbone"
        )
    return l2(x - center.to(x))


@register_norm("tukey", stages=VECTOR, options={"lam": Option(float, 0.5, above=0.0)},
               summary="Tukey's power transform sign(x) * abs(x)^lam, which makes skewed features "
                       "more Gaussian", reference="as used by Yang et al. 2021")
def tukey(x: torch.Tensor, *, lam: float = 0.5, **_) -> torch.Tensor:
    return x.sign() * x.abs().pow(lam)


def apply_vector_norm(kind: str, x: torch.Tensor, center: torch.Tensor | None, **options) -> torch.Tensor:
    """NORM_pre and NORM_inf by name; ``center`` is the reference mean for center-l2."""
    return get("norm_pre", kind).fn(x, center=center, **options)


def reference_quantiles(reference: torch.Tensor) -> torch.Tensor:
    """Quantiles that quantile normalisation maps onto: the mean of the sorted rows.

    Averaging sorted rows is symmetric in the rows, so the result does not depend on the
    order in which classes (rows) were imprinted.
    """
    _check_reference(reference)
    return reference.sort(dim=-1).values.mean(dim=0)


def _check_reference(reference: torch.Tensor) -> None:
    if reference.ndim != 2 or reference.shape[0] == 0:
        raise BenchError("quantile normalisation needs a non-empty (rows, dim) reference")


@register_norm("quantile", stages=("norm_post",),
               summary="each row's values, by rank, mapped onto reference quantiles (the mean sorted "
                       "row of the head's own proxies, or given reference weights)",
               reference="Hosoda et al. 2024")
def quantile(proxies: torch.Tensor, *, reference: torch.Tensor | None = None, **_) -> torch.Tensor:
    """Replace each row's values by the reference quantile of the same rank.

    With no ``reference``, the proxies themselves are the reference (classic quantile
    normalisation); pass e.g. base-class proxies or a pretrained classifier's weights to map
    novel proxies onto their distribution as in Hosoda et al. 2024.
    """
    # Position j of the stable sort order holds the value of rank j: give it q[j]. Sorted
    # values do not depend on stability, so a self-referenced row needs only this one sort.
    values, order = proxies.sort(dim=-1, stable=True)
    if reference is None:
        _check_reference(proxies)
        q = values.mean(dim=0)
    else:
        q = reference_quantiles(reference).to(proxies)
    if q.shape[-1] != proxies.shape[-1]:
        raise BenchError(
            f"quantile reference has {q.shape[-1]} dims but proxies have {proxies.shape[-1]}"
        )
    return torch.empty_like(proxies).scatter_(-1, order, q.expand_as(proxies))


def apply_proxy_norm(kind: str, proxies: torch.Tensor, reference: torch.Tensor | None = None,
                     **options) -> torch.Tensor:
    """NORM_post by name on a flat (num_proxies, dim) matrix."""
    return get("norm_post", kind).fn(proxies, reference=reference, **options)
