"""Trained target heads: multinomial logistic regression on a task's whole pool.

These are the heads the generator learns to produce from a few shots, and the upper bound it
is judged against. Many tasks (and several weight decays per task) are fitted at once: the
objective is a sum of independent problems, so one L-BFGS run over the stacked parameters
solves them all; each problem's gradient is its own slice of the joint gradient.

Weight decay is chosen per task on a stratified validation split (lowest validation
negative log-likelihood), then the head is refitted on all of the task's samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.errors import BenchError

WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class LogisticFit:
    weights: torch.Tensor  # (T, C, D)
    bias: torch.Tensor  # (T, C)
    weight_decay: torch.Tensor  # (T,) the value chosen on the validation split
    val_nll: torch.Tensor  # (T, G) validation NLL of every candidate weight decay
    train_accuracy: torch.Tensor  # (T,) of the final head on all of the task's samples
    max_grad: float  # largest gradient entry at the end of the final fit (convergence check)


def stratified_validation_mask(
    y: torch.Tensor, num_classes: int, fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """(T, n) bool: ``fraction`` of each task's class samples (rounded down, at least one
    sample kept for training) go to validation, chosen at random. ``y = -1`` is padding."""
    t, n = y.shape
    keys = torch.rand(t, n, generator=generator, dtype=torch.float64)
    valid = y >= 0
    # Sort each row by (class, random key): a class's samples become one run in random order.
    composite = torch.where(valid, y.double(), float(num_classes)) * 2.0 + keys
    order = composite.argsort(dim=1)
    ys = torch.gather(torch.where(valid, y, num_classes), 1, order)
    counts = F.one_hot(ys, num_classes + 1).sum(1)  # (T, C + 1)
    starts = counts.cumsum(1) - counts
    rank = torch.arange(n).expand(t, n) - torch.gather(starts, 1, ys)
    n_val = (counts.double() * fraction).floor().long().clamp(max=(counts - 1).clamp(min=0))
    is_val_sorted = (rank < torch.gather(n_val, 1, ys)) & (ys < num_classes)
    out = torch.zeros_like(is_val_sorted)
    out.scatter_(1, order, is_val_sorted)
    return out


def _nll(params: torch.Tensor, xa: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-problem weighted mean NLL. params (T, G, C, D+1), xa (T, n, D+1), weight (T, n)."""
    t, g, c, d = params.shape
    logp = torch.bmm(xa, params.reshape(t, g * c, d).transpose(1, 2)).view(t, -1, g, c).log_softmax(-1)
    picked = torch.gather(logp, 3, y.clamp(min=0)[:, :, None, None].expand(-1, -1, g, 1))[..., 0]
    return -(picked * weight[..., None]).sum(1) / weight.sum(-1, keepdim=True).clamp(min=1)


def _lbfgs(params: torch.Tensor, xa, y, weight, wd, max_iter: int) -> tuple[torch.Tensor, float]:
    """Minimise sum over problems of NLL + wd/2 |W|^2 (bias not decayed)."""
    params = params.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([params], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-5,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _nll(params, xa, y, weight).sum() + (wd[..., None, None] / 2 * params[..., :-1].square()).sum()
        loss.backward()
        return loss

    opt.step(closure)
    closure()
    return params.detach(), float(params.grad.abs().max())


def fit_logistic_heads(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    weight_decays: tuple[float, ...] = WEIGHT_DECAYS,
    val_fraction: float = 0.25,
    generator: torch.Generator | None = None,
    max_iter: int = 200,
) -> LogisticFit:
    """Fit one multinomial logistic regression per task.

    ``x`` (T, n, D) are the tasks' samples and ``y`` (T, n) their class positions in
    ``0..num_classes-1`` (``-1`` marks padding, for tasks with fewer samples). ``max_iter``
    bounds the L-BFGS iterations of each of the two fits (candidates, then the refit).
    """
    if x.ndim != 3 or y.shape != x.shape[:2]:
        raise BenchError(f"fit_logistic_heads needs x (T, n, D) and y (T, n); got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    present = F.one_hot(y.clamp(min=0), num_classes).mul((y >= 0)[..., None]).sum(1)
    if (present < 2).any():
        t, c = (present < 2).nonzero()[0].tolist()
        raise BenchError(f"task {t} has {int(present[t, c])} sample(s) of class position {c}; "
                         "a trained head needs at least 2 per class (one for validation)")
    generator = generator or torch.Generator().manual_seed(0)
    x = x.float()
    t, _, d = x.shape
    valid = (y >= 0).float()
    # Centring the features leaves the optimum's weights unchanged (the bias absorbs the shift,
    # and only weights are decayed) but removes the large common component of embeddings, which
    # otherwise makes the problem ill-conditioned and L-BFGS slow.
    centre = (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
    xa = torch.cat([x - centre[:, None], torch.ones_like(x[..., :1])], -1)
    wd = torch.tensor(weight_decays, dtype=torch.float32)
    is_val = stratified_validation_mask(y, num_classes, val_fraction, generator)
    train_w, val_w = valid * (~is_val).float(), valid * is_val.float()

    start = x.new_zeros(t, len(wd), num_classes, d + 1)
    cand, _ = _lbfgs(start, xa, y, train_w, wd.expand(t, -1), max_iter)
    with torch.no_grad():
        val_nll = _nll(cand, xa, y, val_w)
    best = val_nll.argmin(1)
    chosen = wd[best]
    init = cand[torch.arange(t), best][:, None]
    final, max_grad = _lbfgs(init, xa, y, valid, chosen[:, None], max_iter)
    final = final[:, 0]
    with torch.no_grad():
        pred = torch.einsum("tnd,tcd->tnc", xa, final).argmax(-1)
        acc = ((pred == y).float() * valid).sum(1) / valid.sum(1)
    weights = final[..., :-1]
    bias = final[..., -1] - (weights @ centre[..., None])[..., 0]
    return LogisticFit(weights, bias, chosen, val_nll, acc, max_grad)


def canonical_rows(weights: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Heads as rows [w_c, b_c] with the class-mean row removed and unit RMS row norm.

    Adding one vector to every row (and one number to every bias) changes no softmax
    probability, and scaling a head changes no prediction, so this loses nothing a classifier
    decides with; it gives the generator targets on one scale. Returns rows (..., C, D+1) and
    the scale (...,) that was divided out.
    """
    rows = torch.cat([weights, bias[..., None]], -1)
    rows = rows - rows.mean(-2, keepdim=True)
    scale = weights.sub(weights.mean(-2, keepdim=True)).square().sum(-1).mean(-1).sqrt().clamp(min=1e-12)
    return rows / scale[..., None, None], scale
