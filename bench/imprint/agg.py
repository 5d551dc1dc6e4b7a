"""AGG: turn query-proxy similarities into one score per class.

Proxies are a flat (P, D) matrix with ``proxy_labels`` (P,) in 0..C-1, so classes with
different numbers of proxies need no padding here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.errors import BenchError


def agg_max(
    queries: torch.Tensor, proxies: torch.Tensor, proxy_labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Class score = the highest inner product between the query and any of its proxies."""
    sim = queries @ proxies.T  # (N, P)
    if len(proxies) % num_classes == 0:
        k = len(proxies) // num_classes
        grid = torch.arange(num_classes, device=proxy_labels.device).repeat_interleave(k)
        if torch.equal(proxy_labels, grid):  # class-major, k per class: a reshape suffices
            return sim.view(len(queries), num_classes, k).amax(-1)
    out = sim.new_full((len(queries), num_classes), float("-inf"))
    return out.scatter_reduce(1, proxy_labels.expand_as(sim), sim, reduce="amax")


def distances(queries: torch.Tensor, proxies: torch.Tensor, metric: str) -> torch.Tensor:
    """(N, P) distances; smaller is nearer for every metric."""
    if metric == "cosine":
        return 1 - F.normalize(queries, dim=-1) @ F.normalize(proxies, dim=-1).T
    if metric == "euclidean":
        return torch.cdist(queries, proxies)
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
    dist = distances(queries, proxies, metric)
    near_d, near_i = dist.topk(m, dim=1, largest=False)  # ascending by distance
    labels = proxy_labels[near_i]  # (N, m)
    if weight == "uniform":
        votes = torch.ones_like(near_d)
    elif weight == "distance":
        votes = 1.0 / (near_d + 1e-8)
    else:
        raise BenchError(f"unknown mnn weight '{weight}'; known: uniform, distance")
    scores = near_d.new_zeros(len(queries), num_classes).scatter_add_(1, labels, votes)
    if weight == "uniform":
        rank_bonus = (m - torch.arange(m, device=queries.device, dtype=near_d.dtype)) / (m + 1)
        bonus = near_d.new_zeros(len(queries), num_classes).scatter_reduce_(
            1, labels, rank_bonus.expand_as(near_d), reduce="amax"
        )
        scores = scores + bonus
    return scores


def aggregate(
    name: str,
    queries: torch.Tensor,
    proxies: torch.Tensor,
    proxy_labels: torch.Tensor,
    num_classes: int,
    **options,
) -> torch.Tensor:
    if name == "max":
        return agg_max(queries, proxies, proxy_labels, num_classes)
    if name == "mnn":
        return agg_mnn(queries, proxies, proxy_labels, num_classes, **options)
    raise BenchError(f"unknown AGG '{name}'; known: max, mnn")
