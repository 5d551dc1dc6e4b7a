"""Transferability scores that rank backbones without training, and linear CKA.

- LogME (You et al. 2021): the log marginal likelihood (evidence) of Bayesian linear regression
  from features to each one-hot target column, maximised over the prior precision alpha and
  noise precision beta by the fixed-point iteration, divided by N and averaged over classes.
  The evidence is log N(y; 0, F F^T / alpha + I / beta), computed from a thin SVD of F (rank r,
  so exact also when N < D) in the variances a = 1/alpha and nu = 1/beta, where it stays finite
  at the two edges the iteration can run to: beta -> inf (nu = 0, noise-free regression; only
  when r = N, i.e. N <= D and every target is fitted exactly, as with separable classes) and
  alpha -> inf (a = 0, zero weights; the target is pure noise). On each edge the evidence has a
  closed-form maximum; LogME is the largest of the iteration's value and those two, and
  ``logme`` counts the classes that ended on an edge (``noise_free_classes``,
  ``zero_weight_classes``), where the reported alpha or beta is inf.
- H-score (Bao et al. 2019), regularised as published by Ibrahim et al. 2022:
  tr(cov_alpha(f)^-1 (1 - alpha) cov(E[f | y])) with cov_alpha the Ledoit-Wolf estimate (1/N
  moments) shrunk by alpha towards a scaled identity, and cov(E[f | y]) the covariance of each
  sample's class mean over N - 1. The (1 - alpha) factor matters when backbones are compared:
  their shrinkage differs, and without it the ranking can reverse.
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


def _thin_svd(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U and the singular values of F, dropping those below numpy's matrix-rank tolerance."""
    u, s, _ = torch.linalg.svd(f, full_matrices=False)
    if not s.numel():
        return u, s
    keep = s > s.max() * max(f.shape) * torch.finfo(f.dtype).eps
    return u[:, keep], s[keep]


def _project(u: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z = U^T y and |y - U z|^2 per column (exactly 0 when U spans R^N: no rounding left over)."""
    z = u.T @ y
    if u.shape[1] == u.shape[0]:
        return z, torch.zeros(y.shape[1:], dtype=y.dtype)
    return z, ((y - u @ z) ** 2).sum(0)


def _evidence(s2: torch.Tensor, z: torch.Tensor, rest: float, n: int, a: float, nu: float) -> float:
    """log N(y; 0, a F F^T + nu I) from the SVD of F (s2 = squared singular values, z = U^T y,
    rest = part of |y|^2 outside the column space); -inf where that Gaussian is degenerate."""
    r = len(s2)
    var = a * s2 + nu
    if (var <= 0).any() or (nu <= 0 and r < n):
        return -math.inf
    logdet = float(torch.log(var).sum()) + ((n - r) * math.log(nu) if r < n else 0.0)
    quad = float((z**2 / var).sum()) + (rest / nu if r < n else 0.0)
    return -0.5 * (n * math.log(2 * math.pi) + logdet + quad)


def log_evidence(f: torch.Tensor, y: torch.Tensor, alpha: float, beta: float) -> float:
    """log p(y | F, alpha, beta) of Bayesian linear regression y = F w + noise,
    w ~ N(0, alpha^-1 I), noise ~ N(0, beta^-1 I), via the SVD (exact for any N, D).
    ``alpha`` or ``beta`` may be ``math.inf`` (zero weights, or no noise)."""
    if not (alpha > 0 and beta > 0):
        raise BenchError(f"evidence needs alpha > 0 and beta > 0, got alpha={alpha}, beta={beta}")
    f, y = f.double(), y.double()
    u, s = _thin_svd(f)
    z, rest = _project(u, y[:, None])
    return _evidence(s**2, z[:, 0], float(rest[0]), len(f), 1.0 / alpha, 1.0 / beta)


def _close(new: float, old: float, tol: float) -> bool:
    return abs(new - old) <= tol * max(abs(new), abs(old))


def _logme_column(s2: torch.Tensor, z: torch.Tensor, rest: float, n: int, iters: int = 100,
                  tol: float = 1e-5) -> tuple[float, float, float]:
    """Evidence, alpha and beta at the maximum found by the fixed-point iteration of You et al.
    2021 (alpha = gamma / m2, beta = (N - gamma) / res2, written in a = 1/alpha, nu = 1/beta so
    that neither overflows), compared with the closed-form maxima on the edges nu = 0 and a = 0."""
    r = len(s2)
    z2 = z**2
    a, nu = 1.0, 1.0
    for _ in range(iters):
        var = a * s2 + nu
        gamma = float((a * s2 / var).sum())
        m2 = float((a**2 * s2 * z2 / var**2).sum())
        res2 = float((nu**2 * z2 / var**2).sum()) + rest
        # N - gamma summed term by term: 1 - a s^2 / var cancels to nothing as nu -> 0.
        n_minus_gamma = (n - r) + float((nu / var).sum())
        new_a = m2 / gamma if gamma > 0 else 0.0
        new_nu = res2 / n_minus_gamma if n_minus_gamma > 0 else 0.0
        done = _close(new_a, a, tol) and _close(new_nu, nu, tol)
        a, nu = new_a, new_nu
        if done or (a == 0.0 and nu == 0.0):
            break
    candidates = [(a, nu), (0.0, (float(z2.sum()) + rest) / n)]  # the a = 0 edge: y ~ N(0, nu I)
    if r == n:  # the nu = 0 edge: y ~ N(0, a F F^T), defined only when F F^T is invertible
        candidates.append((float((z2 / s2).sum()) / n, 0.0))
    evidence, a, nu = max((_evidence(s2, z, rest, n, ca, cn), ca, cn) for ca, cn in candidates)
    return evidence, (1.0 / a if a > 0 else math.inf), (1.0 / nu if nu > 0 else math.inf)


def logme(features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mean over classes of the maximised evidence per sample (higher = more transferable)."""
    f, y = _check(features, labels)
    n = len(f)
    u, s = _thin_svd(f)
    targets = torch.nn.functional.one_hot(y).double()
    z, rest = _project(u, targets)
    columns = [_logme_column(s**2, z[:, k], float(rest[k]), n) for k in range(targets.shape[1])]
    evidences, alphas, betas = zip(*columns)
    return {"logme": sum(evidences) / len(evidences) / n, "alpha_mean": sum(alphas) / len(alphas),
            "beta_mean": sum(betas) / len(betas),
            "noise_free_classes": sum(b == math.inf for b in betas),
            "zero_weight_classes": sum(a == math.inf for a in alphas)}


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Ledoit-Wolf covariance of the rows of x (1/N moments) and its shrinkage alpha towards a
    scaled identity."""
    from sklearn.covariance import ledoit_wolf as lw

    cov, alpha = lw(x.cpu().numpy())
    return torch.from_numpy(cov).to(x), float(alpha)


def h_score(features: torch.Tensor, labels: torch.Tensor, shrinkage: bool = True) -> float:
    """tr(cov(f)^-1 cov(E[f | y])); ``shrinkage`` gives the regularised H-score of Ibrahim et al.
    2022 (Ledoit-Wolf covariance, between-class covariance scaled by 1 - alpha)."""
    f, y = _check(features, labels)
    n = len(f)
    f = f - f.mean(0)
    c = int(y.max()) + 1
    counts = torch.bincount(y, minlength=c).to(f)
    means = torch.zeros(c, f.shape[1], dtype=f.dtype).index_add_(0, y, f) / counts[:, None]
    # Covariance of each sample's class mean (their mean is 0: f is centred), over N - 1 as published.
    between = (means * counts[:, None]).T @ means / (n - 1)
    if shrinkage:
        cov, alpha = ledoit_wolf(f)
        between = (1 - alpha) * between
    else:
        cov = f.T @ f / (n - 1)
    return float(torch.trace(torch.linalg.pinv(cov, hermitian=True) @ between))


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
