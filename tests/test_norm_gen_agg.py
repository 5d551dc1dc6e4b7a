"""Each GEN, NORM and AGG option against small hand-computed cases."""

import math

import pytest
import torch

from bench.imprint import StageSpec, agg, gen, norm

G = lambda seed=0: torch.Generator().manual_seed(seed)  # noqa: E731


# ---- NORM ---------------------------------------------------------------------------------
def test_l2_and_none():
    x = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    assert torch.allclose(norm.apply_vector_norm("l2", x, None), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    assert norm.apply_vector_norm("none", x, None) is x


def test_center_l2_subtracts_reference_then_normalises():
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    out = norm.apply_vector_norm("center-l2", x, torch.tensor([1.0, 1.0]))
    r = 1 / math.sqrt(2)
    assert torch.allclose(out, torch.tensor([[r, -r], [-r, r]]))


def test_quantile_maps_ranks_onto_mean_sorted_rows():
    p = torch.tensor([[3.0, 1.0, 2.0], [10.0, 30.0, 20.0]])
    # sorted rows [1,2,3] and [10,20,30] average to [5.5, 11, 16.5]
    expected = torch.tensor([[16.5, 5.5, 11.0], [5.5, 16.5, 11.0]])
    assert torch.allclose(norm.apply_proxy_norm("quantile", p), expected)


def test_quantile_with_external_reference():
    p = torch.tensor([[0.3, -1.0, 7.0]])
    ref = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])  # quantiles [2, 3, 4]
    assert torch.allclose(norm.quantile(p, reference=ref), torch.tensor([[3.0, 2.0, 4.0]]))


def test_quantile_reference_is_independent_of_row_order():
    g = G()
    p = torch.randn(12, 16, generator=g)
    perm = torch.randperm(12, generator=g)
    assert torch.allclose(norm.quantile(p)[perm], norm.quantile(p[perm]))


# ---- GEN ----------------------------------------------------------------------------------
def _batch(*classes):
    x = torch.cat([torch.as_tensor(c, dtype=torch.float32) for c in classes])
    y = torch.cat([torch.full((len(c),), i) for i, c in enumerate(classes)])
    return gen.group_by_class(x, y, torch.arange(len(classes)))


def test_group_by_class_pads_unequal_classes():
    x, mask = _batch([[1.0], [2.0], [3.0]], [[10.0]])
    assert x.shape == (2, 3, 1)
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    assert x[1, 0, 0] == 10.0


def test_mean_ignores_padding():
    x, mask = _batch([[1.0, 0.0], [3.0, 0.0]], [[0.0, 5.0]])
    r = gen.gen_mean(x, mask)
    assert torch.allclose(r.proxies[:, 0], torch.tensor([[2.0, 0.0], [0.0, 5.0]]))


def test_kmeans_finds_two_tight_clusters():
    pts = [[0.0, 0.0], [0.0, 0.2], [10.0, 0.0], [10.0, 0.2], [0.1, 0.1], [10.1, 0.1]]
    x, mask = _batch(pts)
    r = gen.gen_kmeans(x, mask, k=2, rng=0)
    got = sorted(r.proxies[0].tolist())
    assert torch.allclose(torch.tensor(got), torch.tensor([[0.1 / 3, 0.1], [10.1 / 3 + 20 / 3, 0.1]]), atol=1e-5)
    assert r.effective_k.tolist() == [2]


def test_kmeans_with_k_at_least_the_sample_count_uses_every_sample():
    x, mask = _batch([[1.0], [2.0]], [[5.0], [6.0], [7.0], [8.0]])
    r = gen.gen_kmeans(x, mask, k=3, rng=0)
    assert r.effective_k.tolist() == [2, 3]
    assert sorted(r.proxies[0][r.mask[0]].flatten().tolist()) == [1.0, 2.0]


def test_kmedoids_picks_the_central_member_of_each_cluster():
    x, mask = _batch([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])
    r = gen.gen_kmedoids(x, mask, k=2, rng=0)
    assert sorted(r.proxies[0].flatten().tolist()) == [1.0, 11.0]


def test_random_picks_distinct_support_samples_reproducibly():
    pts = [[float(i)] for i in range(10)]
    x, mask = _batch(pts, pts)
    a = gen.gen_random(x, mask, k=4, rng=3)
    b = gen.gen_random(x, mask, k=4, rng=3)
    assert torch.equal(a.proxies, b.proxies)
    vals = a.proxies[0].flatten().tolist()
    assert len(set(vals)) == 4 and set(vals) <= set(range(10))


def test_fps_starts_nearest_the_mean_then_goes_farthest():
    x, mask = _batch([[0.0], [1.0], [9.0], [5.0]])  # mean 3.75 -> 5, then 0, then 9
    r = gen.gen_fps(x, mask, k=3)
    assert r.proxies[0].flatten().tolist() == [5.0, 0.0, 9.0]


def test_all_keeps_every_sample():
    x, mask = _batch([[1.0], [2.0]], [[3.0]])
    r = gen.gen_all(x, mask)
    assert r.effective_k.tolist() == [2, 1]
    assert r.proxies[r.mask].flatten().tolist() == [1.0, 2.0, 3.0]


def test_none_draws_seeded_random_proxies_ignoring_support():
    x, mask = _batch([[1.0, 1.0]] * 3, [[2.0, 2.0]] * 3)
    a = gen.gen_none(x, mask, k=2, rng=1)
    b = gen.gen_none(x * 100, mask, k=2, rng=1)
    c = gen.gen_none(x, mask, k=2, rng=2)
    assert a.proxies.shape == (2, 2, 2)
    assert torch.equal(a.proxies, b.proxies) and not torch.equal(a.proxies, c.proxies)


@pytest.mark.parametrize("per_class, dim", [(8, 5), (50, 200), (80, 150)])
def test_ls_matches_the_closed_form(per_class, dim):
    # (8, 5): feature space, one block; (50, 200): the samples x samples form with its Gram matrix
    # in blocks on two threads; (80, 150): feature space with the blocked Gram matrix
    g = G()
    x = torch.randn(3, per_class, dim, generator=g, dtype=torch.float64)
    x = x + torch.randn(3, 1, dim, generator=g, dtype=torch.float64)
    mask = torch.ones(3, per_class, dtype=torch.bool)
    lam = 0.1
    w = gen.gen_ls(x, mask, lam=lam).proxies[:, 0]
    flat = x.reshape(-1, dim)
    mu = flat.mean(0)
    sigma_t = (flat - mu).T @ (flat - mu) / len(flat)
    second = sigma_t + torch.outer(mu, mu)
    ridge = lam * torch.trace(second) / dim
    expected = (1 / 3) * x.mean(1) @ torch.linalg.inv(second + ridge * torch.eye(dim, dtype=torch.float64))
    assert torch.allclose(w, expected, atol=1e-10)


def test_the_blocked_gram_matrix_is_exactly_symmetric():
    # the oracle factorises the transposed view of its system, which is the system only if so
    a = torch.randn(300, 257, generator=G(), dtype=torch.float64).numpy()
    for m in (a, a.T):
        gram = gen._gram(m)
        assert (gram == gram.T).all()



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ls_takes_every_float_dtype_and_solves_in_float64(dtype):
    # numpy, which widens the support for the CPU solve, has no bfloat16
    g = G()
    x = (torch.randn(3, 8, 5, generator=g) + torch.randn(3, 1, 5, generator=g)).to(dtype)
    mask = torch.ones(3, 8, dtype=torch.bool)
    w = gen.gen_ls(x, mask, lam=0.1).proxies[:, 0]
    exact = gen.gen_ls(x.double(), mask, lam=0.1).proxies[:, 0]  # the same values, widened first
    assert w.dtype == dtype
    assert torch.equal(w, exact.to(dtype))

# ---- AGG ----------------------------------------------------------------------------------
def test_max_takes_each_class_best_proxy():
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.5, 0.0], [2.0, 0.0], [1.0, 5.0]])
    scores = agg.aggregate(StageSpec.parse("agg", "max"), q, p, torch.tensor([0, 0, 1]), 2)
    assert scores.tolist() == [[2.0, 1.0]]


@pytest.mark.parametrize(
    "metric, expected",
    [
        ("euclidean", [5.0, 1.0]),
        ("manhattan", [7.0, 1.0]),
        ("chebyshev", [4.0, 1.0]),
        ("cosine", [1 - 4 / 5, 1 - 1 / math.sqrt(2)]),
    ],
)
def test_distance_metrics(metric, expected):
    q = torch.tensor([[1.0, 1.0]])
    p = torch.tensor([[4.0, 5.0], [1.0, 0.0]])
    # cosine: q=(1,1), p0=(4,5): cos = 9 / (sqrt2 * sqrt41)
    if metric == "cosine":
        expected = [1 - 9 / (math.sqrt(2) * math.sqrt(41)), expected[1]]
    assert torch.allclose(agg.distances(q, p, metric)[0], torch.tensor(expected))


@pytest.mark.parametrize("proxies", [1, 6, 7, 10, 15, 16, 40])
def test_inner_products_and_distances_for_every_proxy_count(proxies):
    # 7-15 proxies run through a product padded to 16 columns: every count must give the plain
    # product's values in the (N, P) shape, and AGGs must read the narrowed matrix correctly
    g = torch.Generator().manual_seed(proxies)
    q, p = torch.randn(33, 24, generator=g), torch.randn(proxies, 24, generator=g)
    dots = agg.inner_products(q, p)
    assert dots.shape == (33, proxies)
    assert torch.allclose(dots, q @ p.T, atol=1e-5)
    shifted = agg.inner_products(q, p, p.pow(2).sum(1), alpha=-2)
    assert torch.allclose(shifted, p.pow(2).sum(1) - 2 * q @ p.T, atol=1e-4)
    assert torch.allclose(agg.distances(q, p, "euclidean"), torch.cdist(q, p), atol=1e-4)
    assert torch.allclose(agg.distances(q, p, "cosine"),
                          1 - torch.nn.functional.cosine_similarity(q[:, None], p[None], dim=-1), atol=1e-5)
    labels = torch.arange(proxies) % 3
    best = torch.stack([(q @ p[labels == c].T).amax(1) if (labels == c).any() else torch.full((33,), -math.inf)
                        for c in range(3)], 1)
    assert torch.allclose(agg.aggregate(StageSpec.parse("agg", "max"), q, p, labels, 3), best, atol=1e-5)
    nearest = labels[torch.cdist(q, p).argmin(1)]
    assert torch.equal(agg.aggregate(StageSpec.parse("agg", "mnn"), q, p, labels, 3).argmax(1), nearest)


def test_a_querys_scores_do_not_depend_on_the_queries_beside_it_or_the_thread_count():
    """Engines score queries in chunks (a tail of a few rows, a DDP share), on 1 or N threads;
    each query's row of every matrix must be the same bits in any chunk and on any thread count
    (MKL uses other kernels for 1-3 queries, for 5-11 on 2 threads, and for one proxy)."""
    g = torch.Generator().manual_seed(11)
    before = torch.get_num_threads()
    try:
        for proxies in (1, 2, 5, 10, 16, 35):
            q, p = torch.randn(40, 96, generator=g), torch.randn(proxies, 96, generator=g)
            for kind in ("dot", "euclidean", "cosine"):
                rows = []
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    full = agg.pair_matrix(kind, q, p)
                    rows.append(full)
                    for start, stop in ((0, 1), (3, 5), (10, 17), (20, 40), (33, 40), (0, 12)):
                        assert torch.equal(agg.pair_matrix(kind, q[start:stop], p), full[start:stop]), \
                            (proxies, kind, threads, start, stop)
                assert torch.equal(rows[0], rows[1]), (proxies, kind)
    finally:
        torch.set_num_threads(before)


def test_mnn_uniform_vote_and_tie_break():
    q = torch.tensor([[0.0]])
    p = torch.tensor([[1.0], [-2.0], [3.0], [-4.0], [10.0]])
    labels = torch.tensor([1, 0, 0, 1, 1])
    # 3 nearest: 1 (class 1), -2 (class 0), 3 (class 0) -> class 0 wins 2 votes to 1
    assert agg.aggregate(StageSpec.parse("agg", "mnn:m=3"), q, p, labels, 2).argmax(1).item() == 0
    # 4 nearest: classes 1,0,0,1 -> tie 2:2, broken by the nearest neighbour (class 1)
    assert agg.aggregate(StageSpec.parse("agg", "mnn:m=4"), q, p, labels, 2).argmax(1).item() == 1


def test_mnn_distance_weighting_changes_the_winner():
    q = torch.tensor([[0.0]])
    p = torch.tensor([[0.1], [1.0], [1.1]])
    labels = torch.tensor([1, 0, 0])
    assert agg.aggregate(StageSpec.parse("agg", "mnn:m=3,weight=uniform"), q, p, labels, 2).argmax(1).item() == 0
    scores = agg.aggregate(StageSpec.parse("agg", "mnn:m=3,weight=distance"), q, p, labels, 2)
    assert scores.argmax(1).item() == 1
    assert torch.allclose(scores[0, 0], torch.tensor(1 / 1.0 + 1 / 1.1), atol=1e-5)
