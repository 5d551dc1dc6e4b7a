"""AGG: turn query-proxy similarities into one score per class.

Proxies are a flat (P, D) matrix with ``proxy_labels`` (P,) in 0..C-1, so classes with
different numbers of proxies need no padding here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.errors import BenchError
from bench.imprint.spec import StageSpec


def agg_max(
    queries: torch.Tensor, proxies: torch.Tensor, proxy_labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Class score = the highest inner product between the query and any of its proxies."""
    return max_of_similarity(queries @ proxies.T, proxy_labels, num_classes)


def max_of_similarity(sim: torch.Tensor, proxy_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per class, the largest entry of an (N, P) similarity matrix over that class's proxies."""
    n, p = sim.shape
    if p % num_classes == 0:
        k = p // num_classes
        grid = torch.arange(num_classes, device=proxy_labels.device).repeat_interleave(k)
        if torch.equal(proxy_labels, grid):  # class-major, k per class: a reshape suffices
            return sim.view(n, num_classes, k).amax(-1)
    out = sim.new_full((n, num_classes), float("-inf"))
    return out.scatter_reduce(1, proxy_labels.expand_as(sim), sim, reduce="amax")


def distances(queries: torch.Tensor, proxies: torch.Tensor, metric: str) -> torch.Tensor:
    """(N, P) distances; smaller is nearer for every metric."""
    if metric == "cosine":
        return 1 - F.normalize(queries, dim=-1) @ F.normalize(proxies, dim=-1).T
    if metric == "euclidean":
        # ||q||^2 + ||p||^2 - 2 q.p in one matmul, as torch.cdist does for large inputs, but
        # without its fixed overhead, which dominates for a few proxies per class.
        sq = torch.addmm(proxies.pow(2).sum(1), queries, proxies.T, alpha=-2)
        return sq.add_(queries.pow(2).sum(1, keepdim=True)).clamp_min_(0).sqrt_()
    if metric == "manhattan":
        return torch.cdist(queries, proxies, p=1)
    if metric == "chebyshev":
        return torch.cdist(queries, proxies, p=float("inf"))
    raise BenchError(
        f"unknown mnn metric '{metric}'; known: cosine, euclidean, manhattan, chebyshev"
    )


def agg_mnn(
    queries: torch.Tensor,
    proxies: torch.Tensor,
    proxy_labels: torch.Tensor,
    num_classes: int,
    m: int = 1,
    weight: str = "uniform",
    metric: str = "euclidean",
) -> torch.Tensor:
    """Vote among the m nearest proxies.

    ``uniform``: each neighbour gives one vote; ties between classes go to the class whose
    nearest voting proxy ranks first, through a bonus below 1 that never outweighs a vote.
    ``distance``: each neighbour votes 1 / (distance + eps). The returned scores argmax to
    the vote.
    """
    m = min(m, len(proxies))
    near_d, near_i = _nearest(distances(queries, proxies, metric), m, largest=False)
    return vote(near_d, proxy_labels[near_i], num_classes, weight)


def vote(near_d: torch.Tensor, labels: torch.Tensor, num_classes: int, weight: str) -> torch.Tensor:
    """Class scores from the m nearest proxies' distances and classes (N, m), nearest first."""
    m = near_d.shape[1]
    if weight == "uniform":
        votes = torch.ones_like(near_d)
    elif weight == "distance":
        votes = 1.0 / (near_d + 1e-8)
    else:
        raise BenchError(f"unknown mnn weight '{weight}'; known: uniform, distance")
    scores = near_d.new_zeros(len(near_d), num_classes).scatter_add_(1, labels, votes)
    if weight == "uniform":
        rank_bonus = (m - torch.arange(m, device=near_d.device, dtype=near_d.dtype)) / (m + 1)
        bonus = near_d.new_zeros(len(near_d), num_classes).scatter_reduce_(
            1, labels, rank_bonus.expand_as(near_d), reduce="amax"
        )
        scores = scores + bonus
    return scores


# ---- one AGG stage as (matrix it reads, reduction), so heads can share the matrix ----------
def matrix_kind(agg: StageSpec, unit_inputs: bool) -> str:
    """Which (N, P) query-proxy matrix an AGG stage reads.

    ``dot`` (inner products) for ``max``, and for cosine ``mnn`` when queries and proxies are
    already unit rows: then cosine distance is 1 - dot, and such heads share one matrix.
    Otherwise the mnn metric's distance matrix.
    """
    if agg.name == "max":
        return "dot"
    if agg.name == "mnn":
        metric = agg.get("agg", "metric")
        return "dot" if metric == "cosine" and unit_inputs else metric
    raise BenchError(f"unknown AGG '{agg.name}'; known: max, mnn")


def pair_matrix(kind: str, queries: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
    return queries @ proxies.T if kind == "dot" else distances(queries, proxies, kind)


def reduce(
    agg: StageSpec, matrix: torch.Tensor, kind: str, proxy_labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """(N, C) class scores from the matrix :func:`matrix_kind` named."""
    if agg.name == "max":
        return max_of_similarity(matrix, proxy_labels, num_classes)
    m = min(agg.get("agg", "m"), matrix.shape[1])
    if kind == "dot":  # unit cosine: nearest = most similar, distance = 1 - similarity
        near_s, near_i = _nearest(matrix, m, largest=True)
        near_d = 1 - near_s
    else:
        near_d, near_i = _nearest(matrix, m, largest=False)
    return vote(near_d, proxy_labels[near_i], num_classes, agg.get("agg", "weight"))


def _nearest(matrix: torch.Tensor, m: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if m == 1:  # a single reduction is several times cheaper than topk
        values, index = matrix.max(1, keepdim=True) if largest else matrix.min(1, keepdim=True)
        return values, index
    return matrix.topk(m, dim=1, largest=largest)


def aggregate(
    agg: StageSpec,
    queries: torch.Tensor,
    proxies: torch.Tensor,
    proxy_labels: torch.Tensor,
    num_classes: int,
    unit_inputs: bool = False,
) -> torch.Tensor:
    """Run an AGG stage; ``unit_inputs`` says queries and proxies are both l2-normalised."""
    kind = matrix_kind(agg, unit_inputs)
    return reduce(agg, pair_matrix(kind, queries, proxies), kind, proxy_labels, num_classes)
