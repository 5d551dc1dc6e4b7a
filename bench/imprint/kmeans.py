"""Batched k-means: seeded k-means++ and Lloyd iterations on every row of a padded batch.

A row is one class of one episode: (samples, dim) with a mask of real samples. Rows are
clustered together, but each row stops on its own and draws from its own episode's generator,
so a row's centres do not depend on the other rows in its batch or on how rows are chunked,
as long as the batch's padded width stays the same (padding a row further can change a
product's bits and, through :func:`seeding_gram_pays`, how it is seeded; the grid never
pads an episode beyond its own largest class).
"""

from __future__ import annotations

import math

import torch

from bench.imprint.rows import row_sums
from bench.imprint.sampling import RowRandom, inverse_cdf


def sq_norms(x: torch.Tensor) -> torch.Tensor:
    # vector_norm reduces without materialising x * x, several times faster on large batches.
    return torch.linalg.vector_norm(x, dim=-1).square()


def sq_dist(
    x: torch.Tensor, c: torch.Tensor, x_sq: torch.Tensor | None = None
) -> torch.Tensor:
    """Squared euclidean distances between rows of (B, S, D) and (B, K, D) -> (B, S, K).

    Pass ``x_sq`` (the rows' squared norms) when calling repeatedly on the same ``x``.
    """
    if x_sq is None:
        x_sq = sq_norms(x)
    d = torch.baddbmm(sq_norms(c)[:, None, :], x, c.transpose(1, 2), alpha=-2)
    return d.add_(x_sq[..., None]).clamp_min_(0)


def _kmeanspp_draws(k: int) -> int:
    """Uniforms one row consumes in k-means++ seeding: one for the first centre, then
    ``trials`` per further centre."""
    return 1 + (k - 1) * (2 + int(math.log(k)))


def kmeanspp(
    x: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    rng: RowRandom | torch.Tensor,
    x_sq: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
    nearest: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Greedy k-means++ seeding (as in scikit-learn), batched: returns centres (B, k, D).

    ``nearest=True`` also returns which centre each sample is nearest (B, S), read from the
    distances seeding computes anyway (the earlier centre on a tie), so Lloyd's first
    assignment needs no product of its own.

    ``rng`` may be the uniforms themselves, (B, :func:`_kmeanspp_draws`) float64: a row's
    draws then depend only on its own position in its episode, so rows can be seeded in
    any chunks and give the same centres.
    ``gram`` (B, S, S), the rows' inner products ``x @ x^T``: distances to candidate samples
    are then read from it instead of from a product over ``x`` at every step (see
    :func:`seeding_gram_pays`).
    """
    b, s, _ = x.shape
    x_sq = sq_norms(x) if x_sq is None else x_sq
    trials = 2 + int(math.log(k))
    u = rng if isinstance(rng, torch.Tensor) else rng.rand((_kmeanspp_draws(k),), "cpu")
    u = u.to(x.device)
    rows = torch.arange(b, device=x.device)[:, None]
    x_sq_row = x_sq[:, None, :]

    def to_samples(idx: torch.Tensor) -> torch.Tensor:  # (B, S, T) squared distances to samples idx (B, T)
        if gram is None:
            return sq_dist(x, x[rows, idx], x_sq)
        # the same ||c||^2 - 2 x.c + ||x||^2 as sq_dist, with x.c from the Gram's (symmetric) rows
        # (alpha=2 is exact, so this rounds as subtracting 2 * x.c does, in one pass; only where
        # 2 * x.c overflows, with norms near 1e19, a fused multiply-add keeps it finite)
        near = torch.sub(x_sq.gather(1, idx)[..., None], gram[rows, idx], alpha=2).add_(x_sq_row)
        return near.clamp_min_(0).transpose(1, 2)

    first = inverse_cdf(mask.to(x.dtype), u[:, :1])  # (B, 1)
    chosen = [first]
    closest = to_samples(first)[..., 0] * mask
    owner = torch.zeros(b, s, dtype=torch.long, device=x.device) if nearest else None
    # Padded samples start at distance 0 and distances are clamped at 0, so the minimum
    # keeps them at 0 without masking again; centres are gathered once, at the end.
    for i in range(1, k):
        lo = 1 + (i - 1) * trials
        cand = inverse_cdf(closest, u[:, lo : lo + trials])  # (B, T)
        new_closest = torch.minimum(closest[..., None], to_samples(cand))  # (B, S, T)
        best = new_closest.sum(1).argmin(1, keepdim=True)  # (B, 1)
        chosen.append(cand.gather(1, best))
        now = new_closest.gather(2, best[:, None].expand(b, s, 1))[..., 0]
        if nearest:  # strictly nearer than every earlier centre: this one
            owner.masked_fill_(now < closest, i)
        closest = now
    centres = x[rows, torch.cat(chosen, 1)]
    return (centres, owner) if nearest else centres


def seeding_gram_pays(samples: int, dim: int, k: int) -> bool:
    """Whether k-means++ seeds ``k`` centres from the Gram matrix of rows of ``samples`` x ``dim``.

    Without it, every step reads all samples for a few (``trials``) candidates: thin products
    bound by memory, (k - 1) * trials * S * D multiply-adds per row. The Gram costs S * S * D in
    one product that runs near the machine's peak (on 2 cores: 17 ms for 10 x 500 x 512, against
    16 ms for seeding k=20 directly, 4 ms for k=5), and then each step reads only its
    candidates' rows. So it pays for S up to about 10 * (k - 1) * trials alone, and more when
    several seedings (seeds of one support, several k) share it; S <= D keeps it no larger
    than the data. A fixed rule of the shapes, so a row's centres never depend on whether a
    Gram was shared; S is the padded width, which the grid keeps to the episode's own.
    """
    trials = 2 + int(math.log(k)) if k > 1 else 0
    return samples <= min(dim, 10 * (k - 1) * trials)


def support_gram(x: torch.Tensor) -> torch.Tensor:
    """Each row's inner products (B, S, S), for :func:`kmeanspp` (``gram``)."""
    return x @ x.transpose(1, 2)


def row_stats(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a padded batch, the samples' squared norms (B, S) and the mean per-feature
    variance (B,) that k-means' tolerance is relative to."""
    w = mask.to(x.dtype)
    x_sq = sq_norms(x)
    n = w.sum(1)
    mean = row_sums(x, mask) / n[:, None]
    # mean per-feature variance = (E||x||^2 - ||E x||^2) / D, without another pass over x
    return x_sq, ((x_sq * w).sum(1) / n - sq_norms(mean)).clamp_min(0) / x.shape[-1]


def _lloyd(
    x: torch.Tensor, mask: torch.Tensor, centres: torch.Tensor, iters: int, tol_abs: torch.Tensor,
    first_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Lloyd iterations with a per-row stop, as if every row ran alone.

    A row stops when no assignment changes or its centres move less than ``tol_abs``; its
    centres are final from then on. Once half the rows still in the batch have stopped, they
    leave it, so work shrinks as rows converge while the copy that shrinking costs stays rare.
    ``first_labels`` (B, S): the first assignment, when seeding already knows it.
    """
    k = centres.shape[1]
    final = centres.clone()
    live = torch.arange(len(x), device=x.device)  # the original row of each batch row
    stopped = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    labels = None
    on_cpu = x.device.type == "cpu"  # CUDA sums clusters by a one-hot product, without slots
    slots = _SlotIndex(mask, k) if on_cpu else None
    halted = 0
    for it in range(iters):
        if it == 0 and first_labels is not None:
            new_labels = first_labels
        else:  # ||x||^2 is constant per sample, so the nearest centre needs only ||c||^2 - 2 x.c.
            near = torch.baddbmm(sq_norms(centres)[:, None, :], x, centres.transpose(1, 2), alpha=-2)
            new_labels = near.argmin(-1)
        same = (new_labels == labels).all(1) if labels is not None else torch.zeros_like(stopped)
        if labels is not None and bool((same | stopped).all()):
            # Every running row kept its assignment, so each stops on its current centres (written
            # below): skip the cluster sums, which these rows would discard (usually the last iteration).
            break
        sums, counts = _cluster_sums(x, mask, new_labels, k, slots)
        # unchanged labels: centres are final; an empty cluster keeps its centre
        new = torch.where((counts > 0) & ~same[:, None, None], sums / counts.clamp_min(1), centres)
        done = same | (((new - centres) ** 2).sum((1, 2)) <= tol_abs)
        newly = done & ~stopped
        stopped |= done
        centres, labels = new, new_labels
        before, halted = halted, int(stopped.sum())  # one sync per iteration decides stop, record and shrink
        if halted > before:  # rows that stopped now keep these centres; running rows are written at the end
            final[live[newly]] = new[newly]
        if halted == len(stopped):
            return final
        if 2 * halted >= len(stopped):
            keep = ~stopped
            live, x, mask, centres, labels, tol_abs, stopped = (
                t[keep] for t in (live, x, mask, centres, labels, tol_abs, stopped)
            )
            slots = _SlotIndex(mask, k) if on_cpu else None
            halted = 0
    running = ~stopped  # out of iterations, or all unchanged: the rows still running end where they are
    final[live[running]] = centres[running]
    return final


class _SlotIndex:
    """What :func:`_cluster_sums` needs from the batch's shape and mask alone, made once per
    batch rather than once per Lloyd iteration: each row's first slot and the padding."""

    def __init__(self, mask: torch.Tensor, k: int) -> None:
        b = len(mask)
        self.base = torch.arange(b, device=mask.device)[:, None] * k
        self.padding = ~mask
        self.spare = b * k  # padding goes to this extra slot, dropped after summing


def _cluster_sums(
    x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, k: int, slots: _SlotIndex | None = None
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
    slots = _SlotIndex(mask, k) if slots is None else slots
    slot = (labels + slots.base).masked_fill_(slots.padding, slots.spare).flatten()
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
    gram: torch.Tensor | None = None,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Lloyd's k-means on every row of a padded batch at once.

    Returns (centres (B, k, D), labels (B, S), inertia (B,)), keeping per row the best of
    ``n_init`` k-means++ restarts (1 by default, as scikit-learn's ``n_init='auto'``).
    ``score=False`` skips the final assignment pass and returns None for labels and inertia
    (a single restart needs neither to pick its centres).
    ``tol`` is relative to the mean per-feature variance of each row's data, as in
    scikit-learn; a row also stops once none of its assignments change. Empty clusters keep
    their previous centre.

    Seeding reads the rows' Gram matrix where :func:`seeding_gram_pays`; pass ``gram``
    (:func:`support_gram` of ``x``) and ``stats`` (:func:`row_stats`) to reuse ones computed
    before, e.g. for several k or seeds of one support.

    Rows are clustered in chunks of about ``chunk_elements`` values (default: 2**24 on CPU, 64 MB
    of float32, which bounds the copies while keeping per-op overhead low: on 2 cores, k=20 over
    50 rows of 500 x 512 ran 1.4x faster than in 2**22 chunks; unlimited on GPU).
    Every row's result is independent of how rows of one padded width are chunked or batched.
    """
    b = len(x)
    rng = RowRandom.of(rng, b).repeat(n_init)
    use_gram = seeding_gram_pays(x.shape[1], x.shape[2], k)
    gram = gram if use_gram else None
    if n_init > 1:
        x, mask = x.repeat_interleave(n_init, 0), mask.repeat_interleave(n_init, 0)
        gram = None if gram is None else gram.repeat_interleave(n_init, 0)
        stats = None if stats is None else tuple(t.repeat_interleave(n_init, 0) for t in stats)
    draws = rng.rand((_kmeanspp_draws(k),), "cpu")
    if chunk_elements is None:
        chunk_elements = 1 << 24 if x.device.type == "cpu" else 1 << 62
    step = max(1, chunk_elements // max(1, x.shape[1] * x.shape[2]))
    score = score or n_init > 1
    parts = []
    for i in range(0, len(x), step):
        rows = slice(i, i + step)
        # a Gram not given is computed per chunk, while the chunk is in cache
        chunk_gram = None if not use_gram else support_gram(x[rows]) if gram is None else gram[rows]
        chunk_stats = row_stats(x[rows], mask[rows]) if stats is None else tuple(t[rows] for t in stats)
        parts.append(_kmeans_rows(x[rows], mask[rows], k, draws[rows], iters, tol, score, chunk_gram, chunk_stats))
    cols = list(zip(*parts))
    centres = torch.cat(cols[0])
    labels, inertia = (torch.cat(cols[1]), torch.cat(cols[2])) if score else (None, None)
    if n_init == 1:
        return centres, labels, inertia
    pick = inertia.view(b, n_init).argmin(1) + torch.arange(b, device=x.device) * n_init
    return centres[pick], labels[pick], inertia[pick]


def _kmeans_rows(x, mask, k, draws, iters, tol, score, gram, stats) -> tuple:
    """Seed (from ``gram`` if given), iterate and (if ``score``) score one chunk of rows while
    it is still in cache; ``stats`` is the chunk's :func:`row_stats`."""
    x_sq, variance = stats
    seeds, nearest = kmeanspp(x, mask, k, draws, x_sq, gram, nearest=True)
    centres = _lloyd(x, mask, seeds, iters, tol * variance, nearest)
    if not score:
        return centres, None, None
    best_d, labels = sq_dist(x, centres, x_sq).min(-1)
    return centres, labels, (best_d * mask.to(x.dtype)).sum(1)
