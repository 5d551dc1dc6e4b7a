"""Transferability scores that rank backbones without training, and linear CKA.

- LogME (You et al. 2021): the log marginal likelihood (evidence) of Bayesian linear regression
  from features to each one-hot target column, maximised over the prior precision alpha and
  noise precision beta by the fixed-point iteration, divided by N and averaged over classes.
  Computed from a thin SVD with the (D - r) log(alpha) term for the D - r directions with zero
  singular value, so it is exact also when N < D.
- H-score (Bao et al. 2019), regularised (Ibrahim et al. 2022): tr(Sigma^-1 Sigma_between) with
  Sigma the Ledoit-Wolf shrinkage estimate of the feature covariance.
- NCTI-style score (after Wang et al. 2023): three neural-collapse terms per backbone (within-class
  collapse -log NC1, closeness to a simplex ETF, nearest-centre accuracy), each min-max scaled
  across the backbones compared, then summed. It ranks backbones within one comparison only.
- Linear CKA (Kornblith et al. 2019), with the debiased estimator of Nguyen et al. 2021.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from bench.errors import BenchError


def _check(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = features.to(torch.float64)
    if f.ndim != 2 or len(f) != len(labels):
        raise BenchError(f"features {tuple(f.shape)} and labels {tuple(labels.shape)} do not match")
    if not torch.isfinite(f).all():
        raise BenchError("features contain NaN or Inf")
    classes, y = torch.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise BenchError("transferability scores need at least two classes")
    return f, y


def log_evidence(f: torch.Tensor, y: torch.Tensor, alpha: float, beta: float) -> float:
    """log p(y | F, alpha, beta) of Bayesian linear regression y = F w + noise,
    w ~ N(0, alpha^-1 I), noise ~ N(0, beta^-1 I), via the SVD (exact for any N, D)."""
    n, d = f.shape
    u, s, _ = torch.linalg.svd(f.double(), full_matrices=False)
    s2 = s**2
    z = u.T @ y.double()
    rest = float(y.double() @ y.double() - z @ z)  # part of y outside the column space of F
    denom = alpha + beta * s2
    m2 = float((beta**2 * s2 * z**2 / denom**2).sum())
    res2 = float(((alpha * z / denom) ** 2).sum()) + rest
    logdet = float(torch.log(denom).sum()) + (d - len(s)) * math.log(alpha)
    return (n / 2 * math.log(beta) + d / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi)
            - beta / 2 * res2 - alpha / 2 * m2 - logdet / 2)


def _logme_column(u, s2, y, n, iters=100, tol=1e-5) -> tuple[float, float]:
    """The fixed-point iteration of You et al. 2021 for the evidence-maximising alpha, beta."""
    z = u.T @ y
    rest = float(y @ y - z @ z)
    alpha, beta = 1.0, 1.0
    for _ in range(iters):
        denom = alpha + beta * s2
        gamma = float((beta * s2 / denom).sum())
        m2 = float((beta**2 * s2 * z**2 / denom**2).sum())
        res2 = float(((alpha * z / denom) ** 2).sum()) + rest
        new_alpha = gamma / max(m2, 1e-300)
        new_beta = (n - gamma) / max(res2, 1e-300)
        done = abs(new_alpha - alpha) / alpha < tol and abs(new_beta - beta) / beta < tol
        alpha, beta = new_alpha, new_beta
        if done:
            break
    return alpha, beta


def logme(features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mean over classes of the maximised evidence per sample (higher = more transferable)."""
    f, y = _check(features, labels)
    n = len(f)
    u, s, _ = torch.linalg.svd(f, full_matrices=False)
    s2 = s**2
    evidences, alphas, betas = [], [], []
    for k in range(int(y.max()) + 1):
        col = (y == k).double()
        alpha, beta = _logme_column(u, s2, col, n)
        evidences.append(log_evidence(f, col, alpha, beta) / n)
        alphas.append(alpha)
        betas.append(beta)
    return {"logme": sum(evidences) / len(evidences), "alpha_mean": sum(alphas) / len(alphas),
            "beta_mean": sum(betas) / len(betas)}


def ledoit_wolf(x: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrinkage of the covariance of rows of x towards a scaled identity."""
    from sklearn.covariance import ledoit_wolf as lw

    cov, _ = lw(x.cpu().numpy())
    return torch.from_numpy(cov).to(x)


def h_score(features: torch.Tensor, labels: torch.Tensor, shrinkage: bool = True) -> float:
    """tr(Sigma^-1 Sigma_between); ``shrinkage`` uses the Ledoit-Wolf covariance (regularised)."""
    f, y = _check(features, labels)
    f = f - f.mean(0)
    cov = ledoit_wolf(f) if shrinkage else f.T @ f / len(f)
    c = int(y.max()) + 1
    counts = torch.bincount(y, minlength=c).to(f)
    means = torch.zeros(c, f.shape[1], dtype=f.dtype).index_add_(0, y, f) / counts[:, None]
    between = (means * counts[:, None]).T @ means / len(f)
    return float(torch.trace(torch.linalg.lstsq(cov, between).solution))


def ncc_accuracy(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of the nearest-class-centre rule on the set its centres come from."""
    f, y = _check(features, labels)
    c = int(y.max()) + 1
    counts = torch.bincount(y, minlength=c).to(f)
    means = torch.zeros(c, f.shape[1], dtype=f.dtype).index_add_(0, y, f) / counts[:, None]
    return float((torch.cdist(f, means).argmin(1) == y).double().mean())


def ncti_scores(per_backbone: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Combine NC terms across backbones: each of -log NC1, -(equinorm + max_angle) and the
    nearest-centre accuracy is min-max scaled over the backbones, then the three are summed."""
    names = list(per_backbone)
    if len(names) < 2:
        raise BenchError("NCTI compares backbones: give at least two")
    terms = {
        "collapse": [-math.log(max(per_backbone[b]["nc1"], 1e-300)) for b in names],
        "etf": [-(per_backbone[b]["equinorm"] + per_backbone[b]["max_angle"]) for b in names],
        "ncc": [per_backbone[b]["ncc_accuracy"] for b in names],
    }
    total = dict.fromkeys(names, 0.0)
    for values in terms.values():
        lo, hi = min(values), max(values)
        for b, v in zip(names, values):
            total[b] += (v - lo) / (hi - lo) if hi > lo else 0.0
    return total


def _hsic(k: torch.Tensor, l: torch.Tensor, debiased: bool) -> torch.Tensor:
    n = len(k)
    if not debiased:
        h = torch.eye(n, dtype=k.dtype) - 1.0 / n
        return torch.trace(k @ h @ l @ h) / (n - 1) ** 2
    if n < 4:
        raise BenchError("debiased CKA needs at least 4 samples")
    k = k - torch.diag(torch.diag(k))
    l = l - torch.diag(torch.diag(l))
    ones = torch.ones(n, dtype=k.dtype)
    term = (torch.trace(k @ l) + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (ones @ k @ l @ ones))
    return term / (n * (n - 3))


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> float:
    """Linear CKA between two embeddings of the same samples (rows aligned)."""
    if len(x) != len(y):
        raise BenchError(f"CKA needs the same samples: {len(x)} vs {len(y)} rows")
    x, y = x.to(torch.float64), y.to(torch.float64)
    k, l = x @ x.T, y @ y.T
    hxy, hxx, hyy = _hsic(k, l, debiased), _hsic(k, k, debiased), _hsic(l, l, debiased)
    return float(hxy / torch.sqrt(hxx * hyy))
