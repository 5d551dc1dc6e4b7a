"""GEN: turn each class's support embeddings into one or more proxies (registered methods).

All generators take a padded batch ``x`` of shape (C, S, D) with a boolean ``mask`` (C, S)
marking real samples (classes may have different support sizes) and return proxies
(C, K, D) with a proxy mask (C, K). Classes are the batch dimension: there is no Python
loop over classes, so one call serves 10 or 10,000 classes on CPU or GPU.

Randomness comes from :class:`~bench.imprint.sampling.RowRandom` (one CPU generator per
episode), so a seed picks the same samples on any device and process count, and whether a
head is built alone or batched with other episodes.

When a class has no more support samples than the requested k (k-means, k-medoids, random,
fps), every sample becomes its own proxy: the effective k is the sample count, the result
equals ``all`` for that class, and :class:`GenResult.effective_k` records it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from bench.errors import BenchError
from bench.imprint.kmeans import (kmeans_batched, kmeanspp, row_stats, seeding_gram_pays, sq_dist, sq_norms,
                                  support_gram)
from bench.imprint.registry import Option, get, register_gen
from bench.imprint.rows import row_sums
from bench.imprint.sampling import RowRandom, sample_weighted
from bench.imprint.support import Reference


@dataclass
class GenResult:
    proxies: torch.Tensor  # (C, K, D)
    mask: torch.Tensor  # (C, K) bool, True where a proxy exists
    effective_k: torch.Tensor  # (C,) long: proxies per class actually produced
    bias: torch.Tensor | None = None  # (C, K) added to a proxy's inner products (linear heads)
    chosen: dict[str, float] | None = None  # settings a coupled GEN chose itself (logreg's c on validation)


@dataclass(frozen=True)
class GenContext:
    """What a generator may know besides the support values: each row's class id, the
    NORM_pre applied before it, reference statistics, and where the embeddings come from."""

    classes: torch.Tensor  # (C,) the original class id of each row
    norm_pre: str = "none"
    reference: Reference | None = None
    dataset: str | None = None
    backbone: str | None = None  # the backbone's weights fingerprint
    # (embeddings after NORM_pre, labels) of the episode's validation samples, for GENs that choose a
    # setting on them (logreg's C); only coupled GENs get it, as they see one episode per call
    validation: tuple[torch.Tensor, torch.Tensor] | None = None
    # (C, D) text embeddings, one row per row of `classes` (zero-shot and Tip-Adapter GENs)
    text: torch.Tensor | None = None
    # what GEN calls on the same support batch share (see `derived`); the grid keeps one per batch
    memo: dict | None = field(default=None, compare=False, repr=False)

    def derived(self, name: str, fn, x: torch.Tensor) -> torch.Tensor:
        """``fn(x)``, computed once for all GEN calls on the support batch ``x`` that share this
        context's memo (e.g. k-means++'s Gram matrix for every k and every seed of one support)."""
        if self.memo is None:
            return fn(x)
        held = self.memo.get(name)
        if held is None or held[0] is not x:
            held = self.memo[name] = (x, fn(x))
        return held[1]


def class_positions(classes: torch.Tensor, labels: torch.Tensor, what: str = "labels") -> torch.Tensor:
    """Position of each label in the sorted ``classes``; unknown labels are an error."""
    classes = classes.to(labels.device)
    pos = torch.searchsorted(classes, labels.contiguous()).clamp(max=len(classes) - 1)
    if not torch.equal(classes[pos], labels):
        unknown = sorted(set(labels.tolist()) - set(classes.tolist()))
        raise BenchError(f"{what} {unknown} are not among the head's classes {classes.tolist()[:20]}")
    return pos


@dataclass(frozen=True)
class ClassLayout:
    """Where each support sample goes in the padded (C, S, D) batch: computed once per episode
    and shared by every NORM_pre, whose outputs differ only in values."""

    positions: torch.Tensor  # (N,) each sample's class position in ``classes``
    counts: torch.Tensor  # (C,) samples per class
    s_max: int
    balanced: bool  # every class has s_max samples
    order: torch.Tensor | None  # stable class order of the samples; None if already class by class


def class_layout(y: torch.Tensor, classes: torch.Tensor, what: str = "labels") -> ClassLayout:
    """The layout of labels ``y`` over ``classes``; a class without samples is an error."""
    pos = class_positions(classes, y, what)
    counts = torch.bincount(pos, minlength=len(classes))
    if (counts == 0).any():
        empty = classes[counts == 0].tolist()
        raise BenchError(
            f"classes {empty} have no support samples; drop them from the class list or "
            "provide support for them"
        )
    s_max = int(counts.max())
    balanced = bool((counts == s_max).all())
    in_order = balanced and bool((pos[1:] >= pos[:-1]).all())
    return ClassLayout(pos, counts, s_max, balanced, None if in_order else torch.argsort(pos, stable=True))


def group_by_class(
    x: torch.Tensor, y: torch.Tensor, classes: torch.Tensor, layout: ClassLayout | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter flat (N, D) embeddings into a padded (C, S, D) batch, in ``classes`` order.

    Samples keep their input order within a class, so the padded batch is a deterministic
    function of the inputs. ``layout`` (from :func:`class_layout` on the same ``y`` and
    ``classes``) skips recomputing where samples go.
    """
    lay = class_layout(y, classes) if layout is None else layout
    c, s_max = len(classes), lay.s_max
    if lay.balanced:
        # Balanced episodes (the usual case): grouping is a reshape, after a gather unless
        # the samples already come class by class.
        out = (x if lay.order is None else x[lay.order]).reshape(c, s_max, x.shape[-1])
        return out, torch.ones(c, s_max, dtype=torch.bool, device=x.device)
    order, pos = lay.order, lay.positions
    starts = torch.cumsum(lay.counts, 0) - lay.counts
    slot = torch.arange(len(pos), device=pos.device) - starts[pos[order]]
    out = x.new_zeros(c, s_max, x.shape[-1])
    mask = torch.zeros(c, s_max, dtype=torch.bool, device=x.device)
    out[pos[order], slot] = x[order]
    mask[pos[order], slot] = True
    return out, mask


def _finish(
    x: torch.Tensor, mask: torch.Tensor, k: int, proxies: torch.Tensor, pmask: torch.Tensor
) -> GenResult:
    """Swap in the samples themselves for classes with n <= k (effective k = n).

    ``proxies`` has min(k, S) slots and such a class fills its first n <= min(k, S) padded
    slots, so its samples fit exactly.
    """
    small = mask.sum(1) <= k
    if small.any():
        k_pad = proxies.shape[1]
        proxies = torch.where(small[:, None, None], x[:, :k_pad], proxies)
        pmask = torch.where(small[:, None], mask[:, :k_pad], pmask)
    return GenResult(proxies, pmask, pmask.sum(1))


def _one_per_class(proxies: torch.Tensor, bias: torch.Tensor | None = None) -> GenResult:
    ones = torch.ones(len(proxies), 1, dtype=torch.bool, device=proxies.device)
    return GenResult(proxies[:, None], ones, ones.sum(1), None if bias is None else bias[:, None])


def _positive_k(k: int) -> dict[str, Option]:
    return {"k": Option(int, k, minimum=1)}


@register_gen("mean", single_proxy=True, one_sample_identity=True, summary="the class mean",
              reference="Qi et al. 2018")
def gen_mean(x: torch.Tensor, mask: torch.Tensor) -> GenResult:
    return _one_per_class(row_sums(x, mask) / mask.sum(1, keepdim=True).to(x.dtype))


@register_gen("all", sample_proxies=True, summary="every support sample is a proxy (with `max` or "
              "`mnn`: nearest neighbour over the support set)")
def gen_all(x: torch.Tensor, mask: torch.Tensor) -> GenResult:
    return GenResult(x, mask, mask.sum(1))


@register_gen("kmeans", k_option="k",
              simplify=lambda o: ("mean", {}) if o["k"] == 1 else None,
              options={"k": Option(int, minimum=1), "n_init": Option(int, 1, minimum=1),
                       "iters": Option(int, 100, minimum=1)},
              summary="k-means++ then Lloyd per class; k >= the class size is `all`, k = 1 the mean",
              reference="Westerhoff et al. 2025")
def gen_kmeans(x: torch.Tensor, mask: torch.Tensor, *, rng: RowRandom | int, k: int, n_init: int = 1,
               iters: int = 100, ctx: GenContext | None = None) -> GenResult:
    k_run = min(k, x.shape[1])
    gram = stats = None
    if ctx is not None:  # what every k and seed of this support share, computed once
        stats = ctx.derived("kmeans_stats", lambda t: row_stats(t, mask), x)
        if seeding_gram_pays(x.shape[1], x.shape[2], k_run):
            gram = ctx.derived("gram", support_gram, x)
    centres, _, _ = kmeans_batched(x, mask, k_run, n_init=n_init, iters=iters, rng=rng, score=False, gram=gram,
                                   stats=stats)
    pmask = torch.ones(centres.shape[:2], dtype=torch.bool, device=x.device)
    return _finish(x, mask, k, centres, pmask)


@register_gen("kmedoids", k_option="k", sample_proxies=True,
              options={"k": Option(int, minimum=1), "iters": Option(int, 50, minimum=1)},
              summary="alternating k-medoids (euclidean), k-means++ seeded")
def gen_kmedoids(x: torch.Tensor, mask: torch.Tensor, *, rng: RowRandom | int, k: int,
                 iters: int = 50) -> GenResult:
    k_run = min(k, x.shape[1])
    b = len(x)
    rows = torch.arange(b, device=x.device)
    # Pairwise differences rather than the matmul expansion: medoid choice is discrete, and
    # the matmul path rounds differently with the padded batch width.
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # (C, S, S)
    big = torch.finfo(x.dtype).max
    # Seed: the samples nearest to k-means++ centres are medoid candidates.
    seeds = kmeanspp(x, mask, k_run, RowRandom.of(rng, b))
    med = sq_dist(x, seeds).masked_fill(~mask[..., None], big).argmin(1)  # (C, k)
    for _ in range(iters):
        to_med = dist.gather(2, med[:, None, :].expand(-1, dist.shape[1], -1))  # (C, S, k)
        labels = to_med.argmin(-1)
        member = torch.nn.functional.one_hot(labels, k_run).to(x.dtype) * mask[..., None]
        cost = dist @ member  # cost[c, i, j]: sum of distances from i to cluster j
        cost = cost.masked_fill(member == 0, big)
        new = torch.where(member.sum(1) == 0, med, cost.argmin(1))
        if torch.equal(new, med):
            break
        med = new
    proxies = x[rows[:, None], med]
    pmask = torch.ones(proxies.shape[:2], dtype=torch.bool, device=x.device)
    return _finish(x, mask, k, proxies, pmask)


@register_gen("random", k_option="k", sample_proxies=True, options={"k": Option(int, minimum=1)},
              summary="k support samples per class, drawn without replacement")
def gen_random(x: torch.Tensor, mask: torch.Tensor, *, rng: RowRandom | int, k: int) -> GenResult:
    k_run = min(k, x.shape[1])
    rng = RowRandom.of(rng, len(x))
    rows = torch.arange(len(x), device=x.device)
    left = mask.to(x.dtype).clone()
    picks = []
    for _ in range(k_run):  # sequential draws without replacement; k is small
        pick = sample_weighted(left, 1, rng)[:, 0]
        left[rows, pick] = 0
        picks.append(pick)
    idx = torch.stack(picks, 1)
    return _finish(x, mask, k, x[rows[:, None], idx], mask[rows[:, None], idx])


@register_gen("fps", k_option="k", sample_proxies=True, options={"k": Option(int, minimum=1)},
              summary="farthest point sampling from the sample nearest the class mean (deterministic)")
def gen_fps(x: torch.Tensor, mask: torch.Tensor, *, k: int) -> GenResult:
    k_run = min(k, x.shape[1])
    rows = torch.arange(len(x), device=x.device)
    mean = gen_mean(x, mask).proxies
    d_mean = sq_dist(x, mean)[..., 0].masked_fill(~mask, float("inf"))
    chosen = [d_mean.argmin(1)]
    x_sq = sq_norms(x)
    closest = sq_dist(x, x[rows, chosen[0]][:, None], x_sq)[..., 0]
    for _ in range(1, k_run):
        nxt = closest.masked_fill(~mask, -1.0).argmax(1)
        chosen.append(nxt)
        closest = torch.minimum(closest, sq_dist(x, x[rows, nxt][:, None], x_sq)[..., 0])
    idx = torch.stack(chosen, 1)
    return _finish(x, mask, k, x[rows[:, None], idx], mask[rows[:, None], idx])


def _none_problem(spec) -> str | None:
    if spec.norm_pre.name != "none":
        return "'none' draws random proxies, so a NORM_pre before it has no effect"
    return None


@register_gen("none", options=_positive_k(1), problem=_none_problem,
              summary="random proxies that ignore the support: the floor every method must beat")
def gen_none(x: torch.Tensor, mask: torch.Tensor, *, rng: RowRandom | int, k: int = 1) -> GenResult:
    c, _, d = x.shape
    proxies = RowRandom.of(rng, c).randn((k, d), "cpu")
    proxies = (proxies / math.sqrt(d)).to(device=x.device, dtype=x.dtype)
    pmask = torch.ones(c, k, dtype=torch.bool, device=x.device)
    return GenResult(proxies, pmask, pmask.sum(1))


@register_gen("ls", coupled=True, linear=True, single_proxy=True,
              options={"lam": Option(float, 1e-3, above=0.0)},
              summary="least-squares oracle W = (1/C) M (X^T X / n + lam I)^-1, lam relative to the mean "
                      "eigenvalue; not imprinting: every row depends on every class")
def gen_ls(x: torch.Tensor, mask: torch.Tensor, *, lam: float = 1e-3) -> GenResult:
    """Least-squares oracle W = (1/C) M (Sigma_T + mu_G mu_G^T + lambda I)^-1.

    Sigma_T + mu_G mu_G^T is the second moment of all support embeddings, so W is ridge
    regression onto one-hot targets for balanced classes. ``lam`` is relative to the mean
    eigenvalue (trace / dim), so it is scale-free. Everything runs in float64: the Gram matrix
    sums over every support sample, and BLAS splits such long sums across threads, so in the
    input precision the result would depend on how many threads a process has (1 or N
    processes would differ); float64 keeps that rounding far below the float32 result's.
    With fewer support samples than dimensions it is solved in the equal (samples x samples)
    form, which costs far less.
    """
    c = x.shape[0]
    if x.device.type == "cpu":
        flat = x.reshape(-1, x.shape[-1]) if bool(mask.all()) else x[mask]  # balanced: no masked copy
        w = torch.from_numpy(_ls_cpu(_float64(flat), mask.sum(1).numpy(), lam))
    else:
        w = _ls_torch(x[mask].double(), mask, lam)
    return _one_per_class((w / c).to(x.dtype))


def _float64(x: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a C-ordered float64 array, widened by numpy where numpy has the dtype.

    A torch op this large runs on torch's OpenMP threads, which then spin for milliseconds
    waiting for more work; the spinning thread halved the speed of the Gram matrix's second
    thread (see :func:`_gram`). Widening a float is exact either way; numpy has no bfloat16.
    """
    x = x.detach()
    if x.dtype in (torch.float16, torch.float32, torch.float64):  # read only: float64 needs no copy
        return x.numpy().astype(np.float64, order="C", copy=False)
    return x.double().contiguous().numpy()


def _ls_cpu(flat, counts, lam: float):
    """The oracle on CPU through numpy and LAPACK's Cholesky solve, in float64.

    Not torch's linalg: on CPUs where torch's BLAS takes a slow float64 path (MKL on AMD), its
    Gram matrix and LU solve cost 3-4x numpy's ``a.T @ a`` (a symmetric rank-k update, half the
    flops) and a Cholesky solve. The system is symmetric positive definite (a Gram matrix plus a
    positive ridge), so Cholesky is exact here. BLAS runs on one thread: a second BLAS thread
    pool competing with torch's own made the stage 3x slower on 2 cores, and one thread gives
    the same bits whatever the process's thread count. The Gram matrix, most of the work, is
    split in two fixed halves instead (:func:`_gram`), so it still uses two cores.
    """
    from scipy.linalg import cho_factor, cho_solve

    def solve(a, b):  # a is symmetric positive definite: Cholesky, in place
        # a is exactly symmetric (see _gram), so a.T is the same matrix in the column-major order
        # LAPACK works in: no transposing copy (which took longer than the factorisation at d=500)
        return cho_solve(cho_factor(a.T, overwrite_a=True, check_finite=False), b, check_finite=False)

    n, d = flat.shape
    with blas_threads(1):
        ridge = lam * float(np.einsum("ij,ij->", flat, flat)) / n / d + 1e-12
        if n < d:  # the (samples x samples) form, as in _ls_dual
            kernel = _gram(flat.T)
            kernel /= n
            kernel[np.diag_indices(n)] += ridge
            avg = np.zeros((n, len(counts)))
            avg[np.arange(n), np.repeat(np.arange(len(counts)), counts)] = 1.0 / np.repeat(counts, counts)
            return solve(kernel, avg).T @ flat
        if (counts == counts[0]).all():  # balanced (the usual case): a reshape, no segment sums
            means = flat.reshape(len(counts), counts[0], d).mean(1)
        else:
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            means = np.add.reduceat(flat, starts, axis=0) / counts[:, None]
        second = _gram(flat)
        second /= n
        second[np.diag_indices(d)] += ridge
        return solve(second, means.T).T


def _gram(a):
    """``a.T @ a`` for a float64 (n, m) array, as blocks [[A, B], [B^T, C]] over the columns' two
    halves: A and C (symmetric products) here, B (a general product, as many multiply-adds as
    A and C together) on a second thread. numpy's BLAS runs one thread per call (see
    :func:`_ls_cpu`), so this uses two cores without a second BLAS thread pool, and the split
    is fixed, so the bits do not depend on the machine's core count. Small matrices stay whole.
    """
    m = a.shape[1]
    if m < 128:
        return a.T @ a
    h = m // 2
    left, right = a[:, :h], a[:, h:]
    cross = _worker().submit(np.matmul, left.T, right)
    out = np.empty((m, m))
    out[:h, :h] = left.T @ left
    out[h:, h:] = right.T @ right
    b = cross.result()
    out[:h, h:], out[h:, :h] = b, b.T
    return out


def _worker():
    """One background thread for BLAS calls that release the GIL (:func:`_gram`), made anew in
    a forked child, where the parent's thread does not exist and would never run the work."""
    global _WORKER
    import os

    if _WORKER is None or _WORKER[0] != os.getpid():
        from concurrent.futures import ThreadPoolExecutor

        _WORKER = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="bench-blas"))
    return _WORKER[1]


_WORKER = None


def blas_threads(count: int):
    """numpy's and scipy's BLAS limited to ``count`` threads inside the block (threadpoolctl)."""
    global _BLAS
    if _BLAS is None:
        import scipy.linalg  # noqa: F401  (its own BLAS must be loaded to be found)
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=max(1, count), user_api="blas")


_BLAS = None



def _ls_torch(flat: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """The oracle with torch's linalg in float64 (GPUs)."""
    n, d = flat.shape
    # mean eigenvalue of the second moment: its trace (the mean squared norm) over dim
    ridge = lam * float(sq_norms(flat).sum()) / n / d + 1e-12
    if n < d:
        return _ls_dual(flat, mask, ridge)
    counts = mask.sum(1)
    slot = torch.arange(len(mask), device=flat.device).repeat_interleave(counts)
    means = flat.new_zeros(len(mask), d).index_add_(0, slot, flat) / counts[:, None].to(flat.dtype)
    return _ls_primal(flat, means, ridge)


def _ls_primal(flat: torch.Tensor, means: torch.Tensor, ridge: float) -> torch.Tensor:
    """M (X^T X / n + r I)^-1: a (dim x dim) solve."""
    second = flat.T @ flat / len(flat)
    eye = torch.eye(flat.shape[1], dtype=flat.dtype, device=flat.device)
    return torch.linalg.solve(second + ridge * eye, means.T).T


def _ls_dual(flat: torch.Tensor, mask: torch.Tensor, ridge: float) -> torch.Tensor:
    """The same M (X^T X / n + r I)^-1 through (X X^T / n + r I)^-1: an (n x n) solve.

    M = A X, where A averages each class's rows, and X (X^T X/n + r I)^-1 = (X X^T/n + r I)^-1 X.
    """
    n = len(flat)
    counts = mask.sum(1)
    slot = torch.arange(len(mask), device=flat.device).repeat_interleave(counts)
    avg = torch.zeros(len(mask), n, dtype=flat.dtype, device=flat.device)
    avg[slot, torch.arange(n, device=flat.device)] = 1.0 / counts[slot].to(flat.dtype)
    kernel = flat @ flat.T / n
    kernel.diagonal().add_(ridge)
    z = torch.linalg.solve(kernel, avg.T)  # (n, C)
    return z.T @ flat


@register_gen("median", one_sample_identity=True, single_proxy=True,
              options={"kind": Option(str, "coordinate", choices=("coordinate", "geometric")),
                       "iters": Option(int, 200, minimum=1)},
              summary="a robust single proxy: the coordinate-wise median (the mean of the two middle "
                      "values for even counts) or the geometric median (Weiszfeld iterations)")
def gen_median(x: torch.Tensor, mask: torch.Tensor, *, kind: str = "coordinate", iters: int = 200) -> GenResult:
    if kind == "coordinate":
        return _one_per_class(coordinate_median(x, mask))
    return _one_per_class(geometric_median(x, mask, iters))


def coordinate_median(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row and coordinate, the median of the real samples (padding sorts last)."""
    values = x.masked_fill(~mask[..., None], float("inf")).sort(dim=1).values
    n = mask.sum(1)
    lo, hi = ((n - 1) // 2)[:, None, None], (n // 2)[:, None, None]
    d = x.shape[-1]
    return (values.gather(1, lo.expand(-1, 1, d)) + values.gather(1, hi.expand(-1, 1, d)))[:, 0] / 2


def geometric_median(x: torch.Tensor, mask: torch.Tensor, iters: int = 200, tol: float = 1e-7) -> torch.Tensor:
    """The point minimising the summed euclidean distance to a row's samples (Weiszfeld).

    Starts at the mean; each row stops once its step is below ``tol`` times its spread, so a
    row's result does not depend on the other rows of the batch. Weiszfeld only creeps towards
    a median that is itself a sample, so every step also tests the nearest sample with the
    optimality condition (the unit pulls of the other samples sum to at most its multiplicity)
    and stops there exactly when it holds.
    """
    w = mask.to(x.dtype)
    rows = torch.arange(len(x), device=x.device)
    y = row_sums(x, mask) / w.sum(1, keepdim=True)
    spread = ((x - y[:, None]).norm(dim=-1) * w).sum(1) / w.sum(1)
    done = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(iters):
        nearest = x[rows, (x - y[:, None]).norm(dim=-1).masked_fill(~mask, float("inf")).argmin(1)]
        diff = x - nearest[:, None]
        dist = diff.norm(dim=-1)
        same = mask & (dist <= 1e-12 * (1 + spread[:, None]))
        pull = (torch.where(mask & ~same, 1 / dist.clamp_min(1e-300), 0)[..., None] * diff).sum(1).norm(dim=-1)
        is_median = ~done & (pull <= same.sum(1))
        y = torch.where(is_median[:, None], nearest, y)
        done |= is_median
        inv = w / (x - y[:, None]).norm(dim=-1).clamp_min(1e-12 * (1 + spread[:, None]))
        new = row_sums(x, weights=inv) / inv.sum(1, keepdim=True)
        step = (new - y).norm(dim=-1)
        y = torch.where(done[:, None], y, new)
        done |= step <= tol * spread.clamp_min(1e-30)
        if bool(done.all()):
            break
    return y


def _dc_reference(ctx: GenContext | None) -> Reference:
    ref = None if ctx is None else ctx.reference
    if ref is None or ref.class_means is None or ref.class_factors is None:
        raise BenchError("GEN 'dc' calibrates from reference classes: set `reference: base` (a class subset "
                         "of the pool) in the run config, or pass SupportSet(reference=Reference.from_embeddings(...))")
    return ref


@register_gen("dc", needs_reference=True,
              options={"k": Option(int, 1, minimum=1), "nearest": Option(int, 2, minimum=1),
                       "alpha": Option(float, 0.21, minimum=0.0), "samples": Option(int, 750, minimum=0)},
              summary="Distribution Calibration: each support sample borrows the mean and covariance of "
                      "its `nearest` reference classes, features are sampled from the calibrated Gaussians "
                      "(`samples` per class), and the class keeps the mean (k=1) or k k-means proxies of "
                      "support plus samples", reference="Yang et al. 2021")
def gen_dc(x: torch.Tensor, mask: torch.Tensor, *, rng: RowRandom | int, ctx: GenContext | None = None,
           k: int = 1, nearest: int = 2, alpha: float = 0.21, samples: int = 750) -> GenResult:
    """Distribution Calibration (Yang, Liu & Xu 2021, "Free Lunch for Few-shot Learning"), training-free.

    As the published code does: a support sample x's calibrated mean is the mean of x and the
    means of its ``nearest`` reference classes (euclidean), its covariance the mean of theirs
    plus ``alpha`` added to every entry, and each support sample draws ``samples // n`` features
    (n = the class's support size). Sampling uses each reference class's covariance factor F
    (F^T F = Sigma): (1/sqrt(nearest)) sum_j F_j^T e_j + sqrt(alpha) * eta * 1 has exactly the
    calibrated covariance, with no decomposition per support sample.
    """
    ref = _dc_reference(ctx).to(x)
    b = len(ref.class_means)
    if nearest > b:
        raise BenchError(f"dc:nearest={nearest} needs at least that many reference classes; the reference has {b}")
    c, s, d = x.shape
    rng = RowRandom.of(rng, c)
    per_sample = samples // mask.sum(1)  # (C,) draws per support sample, as int(750 / shots)
    draws = int(per_sample.max())
    near = torch.cdist(x, ref.class_means[None].expand(c, -1, -1)).topk(nearest, dim=-1, largest=False).indices
    calibrated = (ref.class_means[near].sum(2) + x) / (nearest + 1)  # (C, S, D)
    if draws == 0:
        aug, amask = x, mask
    else:
        r_max = max(len(f) for f in ref.class_factors)
        eps = rng.randn((s, draws, nearest, r_max), x.device).to(x.dtype)  # (C, S, M, J, R)
        noise = x.new_zeros(c, s, draws, d)
        for bi, factor in enumerate(ref.class_factors):  # one matmul per reference class
            cs, ss, js = (near == bi).nonzero(as_tuple=True)  # each (c, s) names a class at most once
            if len(cs):
                noise.index_put_((cs, ss), eps[cs, ss, :, js, : len(factor)] @ factor, accumulate=True)
        noise /= math.sqrt(nearest)
        if alpha > 0:
            noise = noise + math.sqrt(alpha) * rng.randn((s, draws, 1), x.device).to(x.dtype)
        sampled = (calibrated[:, :, None] + noise).reshape(c, s * draws, d)
        # A real support sample keeps its class's number of draws; padding keeps none.
        used = torch.arange(draws, device=x.device) < per_sample[:, None, None]
        smask = (mask[:, :, None] & used).reshape(c, s * draws)
        aug, amask = torch.cat([x, sampled], 1), torch.cat([mask, smask], 1)
    if k == 1:
        return gen_mean(aug, amask)
    return gen_kmeans(aug, amask, rng=rng, k=k)


def effective_gen(name: str, options: dict, max_count: int) -> tuple[str, dict]:
    """The simplest generator that gives exactly the same proxies, for classes of at most
    ``max_count`` support samples, from the facts each generator declares:

    - ``k_option``: with k >= every class's size, every sample is its own proxy (``all``);
    - ``one_sample_identity``: the proxy of a one-sample class is the sample (``all``);
    - ``simplify``: a generator's own rule, e.g. k-means with k = 1 is the mean.

    :func:`generate` runs the effective generator, and grids use it to build each distinct
    set of proxies once.
    """
    method = get("gen", name)
    if method.k_option is not None and max_count <= options.get(method.k_option, math.inf):
        return "all", {}
    if method.one_sample_identity and max_count == 1:
        return "all", {}
    if method.simplify is not None:
        simpler = method.simplify(options)
        if simpler is not None:
            return effective_gen(*simpler, max_count)
    return name, options


def generate(name: str, x: torch.Tensor, mask: torch.Tensor, rng: RowRandom | int,
             ctx: GenContext | None = None, **options) -> GenResult:
    """Run a GEN stage by name (options as parsed from the method spec), as its
    :func:`effective_gen`."""
    name, options = effective_gen(name, options, x.shape[1])
    method = get("gen", name)
    extra = {}
    if "rng" in method.takes:
        extra["rng"] = rng
    if "ctx" in method.takes:
        extra["ctx"] = ctx
    return method.fn(x, mask, **options, **extra)
