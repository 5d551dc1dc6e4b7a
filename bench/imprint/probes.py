"""Reference heads that are trained, not imprinted: the logistic-regression linear probe.

``logreg`` is the linear probe of CLIP (Radford et al. 2021) and of most papers that report
few-shot accuracy next to imprinting: multinomial logistic regression on the support set,
fitted by L-BFGS with an L2 penalty of strength ``C`` on the weights (not on the intercept),
which is scikit-learn's ``LogisticRegression(C=C)`` objective

    C * sum_i CE(W x_i + b, y_i) + 0.5 * ||W||^2

(minimised here in scikit-learn's scaling, mean CE + ||W||^2 / (2 C n), which has the same
minimiser). It is gradient-based, so its registry fact ``training_free`` is False and tables
mark its rows. As in CLIP's protocol, ``C`` is chosen on a validation split: with ``c=0`` (the
default) and an episode that holds a validation part, every value of :data:`C_GRID` is fitted
(warm-started, smallest first) and the one with the best validation accuracy is kept (ties: the
smaller C); without a validation part ``C`` is :data:`DEFAULT_C`, scikit-learn's default.

Everything runs in float64 through numpy and scipy's L-BFGS-B with one BLAS thread, from zero
weights, with fixed tolerances (in the samples' row space when they are fewer than the dimensions,
an exact reparametrisation, see :func:`row_space`): the head is the same bits on 1 or N processes and whether it is
built alone or in a grid (a coupled GEN always sees one episode per call).
"""

from __future__ import annotations

import numpy as np
import torch

from bench.imprint.gen import GenContext, GenResult, _one_per_class, blas_threads, class_positions
from bench.imprint.registry import Option, register_gen

C_GRID: tuple[float, ...] = tuple(10.0 ** e for e in range(-3, 5))  # 1e-3 ... 1e4, as CLIP's log-spaced sweep
DEFAULT_C = 1.0  # scikit-learn's default, used when an episode has no validation part
MAX_ITER = 1000
GTOL = 1e-6  # on the gradient of the mean-scaled objective (scikit-learn's default tol is 1e-4)


@register_gen("logreg", coupled=True, linear=True, single_proxy=True, training_free=False,
              options={"c": Option(float, 0.0, minimum=0.0), "max_iter": Option(int, MAX_ITER, minimum=1)},
              summary="logistic-regression linear probe (L-BFGS, L2 strength c on the weights, intercept "
                      "unpenalised); c=0 picks c from 1e-3..1e4 on the episode's validation part, else uses 1; "
                      "gradient-based, not training-free",
              reference="Radford et al. 2021 (CLIP linear probe)")
def gen_logreg(x: torch.Tensor, mask: torch.Tensor, *, ctx: GenContext | None = None, c: float = 0.0,
               max_iter: int = MAX_ITER) -> GenResult:
    counts = mask.sum(1).cpu().numpy()
    flat = x[mask].detach().double().cpu().numpy()
    y = np.repeat(np.arange(len(counts)), counts)
    validation = _validation(ctx, x)
    with blas_threads(1):
        feats, basis = row_space(flat)
        if c > 0:
            w = fit_logreg(feats, y, len(counts), c, max_iter)
        elif validation is None:
            c = DEFAULT_C
            w = fit_logreg(feats, y, len(counts), c, max_iter)
        else:
            val_x, val_y = validation
            w, c = select_c(feats, y, len(counts), val_x if basis is None else val_x @ basis.T, val_y, max_iter)
        if basis is not None:
            w = np.hstack([w[:, :-1] @ basis, w[:, -1:]])
    w = torch.from_numpy(w).to(x.device, x.dtype)
    res = _one_per_class(w[:, :-1], w[:, -1])
    res.chosen = {"c": c}  # the C used, recorded per episode (the rows' `chosen` column)
    return res


def row_space(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """With fewer samples than dimensions, the samples' coordinates in an orthonormal basis of
    their row space, and that basis (rank x dim); else the samples themselves and None.

    The penalised optimum W lies in the row space (every gradient does, from W = 0), and W = Z B
    with orthonormal B keeps both the scores (X W^T = (X B^T) Z^T) and the penalty (||W|| = ||Z||),
    so fitting Z on X B^T is the same problem in rank <= n dimensions: few-shot probes on 1024-dim
    embeddings cost (n x n), not (n x 1024), per L-BFGS step.
    """
    n, d = flat.shape
    if n >= d:
        return flat, None
    _, sv, vt = np.linalg.svd(flat, full_matrices=False)
    rank = int((sv > sv[0] * max(n, d) * np.finfo(flat.dtype).eps).sum()) if len(sv) and sv[0] > 0 else 0
    basis = vt[:max(rank, 1)]
    return flat @ basis.T, basis


def _validation(ctx: GenContext | None, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """The episode's validation samples (after NORM_pre) of the head's classes, as class positions."""
    val = None if ctx is None else getattr(ctx, "validation", None)
    if val is None or len(val[1]) == 0:
        return None
    emb, labels = val
    labels = torch.as_tensor(labels).long().to(ctx.classes.device)
    keep = torch.isin(labels, ctx.classes)
    if not bool(keep.any()):
        return None
    pos = class_positions(ctx.classes, labels[keep], "validation labels")
    return emb[keep.to(emb.device)].detach().double().cpu().numpy(), pos.cpu().numpy()


def select_c(flat: np.ndarray, y: np.ndarray, num_classes: int, val_x: np.ndarray, val_y: np.ndarray,
             max_iter: int = MAX_ITER, grid: tuple[float, ...] = C_GRID) -> tuple[np.ndarray, float]:
    """The fit whose C scores best on the validation samples (ties: the first, smallest C), and that C."""
    best, best_acc, best_c, start = None, -1.0, grid[0], None
    for c in grid:
        w = fit_logreg(flat, y, num_classes, c, max_iter, start)
        acc = float(((val_x @ w[:, :-1].T + w[:, -1]).argmax(1) == val_y).mean())
        if acc > best_acc:
            best, best_acc, best_c = w, acc, c
        start = w  # warm start: the next, weaker penalty begins from this optimum
    return best, best_c


def fit_logreg(flat: np.ndarray, y: np.ndarray, num_classes: int, c: float, max_iter: int = MAX_ITER,
               start: np.ndarray | None = None) -> np.ndarray:
    """(classes, dim + 1) weights with the intercept last, minimising mean CE + ||W||^2 / (2 c n)."""
    from scipy.optimize import minimize

    n, d = flat.shape
    if num_classes < 2:  # one class: every score ties and the class wins; nothing to fit
        return np.zeros((num_classes, d + 1))
    xb = np.hstack([flat, np.ones((n, 1))])
    onehot = np.zeros((n, num_classes))
    onehot[np.arange(n), y] = 1.0
    penalty = np.ones((num_classes, d + 1))
    penalty[:, -1] = 0.0  # the intercept is not penalised
    penalty /= c * n

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta.reshape(num_classes, d + 1)
        logits = xb @ w.T
        top = logits.max(1, keepdims=True)
        shifted = logits - top
        lse = np.log(np.exp(shifted).sum(1, keepdims=True))
        loss = float((lse[:, 0] - (shifted * onehot).sum(1)).mean())
        prob = np.exp(shifted - lse)
        grad = (prob - onehot).T @ xb / n + penalty * w
        return loss + 0.5 * float((penalty * w * w).sum()), grad.ravel()

    theta0 = np.zeros(num_classes * (d + 1)) if start is None else start.ravel().copy()
    res = minimize(objective, theta0, jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "gtol": GTOL, "ftol": 1e-12, "maxcor": 20})
    return res.x.reshape(num_classes, d + 1)
