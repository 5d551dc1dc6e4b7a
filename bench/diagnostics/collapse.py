"""Neural collapse (NC1-NC4) and CDNV as torchmetrics Metrics.

:class:`ClassStatistics` accumulates, in float64, what every measure needs: per-class counts
and means, per-class sums of squared distances to the class mean, and the within-class scatter
matrix. These are central moments, merged by Chan et al.'s parallel formula (each batch is
centred on its own class means, two-pass); raw moments (sums of x and x x^T) cancel
catastrophically once the data sit far from the origin, losing most digits of Sigma_W at an
offset of 1e5.
The merge is not a sum, so each process's statistics are gathered (one "part" per process) and
merged in ``compute``: the result is the same on 1 or N processes up to rounding.
Definitions (C classes, class means mu_c, global mean mu_G = mean of class means):

- Sigma_W = (1/N) sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T  (each class centred on its own mean)
- Sigma_B = (1/C) sum_c (mu_c - mu_G)(mu_c - mu_G)^T
- NC1 = Tr(Sigma_W Sigma_B^+) / C, with the pseudo-inverse at relative tolerance ``rtol``
  (Sigma_B has rank at most C - 1); ``nc1_quotient`` = Tr(Sigma_W) / Tr(Sigma_B)
- NC2: ``equinorm`` = std / mean of ||mu_c - mu_G||; ``equiangularity`` = std of the pairwise
  cosines of the centred means; ``max_angle`` = mean |cos + 1/(C-1)| (0 for a simplex ETF)
- NC3 (a head with one weight row per class): || W/||W||_F - M/||M||_F ||_F with M the centred
  means; NC4: share of samples where the head and the nearest-class-centre rule disagree
- CDNV(c, c') = (Var_c + Var_c') / (2 ||mu_c - mu_c'||^2), Var_c = E||x - mu_c||^2, averaged
  over class pairs. ``unbiased=True`` corrects the finite-sample bias of few-shot estimates:
  Var_c uses n_c - 1, and E||mû_c - mû_c'||^2 = ||mu_c - mu_c'||^2 + Var_c/n_c + Var_c'/n_c', so
  those terms are subtracted from the squared distance. Where a corrected squared distance is
  <= 0 (two classes' means are closer than their sampling noise) that pair's CDNV has no value:
  ``cdnv_unbiased`` is NaN and ``undefined["cdnv_unbiased"]`` says how many pairs and why. The
  same holds for ``cdnv`` when two classes have exactly the same mean.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from bench.errors import BenchError

_STATES = ("counts", "means", "class_sq", "within")


def _gathered_parts(x: torch.Tensor) -> torch.Tensor:
    """Across processes, keep every process's parts (merged in ``compute``): (world, P, ...) -> (world * P, ...)."""
    return x.flatten(0, 1)


class ClassStatistics(Metric):
    """Central moments of labelled embeddings per class, merged exactly over batches and processes.

    Every state has a leading "part" dimension: one part locally, one per process after a sync.
    """

    # forward() must not stack the batch's parts onto the running state at every call.
    full_state_update = True
    higher_is_better = None

    def __init__(self, num_classes: int, dim: int, normalize: bool = False, rtol: float = 1e-6) -> None:
        super().__init__()
        self.num_classes, self.dim, self.normalize, self.rtol = num_classes, dim, normalize, rtol
        f64 = torch.float64
        self.add_state("counts", torch.zeros(1, num_classes, dtype=f64), dist_reduce_fx=_gathered_parts)
        self.add_state("means", torch.zeros(1, num_classes, dim, dtype=f64), dist_reduce_fx=_gathered_parts)
        self.add_state("class_sq", torch.zeros(1, num_classes, dtype=f64), dist_reduce_fx=_gathered_parts)
        self.add_state("within", torch.zeros(1, dim, dim, dtype=f64), dist_reduce_fx=_gathered_parts)

    def update(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        x = embeddings.detach().to(torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise BenchError(f"embeddings must be (N, {self.dim}), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise BenchError("embeddings contain NaN or Inf; diagnostics need finite values")
        labels = labels.long().to(x.device)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise BenchError(f"labels must lie in 0..{self.num_classes - 1}; map class ids first")
        if self.normalize:
            x = F.normalize(x, dim=1)
        counts = torch.bincount(labels, minlength=self.num_classes).to(x)
        safe = counts.clamp_min(1)[:, None]
        means = torch.zeros(self.num_classes, self.dim, dtype=x.dtype, device=x.device).index_add_(0, labels, x) / safe
        # A second pass refines each mean by the mean of its residuals (exact up to rounding of x).
        means += torch.zeros_like(means).index_add_(0, labels, x - means[labels]) / safe
        residual = x - means[labels]
        class_sq = torch.zeros_like(counts).index_add_(0, labels, (residual * residual).sum(1))
        self._absorb((counts[None], means[None], class_sq[None], (residual.T @ residual)[None]))

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Merge another ClassStatistics (or its ``metric_state``) by the same exact formula."""
        other = incoming_state.metric_state if isinstance(incoming_state, Metric) else incoming_state
        self._absorb(tuple(other[name] for name in _STATES))

    def _absorb(self, parts: tuple[torch.Tensor, ...]) -> None:
        merged = _merge(*(torch.cat([state, part.to(state)]) for state, part in zip(self._parts(), parts)))
        self.counts, self.means, self.class_sq, self.within = (t[None] for t in merged)

    def _parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(getattr(self, name) for name in _STATES)

    def merged(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(counts (C,), means (C, D), class_sq (C,), within (D, D)) over every part."""
        return _merge(*self._parts())

    def compute(self) -> dict[str, Any]:
        return collapse_from_stats(*self.merged(), rtol=self.rtol)


def _merge(counts, means, class_sq, within):
    """Chan et al.'s parallel merge of per-part central moments (parts along dim 0)."""
    n = counts.sum(0)
    mean = (counts[..., None] * means).sum(0) / n.clamp_min(1)[:, None]
    delta = (means - mean) * (counts[..., None] > 0)  # a part without samples of a class adds nothing
    weighted = counts[..., None] * delta
    sq = class_sq.sum(0) + (weighted * delta).sum((0, 2))
    flat_w, flat_d = weighted.reshape(-1, means.shape[-1]), delta.reshape(-1, means.shape[-1])
    return n, mean, sq, within.sum(0) + flat_w.T @ flat_d


def collapse_from_stats(
    counts: torch.Tensor, means: torch.Tensor, class_sq: torch.Tensor, within: torch.Tensor, rtol: float = 1e-6
) -> dict[str, Any]:
    """Every measure from merged central moments (see the module docstring): per-class counts
    and means, per-class sums of squared distances to the class mean, within-class scatter."""
    present = counts > 0
    c = int(present.sum())
    if c < 2:
        raise BenchError(f"neural collapse needs at least two classes with samples, got {c}")
    n_c = counts[present]
    mu = means[present]
    n = n_c.sum()
    mu_g = mu.mean(0)
    centred = mu - mu_g
    sigma_w = within / n
    sigma_b = centred.T @ centred / c
    tr_b = torch.trace(sigma_b)
    if tr_b <= 0:
        raise BenchError("all class means coincide (zero between-class variance); NC1 is undefined")
    nc1 = torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, rtol=rtol, hermitian=True)) / c
    norms = centred.norm(dim=1)
    cos = F.normalize(centred, dim=1) @ F.normalize(centred, dim=1).T
    iu = torch.triu_indices(c, c, 1)
    pair_cos = cos[iu[0], iu[1]]
    var = class_sq[present] / n_c  # E||x - mu_c||^2
    undefined: dict[str, str] = {}
    out = {
        "num_classes": c,
        "num_samples": int(n),
        "nc1": float(nc1),
        "nc1_quotient": float(torch.trace(sigma_w) / tr_b),
        "within_trace": float(torch.trace(sigma_w)),
        "between_trace": float(tr_b),
        "equinorm": float(norms.std() / norms.mean()) if c > 1 else 0.0,
        "equiangularity": float(pair_cos.std()) if len(pair_cos) > 1 else 0.0,
        "max_angle": float((pair_cos + 1.0 / (c - 1)).abs().mean()),
        "mean_cosine": float(pair_cos.mean()),
        "cdnv": _cdnv(mu, var, n_c, unbiased=False, undefined=undefined),
    }
    singletons = int((n_c < 2).sum())
    if singletons:
        out["cdnv_unbiased"] = float("nan")
        undefined["cdnv_unbiased"] = f"{singletons} class(es) with one sample have no variance estimate"
    else:
        out["cdnv_unbiased"] = _cdnv(mu, var * n_c / (n_c - 1), n_c, unbiased=True, undefined=undefined)
    if undefined:
        out["undefined"] = undefined
    return out


def _cdnv(mu: torch.Tensor, var: torch.Tensor, n_c: torch.Tensor, unbiased: bool, undefined: dict[str, str]) -> float:
    c = len(mu)
    iu = torch.triu_indices(c, c, 1)
    d2 = ((mu[iu[0]] - mu[iu[1]]) ** 2).sum(1)
    if unbiased:
        d2 = d2 - var[iu[0]] / n_c[iu[0]] - var[iu[1]] / n_c[iu[1]]
    bad = int((d2 <= 0).sum())
    if bad:
        key = "cdnv_unbiased" if unbiased else "cdnv"
        why = ("have a bias-corrected squared mean distance <= 0 (their means are closer than their "
               "sampling noise)" if unbiased else "have identical means")
        undefined[key] = f"{bad} of {len(d2)} class pairs {why}; CDNV is undefined"
        return float("nan")
    num = var[iu[0]] + var[iu[1]]
    return float((num / (2 * d2)).mean())


def nc3_self_duality(weights: torch.Tensor, class_means: torch.Tensor) -> float:
    """|| W/||W|| - M/||M|| ||_F with M the class means centred on their mean (rows aligned)."""
    w = weights.to(torch.float64)
    m = class_means.to(torch.float64)
    if w.shape != m.shape:
        raise BenchError(
            f"NC3 needs one weight row per class: weights {tuple(w.shape)} vs means {tuple(m.shape)}"
        )
    m = m - m.mean(0)
    return float((w / w.norm() - m / m.norm()).norm())


class NearestCentreAgreement(Metric):
    """NC4: how often a head's prediction differs from the nearest class centre's."""

    full_state_update = False

    def __init__(self, class_means: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("means", class_means.to(torch.float64))
        self.add_state("disagree", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, embeddings: torch.Tensor, head_predictions: torch.Tensor) -> None:
        ncc = torch.cdist(embeddings.to(torch.float64), self.means).argmin(1)
        self.disagree += (ncc != head_predictions.to(ncc.device)).sum()
        self.total += len(ncc)

    def compute(self) -> torch.Tensor:
        return self.disagree / self.total.clamp_min(1)


def neural_collapse(embeddings: torch.Tensor, labels: torch.Tensor, normalize: bool = False,
                    batch_size: int = 8192) -> dict[str, Any]:
    """Convenience: all measures for one labelled set (labels are mapped to 0..C-1)."""
    classes, target = torch.unique(labels, return_inverse=True)
    metric = ClassStatistics(len(classes), embeddings.shape[1], normalize=normalize)
    for start in range(0, len(labels), batch_size):
        metric.update(embeddings[start:start + batch_size], target[start:start + batch_size])
    return metric.compute()


def etf(num_classes: int, dim: int, scale: float = 1.0) -> torch.Tensor:
    """A simplex equiangular tight frame: C unit vectors with pairwise cosine -1/(C-1)."""
    if dim < num_classes - 1:
        raise BenchError(f"a simplex ETF of {num_classes} classes needs dim >= {num_classes - 1}")
    q, _ = torch.linalg.qr(torch.randn(dim, num_classes, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(0)))
    m = math.sqrt(num_classes / (num_classes - 1)) * q @ (
        torch.eye(num_classes, dtype=torch.float64) - torch.full((num_classes, num_classes), 1 / num_classes,
                                                                 dtype=torch.float64))
    return scale * m.T  # (C, dim)
