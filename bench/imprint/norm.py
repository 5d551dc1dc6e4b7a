"""NORM: normalisation before generation, on proxies, and on queries.

Every function works on the last dimension of a tensor of any leading shape, so the same code
serves padded (classes, samples, dim) support tensors, flat proxy matrices and query batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.errors import BenchError

_EPS = 1e-12


def l2(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=_EPS)


def center_l2(x: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """SimpleShot's CL2N: subtract a reference mean, then l2-normalise."""
    if center.shape[-1] != x.shape[-1]:
        raise BenchError(
            f"center-l2 reference mean has {center.shape[-1]} dims but embeddings have "
            f"{x.shape[-1]}; compute the reference mean from embeddings of the same backbone"
        )
    return l2(x - center.to(x))


def apply_vector_norm(kind: str, x: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
    """NORM_pre and NORM_inf: 'none', 'l2' or 'center-l2' (which needs ``center``)."""
    if kind == "none":
        return x
    if kind == "l2":
        return l2(x)
    if kind == "center-l2":
        if center is None:
            raise BenchError("center-l2 needs a reference mean (pass reference_mean=...)")
        return center_l2(x, center)
    raise BenchError(f"unknown normalisation '{kind}'; known: none, l2, center-l2")


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


def quantile(proxies: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
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


def apply_proxy_norm(
    kind: str, proxies: torch.Tensor, reference: torch.Tensor | None = None
) -> torch.Tensor:
    """NORM_post on a flat (num_proxies, dim) matrix."""
    if kind == "none":
        return proxies
    if kind == "l2":
        return l2(proxies)
    if kind == "quantile":
        return quantile(proxies, reference)
    raise BenchError(f"unknown proxy normalisation '{kind}'; known: none, l2, quantile")
