"""AGG: turn query-proxy similarities into one score per class (registered methods).

Each AGG names the (N, P) query-proxy matrix it reads (``dot`` for inner products, or a
distance metric) and reduces it to (N, C) class scores. Heads whose proxies and query
normalisation agree read one shared matrix (see :func:`bench.imprint.grid.score_heads`).
Proxies are a flat (P, D) matrix with ``proxy_labels`` (P,) in 0..C-1, so classes with
different numbers of proxies need no padding here.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from bench.errors import BenchError
from bench.imprint.registry import Option, get, register_agg
from bench.imprint.spec import StageSpec

METRICS = ("cosine", "euclidean", "manhattan", "chebyshev")


def query_terms(metric: str, queries: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a distance needs from the queries alone: computed once per query set when many
    heads score the same queries (see :func:`bench.imprint.grid.score_heads`)."""
    if metric == "cosine":
        return {"unit": F.normalize(queries, dim=-1)}
    if metric == "euclidean":
        return {"sq": queries.pow(2).sum(1, keepdim=True)}
    return {}


def distances(queries: torch.Tensor, proxies: torch.Tensor, metric: str,
              terms: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """(N, P) distances; smaller is nearer for every metric. ``terms``: :func:`query_terms`."""
    terms = terms if terms is not None else query_terms(metric, queries)
    if metric == "cosine":
        return 1 - inner_products(terms["unit"], F.normalize(proxies, dim=-1))
    if metric == "euclidean":
        # ||q||^2 + ||p||^2 - 2 q.p in one matmul, as torch.cdist does for large inputs, but
        # without its fixed overhead, which dominates for a few proxies per class.
        sq = inner_products(queries, proxies, proxies.pow(2).sum(1), alpha=-2)
        return sq.add_(terms["sq"]).clamp_min_(0).sqrt_()
    if metric == "manhattan":
        return torch.cdist(queries, proxies, p=1)
    if metric == "chebyshev":
        return torch.cdist(queries, proxies, p=float("inf"))
    raise BenchError(f"unknown mnn metric '{metric}'; known: {', '.join(METRICS)}")


def inner_products(queries: torch.Tensor, proxies: torch.Tensor, add: torch.Tensor | None = None,
                   alpha: float = 1.0) -> torch.Tensor:
    """(N, P) ``queries @ proxies.T``, or ``add + alpha * queries @ proxies.T`` with ``add`` (P,).

    On CPU, some small products are padded with zero rows, and the extra rows and columns
    dropped, because MKL computes them with other kernels:
    - fewer than 16 queries: 1-3 queries get other bits than in a larger batch (a query's scores
      would depend on the queries beside it: a chunk's tail, a DDP share), and 5-11 queries bits
      that depend on the thread count (1 or N processes would differ);
    - one proxy: its scores depend on the number of queries (a matrix-vector product);
    - 7 to 15 proxies: 1.2-2.9x slower than 16 (one proxy per class of 10 classes is 10 columns).
    Every product of those shapes is padded the same way, so a head's scores are the same bits
    alone or in a grid, on 1 or 2 threads and in any chunk of queries. (With more threads MKL can
    split a product's sums differently, whatever the shape: 8 threads against 1 changed 88 of 300
    random products' last bits.)
    """
    n, p = len(queries), len(proxies)
    width = _padded_width(p)
    if queries.device.type != "cpu" or (n >= _MIN_QUERIES and width == p):
        return _product(queries, proxies, add, alpha)
    if n < _MIN_QUERIES:
        queries = torch.cat([queries, queries.new_zeros(_MIN_QUERIES - n, queries.shape[1])])
    if width > p:
        proxies = torch.cat([proxies, proxies.new_zeros(width - p, proxies.shape[1])])
        add = None if add is None else torch.cat([add, add.new_zeros(width - p)])
    return _product(queries, proxies, add, alpha)[:n, :p]


def _padded_width(p: int) -> int:
    return 2 if p == 1 else 16 if 7 <= p < 16 else p


def _product(queries, proxies, add, alpha):
    return queries @ proxies.T if add is None else torch.addmm(add, queries, proxies.T, alpha=alpha)


_MIN_QUERIES = 16


def max_of_similarity(sim: torch.Tensor, proxy_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per class, the largest entry of an (N, P) similarity matrix over that class's proxies."""
    n, p = sim.shape
    if p % num_classes == 0:
        k = p // num_classes
        if torch.equal(proxy_labels, class_major(num_classes, k, proxy_labels.device)):
            return sim.view(n, num_classes, k).amax(-1)  # class-major, k per class: a reshape suffices
    out = sim.new_full((n, num_classes), float("-inf"))
    return out.scatter_reduce(1, proxy_labels.expand_as(sim), sim, reduce="amax")


@functools.lru_cache(maxsize=64)
def class_major(num_classes: int, k: int, device: torch.device) -> torch.Tensor:
    """Labels 0,..,0,1,..,1,.. of k proxies per class, class by class. Cached and shared: read
    it, or copy it before handing it out, as a grid scores hundreds of heads with one layout."""
    return torch.arange(num_classes, device=device).repeat_interleave(k)


@register_agg("max", matrix=lambda opts, unit: "dot", linear_ok=True,
              summary="the best inner product over a class's proxies")
def agg_max(matrix: torch.Tensor, kind: str, proxy_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return max_of_similarity(matrix, proxy_labels, num_classes)


@register_agg("lse", matrix=lambda opts, unit: "dot", linear_ok=True,
              options={"t": Option(float, 0.1, above=0.0)},
              summary="a soft max over a class's proxies, t * log sum exp(s / t); t -> 0 is `max`")
def agg_lse(matrix: torch.Tensor, kind: str, proxy_labels: torch.Tensor, num_classes: int,
            t: float = 0.1) -> torch.Tensor:
    # Shift each class by its max before exponentiating, so a small t cannot overflow: then
    # t * log(sum exp((s - m) / t)) + m is exact, and tends to m (= max) as t -> 0.
    top = max_of_similarity(matrix, proxy_labels, num_classes)
    shifted = torch.exp((matrix - top.gather(1, proxy_labels.expand_as(matrix))) / t)
    sums = matrix.new_zeros(top.shape).index_add_(1, proxy_labels, shifted)
    return top + t * torch.log(sums)


def _mnn_matrix(opts: dict, unit_inputs: bool) -> str:
    # On unit queries and unit proxies, cosine distance is 1 - dot: read the shared dot matrix.
    metric = opts["metric"]
    return "dot" if metric == "cosine" and unit_inputs else metric


def _mnn_problem(spec) -> str | None:
    m = spec.agg.get("agg", "m")
    if m > 1 and spec.max_proxies_per_class == 1:
        return f"mnn with m={m} votes over one proxy per class, which only counts ties; use m=1 or a multi-proxy GEN"
    return None


@register_agg("mnn", matrix=_mnn_matrix, problem=_mnn_problem,
              options={"m": Option(int, 1, minimum=1),
                       "weight": Option(str, "uniform", choices=("uniform", "distance")),
                       "metric": Option(str, "euclidean", choices=METRICS)},
              summary="vote among the m nearest proxies (uniform or 1/distance weights); ties go to the "
                      "class whose nearest voting proxy is nearest")
def agg_mnn(matrix: torch.Tensor, kind: str, proxy_labels: torch.Tensor, num_classes: int, m: int = 1,
            weight: str = "uniform", metric: str = "euclidean") -> torch.Tensor:
    m = min(m, matrix.shape[1])
    # unit cosine ("dot"): nearest = most similar, distance = 1 - similarity
    near_d, near_i = _nearest(matrix, m, largest=kind == "dot")
    if kind == "dot" and weight == "distance":  # uniform votes never read the distances
        near_d = 1 - near_d
    return vote(near_d, proxy_labels[near_i], num_classes, weight)


def vote(near_d: torch.Tensor, labels: torch.Tensor, num_classes: int, weight: str) -> torch.Tensor:
    """Class scores from the m nearest proxies' distances and classes (N, m), nearest first.

    ``uniform``: each neighbour gives one vote; ties between classes go to the class whose
    nearest voting proxy ranks first, through a bonus below 1 that never outweighs a vote.
    ``distance``: each neighbour votes 1 / (distance + eps). Only ``distance`` reads ``near_d``'s
    values.
    """
    m = near_d.shape[1]
    if m == 1:  # one voter per query: its vote plus the first-rank bonus 1/2, written directly
        value = 1.5 if weight == "uniform" else 1.0 / (near_d + 1e-8)
        return near_d.new_zeros(len(near_d), num_classes).scatter_(1, labels, value)
    votes = torch.ones_like(near_d) if weight == "uniform" else 1.0 / (near_d + 1e-8)
    scores = near_d.new_zeros(len(near_d), num_classes).scatter_add_(1, labels, votes)
    if weight == "uniform":
        rank_bonus = (m - torch.arange(m, device=near_d.device, dtype=near_d.dtype)) / (m + 1)
        bonus = near_d.new_zeros(len(near_d), num_classes).scatter_reduce_(
            1, labels, rank_bonus.expand_as(near_d), reduce="amax"
        )
        scores = scores + bonus
    return scores


def _nearest(matrix: torch.Tensor, m: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if m == 1:  # a single reduction is several times cheaper than topk
        return matrix.max(1, keepdim=True) if largest else matrix.min(1, keepdim=True)
    return matrix.topk(m, dim=1, largest=largest)


# ---- one AGG stage as (matrix it reads, reduction), so heads can share the matrix ----------
def matrix_kind(agg: StageSpec, unit_inputs: bool) -> str:
    """Which (N, P) query-proxy matrix an AGG stage reads: ``dot`` or a distance metric."""
    return get("agg", agg.name).matrix(agg.kwargs("agg"), unit_inputs)


def pair_matrix(kind: str, queries: torch.Tensor, proxies: torch.Tensor,
                terms: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    return inner_products(queries, proxies) if kind == "dot" else distances(queries, proxies, kind, terms)


def reduce(agg: StageSpec, matrix: torch.Tensor, kind: str, proxy_labels: torch.Tensor,
           num_classes: int) -> torch.Tensor:
    """(N, C) class scores from the matrix :func:`matrix_kind` named."""
    return get("agg", agg.name).fn(matrix, kind, proxy_labels, num_classes, **agg.kwargs("agg"))


def aggregate(agg: StageSpec, queries: torch.Tensor, proxies: torch.Tensor, proxy_labels: torch.Tensor,
              num_classes: int, unit_inputs: bool = False, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Run an AGG stage; ``unit_inputs`` says queries and proxies are both l2-normalised, and
    ``bias`` (P,) is added to a linear head's inner products."""
    kind = matrix_kind(agg, unit_inputs)
    matrix = pair_matrix(kind, queries, proxies)
    if bias is not None:
        matrix = matrix + bias
    return reduce(agg, matrix, kind, proxy_labels, num_classes)


# ---- DINOv2's weighted kNN -----------------------------------------------------------------
def _knn_matrix(opts: dict, unit_inputs: bool) -> str:
    # Cosine similarity of unit rows is their inner product: read the shared dot matrix.
    return "dot" if unit_inputs else "cosine"


@register_agg("knn", matrix=_knn_matrix,
              options={"k": Option(int, 20, minimum=1), "t": Option(float, 0.07, above=0.0)},
              summary="DINOv2's weighted kNN: the k most cosine-similar proxies (k capped by their number) "
                      "vote for their class with softmax(similarity / t) weights",
              reference="Wu et al. 2018; Oquab et al. 2023 (DINOv2)")
def agg_knn(matrix: torch.Tensor, kind: str, proxy_labels: torch.Tensor, num_classes: int, k: int = 20,
            t: float = 0.07) -> torch.Tensor:
    """Per class, the summed softmax(sim / t) weight of its proxies among the query's top k.

    DINOv2's ``KnnModule`` weights each neighbour by exp(sim / t) and normalises over the top k;
    the normalisation is one positive factor per query, so the predicted class is the class with
    the largest sum of exp(sim / t), computed here without overflow.
    """
    sim = matrix if kind == "dot" else 1 - matrix  # cosine distance back to similarity
    top, idx = sim.topk(min(k, sim.shape[1]), dim=1)
    weights = torch.softmax(top / t, dim=1)
    return sim.new_zeros(len(sim), num_classes).scatter_add_(1, proxy_labels[idx], weights)
