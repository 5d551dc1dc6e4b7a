"""GEN: turn each class's support embeddings into one or more proxies.

All generators take a padded batch ``x`` of shape (C, S, D) with a boolean ``mask`` (C, S)
marking real samples (classes may have different support sizes) and return proxies
(C, K, D) with a proxy mask (C, K). Classes are the batch dimension: there is no Python
loop over classes, so one call serves 10 or 10,000 classes on CPU or GPU.

Randomness comes from :class:`RowRandom`: CPU generators, one per block of rows (one block per
episode when several episodes share a batch), moved to the data's device. So a seed picks
the same samples on CPU and GPU, on any number of processes, and whether a head is built
alone or batched with other episodes.

When a class has no more support samples than the requested k (k-means, k-medoids, random,
fps), every sample becomes its own proxy: the effective k is the sample count, the result
equals ``all`` for that class, and :class:`GenResult.effective_k` records it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bench.errors import BenchError


@dataclass
class GenResult:
    proxies: torch.Tensor  # (C, K, D)
    mask: torch.Tensor  # (C, K) bool, True where a proxy exists
    effective_k: torch.Tensor  # (C,) long: proxies per class actually produced


def class_positions(classes: torch.Tensor, labels: torch.Tensor, what: str = "labels") -> torch.Tensor:
    """Position of each label in the sorted ``classes``; unknown labels are an error."""
    classes = classes.to(labels.device)
    pos = torch.searchsorted(classes, labels.contiguous()).clamp(max=len(classes) - 1)
    if not torch.equal(classes[pos], labels):
        unknown = sorted(set(labels.tolist()) - set(classes.tolist()))
        raise BenchError(f"{what} {unknown} are not among the head's classes {classes.tolist()[:20]}")
    return pos


def group_by_class(
    x: torch.Tensor, y: torch.Tensor, classes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter flat (N, D) embeddings into a padded (C, S, D) batch, in ``classes`` order.

    Samples keep their input order within a class, so the padded batch is a deterministic
    function of the inputs.
    """
    pos = class_positions(classes, y)
    counts = torch.bincount(pos, minlength=len(classes))
    if (counts == 0).any():
        empty = classes[counts == 0].tolist()
        raise BenchError(
            f"classes {empty} have no support samples; drop them from the class list or "
            "provide support for them"
        )
    s_max = int(counts.max())
    if bool((counts == s_max).all()):
        # Balanced episodes (the usual case): grouping is a reshape, after a gather unless
        # the samples already come class by class.
        in_order = bool((pos[1:] >= pos[:-1]).all())
        out = (x if in_order else x[torch.argsort(pos, stable=True)]).reshape(len(classes), s_max, x.shape[-1])
        return out, torch.ones(len(classes), s_max, dtype=torch.bool, device=x.device)
    order = torch.argsort(pos, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(y), device=y.device) - starts[pos[order]]
    out = x.new_zeros(len(classes), s_max, x.shape[-1])
    mask = torch.zeros(len(classes), s_max, dtype=torch.bool, device=x.device)
    out[pos[order], slot] = x[order]
    mask[pos[order], slot] = True
    return out, mask


class RowRandom:
    """Random numbers for a batch whose row blocks belong to independent episodes.

    ``blocks`` is a list of (seed, rows). Each block draws from its own CPU generator, so its
    numbers do not depend on which other blocks share the batch.
    """

    def __init__(self, blocks: list[tuple[int, int]], _generators=None) -> None:
        self.blocks = list(blocks)
        self.generators = _generators or [torch.Generator().manual_seed(int(s)) for s, _ in blocks]

    @classmethod
    def of(cls, rng: RowRandom | int, rows: int) -> RowRandom:
        """Accept a plain int seed for a single-episode batch."""
        return rng if isinstance(rng, RowRandom) else cls([(int(rng), rows)])

    def repeat(self, n: int) -> RowRandom:
        """The same generators for a batch whose rows were ``repeat_interleave``d n times."""
        return RowRandom([(s, r * n) for s, r in self.blocks], self.generators)

    def _draw(self, fn, tail: tuple[int, ...], device) -> torch.Tensor:
        parts = [fn((r, *tail), generator=g, dtype=torch.float64) for (_, r), g in zip(self.blocks, self.generators)]
        return torch.cat(parts).to(device)

    def rand(self, tail: tuple[int, ...], device) -> torch.Tensor:
        return self._draw(torch.rand, tail, device)

    def randn(self, tail: tuple[int, ...], device) -> torch.Tensor:
        return self._draw(torch.randn, tail, device)


def _sample_weighted(weights: torch.Tensor, n: int, rng: RowRandom) -> torch.Tensor:
    """Draw ``n`` indices per row with probability proportional to ``weights`` (B, S)."""
    return _inverse_cdf(weights, rng.rand((n,), weights.device))


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Indices drawn with probability proportional to ``weights`` (B, S) from uniforms (B, n).

    Inverse-CDF sampling with CPU uniforms keeps draws identical across devices. Rows whose
    weights are all zero (every sample already a centre) fall back to the last index;
    callers only hit that when the class has fewer samples than centres, a case handled
    separately.
    """
    cdf = weights.double().cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1:]).contiguous(), right=True)
    return idx.clamp(max=weights.shape[1] - 1)


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    # vector_norm reduces without materialising x * x, several times faster on large batches.
    return torch.linalg.vector_norm(x, dim=-1).square()


def _sq_dist(
    x: torch.Tensor, c: torch.Tensor, x_sq: torch.Tensor | None = None
) -> torch.Tensor:
    """Squared euclidean distances between rows of (B, S, D) and (B, K, D) -> (B, S, K).

    Pass ``x_sq`` (the rows' squared norms) when calling repeatedly on the same ``x``.
    """
    if x_sq is None:
        x_sq = _sq_norms(x)
    d = torch.baddbmm(_sq_norms(c)[:, None, :], x, c.transpose(1, 2), alpha=-2)
    return d.add_(x_sq[..., None]).clamp_min_(0)


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


def gen_mean(x: torch.Tensor, mask: torch.Tensor) -> GenResult:
    w = mask.to(x.dtype)
    # A batched matmul avoids a (C, S, D) temporary, which costs more than the sum itself.
    mean = (w[:, None, :] @ x)[:, 0] / w.sum(1, keepdim=True)
    ones = torch.ones(len(x), 1, dtype=torch.bool, device=x.device)
    return GenResult(mean[:, None], ones, ones.sum(1))


def gen_all(x: torch.Tensor, mask: torch.Tensor) -> GenResult:
    return GenResult(x, mask, mask.sum(1))


def _kmeanspp_draws(k: int) -> int:
    """Uniforms one row consumes in k-means++ seeding: one for the first centre, then
    ``trials`` per further centre."""
    return 1 + (k - 1) * (2 + int(math.log(k)))


def _kmeanspp(
    x: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    rng: RowRandom | torch.Tensor,
    x_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy k-means++ seeding (as in scikit-learn), batched: returns centres (B, k, D).

    ``rng`` may be the uniforms themselves, (B, :func:`_kmeanspp_draws`) float64: a row's
    draws then depend only on its own position in its episode, so rows can be seeded in
    any chunks and give the same centres.
    """
    b, s, _ = x.shape
    x_sq = _sq_norms(x) if x_sq is None else x_sq
    trials = 2 + int(math.log(k))
    u = rng if isinstance(rng, torch.Tensor) else rng.rand((_kmeanspp_draws(k),), "cpu")
    u = u.to(x.device)
    rows = torch.arange(b, device=x.device)
    first = _inverse_cdf(mask.to(x.dtype), u[:, :1])[:, 0]
    centres = [x[rows, first]]
    closest = _sq_dist(x, centres[0][:, None], x_sq)[..., 0] * mask
    for i in range(1, k):
        lo = 1 + (i - 1) * trials
        cand = _inverse_cdf(closest, u[:, lo : lo + trials])  # (B, T)
        d_cand = _sq_dist(x, x[rows[:, None], cand], x_sq)  # (B, S, T)
        new_closest = torch.minimum(closest[..., None], d_cand) * mask[..., None]
        best = new_closest.sum(1).argmin(1)  # (B,)
        centres.append(x[rows, cand[rows, best]])
        closest = new_closest[rows, :, best]
    return torch.stack(centres, 1)


def _lloyd(
    x: torch.Tensor, mask: torch.Tensor, centres: torch.Tensor, iters: int, tol_abs: torch.Tensor
) -> torch.Tensor:
    """Lloyd iterations with a per-row stop, as if every row ran alone.

    A row stops when no assignment changes or its centres move less than ``tol_abs``; its
    centres are final from then on. Once half the rows still in the batch have stopped, they
    leave it, so work shrinks as rows converge while the copy that shrinking costs stays rare.
    """
    k = centres.shape[1]
    final = centres.clone()
    live = torch.arange(len(x), device=x.device)  # the original row of each batch row
    stopped = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    labels = None
    for _ in range(iters):
        # ||x||^2 is constant per sample, so the nearest centre needs only ||c||^2 - 2 x.c.
        near = torch.baddbmm(_sq_norms(centres)[:, None, :], x, centres.transpose(1, 2), alpha=-2)
        new_labels = near.argmin(-1)
        sums, counts = _cluster_sums(x, mask, new_labels, k)
        new = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        same = (new_labels == labels).all(1) if labels is not None else torch.zeros_like(stopped)
        new = torch.where(same[:, None, None], centres, new)  # unchanged labels: centres are final
        done = same | (((new - centres) ** 2).sum((1, 2)) <= tol_abs)
        final[live[~stopped]] = new[~stopped]
        stopped |= done
        centres, labels = new, new_labels
        if bool(stopped.all()):
            break
        if 2 * int(stopped.sum()) >= len(stopped):
            keep = ~stopped
            live, x, mask, centres, labels, tol_abs, stopped = (
                t[keep] for t in (live, x, mask, centres, labels, tol_abs, stopped)
            )
    return final


def _cluster_sums(
    x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the sum (B, k, D) and count (B, k, 1) of the samples assigned to each centre.

    On CPU one index_add pass over the samples, about twice as fast as a one-hot batched
    matmul; it adds each slot's samples in sample order, so a row's sums do not depend on the
    other rows in the batch (padding goes to a spare slot that is dropped). CUDA's index_add
    adds atomically in no fixed order, so there the one-hot matmul keeps results repeatable.
    """
    b, s, d = x.shape
    if x.device.type != "cpu":
        onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype) * mask[..., None]
        return onehot.transpose(1, 2) @ x, onehot.sum(1)[..., None]
    slot = labels + torch.arange(b, device=x.device)[:, None] * k
    slot = slot.masked_fill(~mask, b * k).flatten()
    sums = x.new_zeros(b * k + 1, d).index_add_(0, slot, x.reshape(b * s, d))
    counts = torch.bincount(slot, minlength=b * k + 1).to(x.dtype)
    return sums[:-1].view(b, k, d), counts[:-1].view(b, k, 1)


def kmeans_batched(
    x: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    *,
    n_init: int = 1,
    iters: int = 100,
    tol: float = 1e-4,
    rng: RowRandom | int,
    chunk_elements: int | None = None,
    score: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Lloyd's k-means on every row of a padded batch at once.

    Returns (centres (B, k, D), labels (B, S), inertia (B,)), keeping per row the best of
    ``n_init`` k-means++ restarts (1 by default, as scikit-learn's ``n_init='auto'``).
    ``score=False`` skips the final assignment pass and returns None for labels and inertia
    (a single restart needs neither to pick its centres).
    ``tol`` is relative to the mean per-feature variance of each row's data, as in
    scikit-learn; a row also stops once none of its assignments change. Empty clusters keep
    their previous centre.

    Rows are clustered in chunks of about ``chunk_elements`` values (default: 2**22 on CPU,
    where a chunk that stays in cache is faster than one large batch; unlimited on GPU).
    Every row's result is independent of how rows are chunked or batched.
    """
    b = len(x)
    rng = RowRandom.of(rng, b).repeat(n_init)
    if n_init > 1:
        x, mask = x.repeat_interleave(n_init, 0), mask.repeat_interleave(n_init, 0)
    draws = rng.rand((_kmeanspp_draws(k),), "cpu")
    if chunk_elements is None:
        chunk_elements = 1 << 22 if x.device.type == "cpu" else 1 << 62
    step = max(1, chunk_elements // max(1, x.shape[1] * x.shape[2]))
    score = score or n_init > 1
    parts = [
        _kmeans_rows(x[i : i + step], mask[i : i + step], k, draws[i : i + step], iters, tol, score)
        for i in range(0, len(x), step)
    ]
    cols = list(zip(*parts))
    centres = torch.cat(cols[0])
    labels, inertia = (torch.cat(cols[1]), torch.cat(cols[2])) if score else (None, None)
    if n_init == 1:
        return centres, labels, inertia
    pick = inertia.view(b, n_init).argmin(1) + torch.arange(b, device=x.device) * n_init
    return centres[pick], labels[pick], inertia[pick]


def _kmeans_rows(x, mask, k, draws, iters, tol, score) -> tuple:
    """Seed, iterate and (if ``score``) score one chunk of rows while it is still in cache."""
    w = mask.to(x.dtype)
    x_sq = _sq_norms(x)
    n = w.sum(1)
    mean = (w[:, None, :] @ x)[:, 0] / n[:, None]
    # mean per-feature variance = (E||x||^2 - ||E x||^2) / D, without another pass over x
    tol_abs = tol * ((x_sq * w).sum(1) / n - _sq_norms(mean)).clamp_min(0) / x.shape[-1]
    centres = _lloyd(x, mask, _kmeanspp(x, mask, k, draws, x_sq), iters, tol_abs)
    if not score:
        return centres, None, None
    best_d, labels = _sq_dist(x, centres, x_sq).min(-1)
    return centres, labels, (best_d * w).sum(1)


def gen_kmeans(
    x: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    *,
    rng: RowRandom | int,
    n_init: int = 1,
    iters: int = 100,
) -> GenResult:
    k_run = min(k, x.shape[1])
    centres, _, _ = kmeans_batched(x, mask, k_run, n_init=n_init, iters=iters, rng=rng, score=False)
    pmask = torch.ones(centres.shape[:2], dtype=torch.bool, device=x.device)
    return _finish(x, mask, k, centres, pmask)


def gen_kmedoids(
    x: torch.Tensor, mask: torch.Tensor, k: int, *, rng: RowRandom | int, iters: int = 50
) -> GenResult:
    """Alternating (Voronoi-iteration) k-medoids with euclidean distance, k-means++ seeded."""
    k_run = min(k, x.shape[1])
    b = len(x)
    rows = torch.arange(b, device=x.device)
    # Pairwise differences rather than the matmul expansion: medoid choice is discrete, and
    # the matmul path rounds differently with the padded batch width.
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # (C, S, S)
    big = torch.finfo(x.dtype).max
    # Seed: the samples nearest to k-means++ centres are medoid candidates.
    seeds = _kmeanspp(x, mask, k_run, RowRandom.of(rng, b))
    med = _sq_dist(x, seeds).masked_fill(~mask[..., None], big).argmin(1)  # (C, k)
    for _ in range(iters):
        to_med = dist.gather(2, med[:, None, :].expand(-1, dist.shape[1], -1))  # (C, S, k)
        labels = to_med.argmin(-1)
        member = torch.nn.functional.one_hot(labels, k_run).to(x.dtype) * mask[..., None]
        cost = dist @ member  # cost[c, i, j]: sum of distances from i to cluster j
        cost = cost.masked_fill(member == 0, big)
        new = cost.argmin(1)
        empty = member.sum(1) == 0
        new = torch.where(empty, med, new)
        if torch.equal(new, med):
            break
        med = new
    proxies = x[rows[:, None], med]
    pmask = torch.ones(proxies.shape[:2], dtype=torch.bool, device=x.device)
    return _finish(x, mask, k, proxies, pmask)


def gen_random(
    x: torch.Tensor, mask: torch.Tensor, k: int, *, rng: RowRandom | int
) -> GenResult:
    """k support samples per class, drawn uniformly without replacement."""
    k_run = min(k, x.shape[1])
    rng = RowRandom.of(rng, len(x))
    rows = torch.arange(len(x), device=x.device)
    left = mask.to(x.dtype).clone()
    picks = []
    for _ in range(k_run):  # sequential draws without replacement; k is small
        pick = _sample_weighted(left, 1, rng)[:, 0]
        left[rows, pick] = 0
        picks.append(pick)
    idx = torch.stack(picks, 1)
    proxies = x[rows[:, None], idx]
    return _finish(x, mask, k, proxies, mask[rows[:, None], idx])


def gen_fps(x: torch.Tensor, mask: torch.Tensor, k: int) -> GenResult:
    """Farthest point sampling, starting from the sample nearest to the class mean.

    Deterministic: the start point is defined by the data, not drawn.
    """
    k_run = min(k, x.shape[1])
    rows = torch.arange(len(x), device=x.device)
    mean = gen_mean(x, mask).proxies
    d_mean = _sq_dist(x, mean)[..., 0].masked_fill(~mask, float("inf"))
    chosen = [d_mean.argmin(1)]
    x_sq = _sq_norms(x)
    closest = _sq_dist(x, x[rows, chosen[0]][:, None], x_sq)[..., 0]
    for _ in range(1, k_run):
        nxt = closest.masked_fill(~mask, -1.0).argmax(1)
        chosen.append(nxt)
        closest = torch.minimum(closest, _sq_dist(x, x[rows, nxt][:, None], x_sq)[..., 0])
    idx = torch.stack(chosen, 1)
    proxies = x[rows[:, None], idx]
    return _finish(x, mask, k, proxies, mask[rows[:, None], idx])


def gen_none(
    x: torch.Tensor, mask: torch.Tensor, k: int = 1, *, rng: RowRandom | int
) -> GenResult:
    """Random-init proxies, ignoring the support: the floor every method must beat."""
    c, _, d = x.shape
    proxies = RowRandom.of(rng, c).randn((k, d), "cpu")
    proxies = (proxies / math.sqrt(d)).to(device=x.device, dtype=x.dtype)
    pmask = torch.ones(c, k, dtype=torch.bool, device=x.device)
    return GenResult(proxies, pmask, pmask.sum(1))


def gen_ls(x: torch.Tensor, mask: torch.Tensor, lam: float = 1e-3) -> GenResult:
    """Least-squares oracle W = (1/C) M (Sigma_T + mu_G mu_G^T + lambda I)^-1.

    Sigma_T + mu_G mu_G^T is the second moment of all support embeddings, so W is ridge
    regression onto one-hot targets for balanced classes. Not imprinting: every row depends
    on every class. ``lam`` is relative to the mean eigenvalue (trace / dim), so it is
    scale-free. Solved in float64, in the (dim x dim) form or, with fewer support samples
    than dimensions, in the equal (samples x samples) form, which costs far less.
    """
    c, _, d = x.shape
    flat = x[mask]
    n = len(flat)
    # mean eigenvalue of the second moment: its trace (the mean squared norm) over dim
    ridge = lam * float(_sq_norms(flat).double().sum()) / n / d + 1e-12
    if n < d:
        w = _ls_dual(flat, mask, ridge)
    else:
        w = _ls_primal(flat, gen_mean(x, mask).proxies[:, 0], ridge)
    ones = torch.ones(c, 1, dtype=torch.bool, device=x.device)
    return GenResult((w / c).to(x.dtype)[:, None], ones, ones.sum(1))


def _ls_primal(flat: torch.Tensor, means: torch.Tensor, ridge: float) -> torch.Tensor:
    """M (X^T X / n + r I)^-1: a (dim x dim) solve."""
    # The Gram matrix in the input precision (the costly part), the solve in float64.
    second = (flat.T @ flat).double() / len(flat)
    eye = torch.eye(flat.shape[1], dtype=torch.float64, device=flat.device)
    return torch.linalg.solve(second + ridge * eye, means.double().T).T


def _ls_dual(flat: torch.Tensor, mask: torch.Tensor, ridge: float) -> torch.Tensor:
    """The same M (X^T X / n + r I)^-1 through (X X^T / n + r I)^-1: an (n x n) solve.

    M = A X, where A averages each class's rows, and X (X^T X/n + r I)^-1 = (X X^T/n + r I)^-1 X.
    """
    n = len(flat)
    counts = mask.sum(1)
    slot = torch.arange(len(mask), device=flat.device).repeat_interleave(counts)
    avg = torch.zeros(len(mask), n, dtype=torch.float64, device=flat.device)
    avg[slot, torch.arange(n, device=flat.device)] = 1.0 / counts[slot].double()
    kernel = (flat @ flat.T).double() / n
    kernel.diagonal().add_(ridge)
    z = torch.linalg.solve(kernel, avg.T)  # (n, C)
    return z.T @ flat.double()


# Generators whose proxies are support samples themselves (so they keep the samples' norm).
SAMPLE_GENS = frozenset({"all", "random", "fps", "kmedoids"})
# Generators that draw random numbers: the episode's seed is one of their inputs.
SEEDED_GENS = frozenset({"kmeans", "kmedoids", "random", "none"})


def effective_gen(name: str, options: dict, max_count: int) -> tuple[str, dict]:
    """The simplest generator that gives exactly the same proxies, for classes of at most
    ``max_count`` support samples.

    - kmeans, kmedoids, random or fps with k >= every class's size: every sample is its own
      proxy, which is ``all`` (effective k = the class size).
    - kmeans with k = 1: the mean, the optimum that Lloyd's first update reaches from any start.
    - the mean of one sample: the sample, which is ``all``.

    :func:`generate` runs the effective generator, and grids use it to build each distinct
    set of proxies once.
    """
    k = options.get("k")
    if name in ("kmeans", "kmedoids", "random", "fps") and max_count <= k:
        return "all", {}
    if name == "kmeans" and k == 1:
        return "mean", {}
    if name == "mean" and max_count == 1:
        return "all", {}
    return name, options


def generate(
    name: str, x: torch.Tensor, mask: torch.Tensor, rng: RowRandom | int, **options
) -> GenResult:
    """Run a GEN stage by name (options as parsed from the method spec), as its
    :func:`effective_gen`."""
    name, options = effective_gen(name, options, x.shape[1])
    if name == "mean":
        return gen_mean(x, mask)
    if name == "all":
        return gen_all(x, mask)
    if name == "kmeans":
        return gen_kmeans(x, mask, rng=rng, **options)
    if name == "kmedoids":
        return gen_kmedoids(x, mask, rng=rng, **options)
    if name == "random":
        return gen_random(x, mask, rng=rng, **options)
    if name == "fps":
        return gen_fps(x, mask, **options)
    if name == "none":
        return gen_none(x, mask, rng=rng, **options)
    if name == "ls":
        return gen_ls(x, mask, **options)
    raise BenchError(
        f"unknown GEN '{name}'; known: mean, kmeans, kmedoids, random, fps, all, none, ls"
    )
