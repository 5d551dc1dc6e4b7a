"""Neural collapse (NC1-NC4) and CDNV as torchmetrics Metrics.

:class:`ClassStatistics` accumulates, in float64, what every measure needs: per-class counts,
sums and sums of squared norms, and the total second moment. All are sums, so the states are
reduced across processes with ``dist_reduce_fx="sum"`` and the result is the same on 1 or N
processes. Definitions (C classes, class means mu_c, global mean mu_G = mean of class means):

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
  those terms are subtracted from the squared distance.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from bench.errors import BenchError


class ClassStatistics(Metric):
    """Sufficient statistics of labelled embeddings, summed over batches and processes."""

    full_state_update = False
    higher_is_better = None

    def __init__(self, num_classes: int, dim: int, normalize: bool = False, rtol: float = 1e-6) -> None:
        super().__init__()
        self.num_classes, self.dim, self.normalize, self.rtol = num_classes, dim, normalize, rtol
        f64 = torch.float64
        self.add_state("counts", torch.zeros(num_classes, dtype=f64), dist_reduce_fx="sum")
        self.add_state("sums", torch.zeros(num_classes, dim, dtype=f64), dist_reduce_fx="sum")
        self.add_state("sq_norms", torch.zeros(num_classes, dtype=f64), dist_reduce_fx="sum")
        self.add_state("second", torch.zeros(dim, dim, dtype=f64), dist_reduce_fx="sum")

    def update(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        x = embeddings.detach().to(torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise BenchError(f"embeddings must be (N, {self.dim}), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise BenchError("embeddings contain NaN or Inf; diagnostics need finite values")
        labels = labels.long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise BenchError(f"labels must lie in 0..{self.num_classes - 1}; map class ids first")
        if self.normalize:
            x = F.normalize(x, dim=1)
        self.counts += torch.bincount(labels, minlength=self.num_classes).to(x)
        self.sums.index_add_(0, labels, x)
        self.sq_norms.index_add_(0, labels, (x * x).sum(1))
        self.second += x.T @ x

    def compute(self) -> dict[str, Any]:
        return collapse_from_stats(self.counts, self.sums, self.sq_norms, self.second, self.rtol)


def collapse_from_stats(
    counts: torch.Tensor, sums: torch.Tensor, sq_norms: torch.Tensor, second: torch.Tensor, rtol: float = 1e-6
) -> dict[str, Any]:
    """Every measure from the summed statistics (see the module docstring)."""
    present = counts > 0
    c = int(present.sum())
    if c < 2:
        raise BenchError(f"neural collapse needs at least two classes with samples, got {c}")
    n_c = counts[present]
    mu = sums[present] / n_c[:, None]
    n = n_c.sum()
    mu_g = mu.mean(0)
    centred = mu - mu_g
    sigma_w = (second - (n_c[:, None] * mu).T @ mu) / n
    sigma_b = centred.T @ centred / c
    tr_b = torch.trace(sigma_b)
    if tr_b <= 0:
        raise BenchError("all class means coincide (zero between-class variance); NC1 is undefined")
    nc1 = torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, rtol=rtol, hermitian=True)) / c
    norms = centred.norm(dim=1)
    cos = F.normalize(centred, dim=1) @ F.normalize(centred, dim=1).T
    iu = torch.triu_indices(c, c, 1)
    pair_cos = cos[iu[0], iu[1]]
    var = (sq_norms[present] / n_c - (mu * mu).sum(1)).clamp_min(0)  # E||x - mu_c||^2
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
        "cdnv": _cdnv(mu, var, n_c, unbiased=False),
    }
    singletons = int((n_c < 2).sum())
    if singletons:
        out["cdnv_unbiased"] = float("nan")
        out["undefined"] = {"cdnv_unbiased": f"{singletons} class(es) with one sample have no variance estimate"}
    else:
        out["cdnv_unbiased"] = _cdnv(mu, var * n_c / (n_c - 1), n_c, unbiased=True)
    return out


def _cdnv(mu: torch.Tensor, var: torch.Tensor, n_c: torch.Tensor, unbiased: bool) -> float:
    c = len(mu)
    iu = torch.triu_indices(c, c, 1)
    d2 = ((mu[iu[0]] - mu[iu[1]]) ** 2).sum(1)
    if unbiased:
        d2 = d2 - var[iu[0]] / n_c[iu[0]] - var[iu[1]] / n_c[iu[1]]
    num = var[iu[0]] + var[iu[1]]
    return float((num / (2 * d2.clamp_min(1e-300))).mean())


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
