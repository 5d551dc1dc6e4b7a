"""Grids of heads: shared stages are computed once and change no number."""

import pytest
import torch

from bench.data.synthetic import gaussian_mixture
from bench.imprint import SupportSet, build_head, build_head_grid, expand_grid, score_heads
from bench.imprint import agg, gen, kmeans, sampling
from bench.imprint.spec import StageSpec

GRID = [
    "qi2018", "hosoda2024", "janson2022", "westerhoff2025", "simpleshot", "ncm", "knn", "ls-oracle",
    "l2/kmeans:k=[1,5]/l2/l2/max", "l2/all/l2/l2/max", "l2/fps:k=3/l2/l2/mnn:m=3,metric=cosine",
    "center-l2/random:k=2/l2/center-l2/mnn:m=2,weight=distance,metric=manhattan",
]


@pytest.fixture(scope="module")
def data():
    x, y = gaussian_mixture(num_classes=5, dim=24, per_class=80, modes=3, seed=3)
    within = torch.arange(len(y)) % 80
    return x[within < 60], y[within < 60], x[within >= 60], y[within >= 60]


def _episodes(xs, ys, shots, seeds=(0, 1, 2)):
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        idx = torch.cat([torch.nonzero(ys == c).flatten()[torch.randperm(60, generator=g)[:shots]] for c in range(5)])
        out.append(SupportSet(xs[idx], ys[idx], seed=seed))
    return out


@pytest.mark.parametrize("shots", [1, 3, 20])
def test_grid_heads_and_scores_equal_heads_built_alone(data, shots):
    xs, ys, xq, _ = data
    specs = expand_grid(GRID).specs
    eps = _episodes(xs, ys, shots)
    grid = build_head_grid(specs, eps)
    flat = [head for row in grid for head in row]
    shared_scores = score_heads(flat, xq)
    for i, spec in enumerate(specs):
        for j, ep in enumerate(eps):
            head = grid[i][j]
            alone = build_head(spec, ep.embeddings, ep.labels, seed=ep.seed)
            assert torch.equal(head.proxies, alone.proxies), (spec.name, shots, j)
            assert torch.equal(head.proxy_labels, alone.proxy_labels)
            assert head.meta["effective_k"] == alone.meta["effective_k"]
            assert torch.equal(shared_scores[i * len(eps) + j], alone(xq)), (spec.name, shots, j)


def test_grid_builds_each_distinct_set_of_proxies_once(data):
    xs, ys, _, _ = data
    names = ["westerhoff2025", "l2/all/l2/l2/max", "knn", "l2/kmeans:k=1/l2/l2/max", "qi2018", "l2/kmeans:k=5/l2/l2/max"]
    grid = build_head_grid(names, _episodes(xs, ys, shots=5, seeds=(0,)))
    ptr = {name: row[0].proxies.data_ptr() for name, row in zip(names, grid)}
    # k = 20 >= 5 shots is `all`; l2 proxies of l2-normalised samples need no second l2
    assert ptr["westerhoff2025"] == ptr["l2/all/l2/l2/max"] == ptr["knn"]
    assert ptr["l2/kmeans:k=1/l2/l2/max"] == ptr["qi2018"]  # k-means with k = 1 is the mean
    assert ptr["l2/kmeans:k=5/l2/l2/max"] == ptr["knn"]  # k = shots: every sample is a proxy
    assert len(set(ptr.values())) == 2
    assert grid[0][0].meta["unit_proxies"] and grid[0][0].unit_inputs


def test_identical_episodes_share_unseeded_stages_but_not_seeded_ones(data):
    xs, ys, xq, _ = data
    specs = expand_grid(["qi2018", "ls-oracle", "simpleshot", "l2/fps:k=3/l2/l2/max",
                         "l2/kmeans:k=3/l2/l2/max", "l2/random:k=2/none/l2/max"]).specs
    # The same support under three seeds (as every seed of shots='all' is) in separate tensors.
    eps = [SupportSet(xs.clone(), ys.clone(), seed=seed) for seed in (0, 1, 2)]
    grid = build_head_grid(specs, eps)
    for spec, row in zip(specs, grid):
        seeded = spec.gen.method('gen').seeded
        ptrs = {head.proxies.data_ptr() for head in row}
        assert len(ptrs) == (3 if seeded else 1), spec.name
        if seeded:  # each seed still draws its own proxies
            assert not torch.equal(row[0].proxies, row[1].proxies), spec.name
        for head, ep in zip(row, eps):
            alone = build_head(spec, ep.embeddings, ep.labels, seed=ep.seed)
            assert head.meta["seed"] == ep.seed
            assert torch.equal(head.proxies, alone.proxies), spec.name
            assert torch.equal(score_heads([head], xq)[0], alone(xq)), spec.name
    # a support that differs in one value is not identical
    changed = xs.clone()
    changed[7, 3] += 1e-3
    pair = build_head_grid(["qi2018"], [SupportSet(xs, ys), SupportSet(changed, ys)])[0]
    assert pair[0].proxies.data_ptr() != pair[1].proxies.data_ptr()
    assert not torch.equal(pair[0].proxies, pair[1].proxies)


def test_effective_generator_rules():
    assert gen.effective_gen("kmeans", {"k": 20}, 20) == ("all", {})
    assert gen.effective_gen("kmeans", {"k": 20}, 21) == ("kmeans", {"k": 20})
    assert gen.effective_gen("kmeans", {"k": 1, "n_init": 3}, 50) == ("mean", {})
    assert gen.effective_gen("fps", {"k": 4}, 3) == ("all", {})
    assert gen.effective_gen("mean", {}, 1) == ("all", {})
    assert gen.effective_gen("mean", {}, 2) == ("mean", {})
    assert gen.effective_gen("none", {"k": 5}, 1) == ("none", {"k": 5})  # ignores the support


@pytest.mark.parametrize("dim", [16, 64])  # seeding without and with the rows' Gram matrix
def test_kmeans_rows_do_not_depend_on_chunking_or_batch_company(dim):
    x, y = gaussian_mixture(num_classes=6, dim=dim, per_class=40, modes=3, seed=5)
    batch, mask = gen.group_by_class(x, y, torch.arange(6))
    assert kmeans.seeding_gram_pays(40, dim, 4) == (dim == 64)
    rng = sampling.RowRandom([(0, 3), (1, 3)])
    whole = kmeans.kmeans_batched(batch, mask, 4, rng=rng, chunk_elements=1 << 30)
    chunked = kmeans.kmeans_batched(batch, mask, 4, rng=sampling.RowRandom([(0, 3), (1, 3)]), chunk_elements=1)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[2], chunked[2])
    # the second episode alone gets the same centres as inside the batch
    alone = kmeans.kmeans_batched(batch[3:], mask[3:], 4, rng=1)
    assert torch.equal(alone[0], whole[0][3:])


@pytest.mark.parametrize("n_per_class", [3, 30])  # fewer and more samples than dimensions
def test_ls_sample_space_and_feature_space_solutions_agree(n_per_class):
    x, y = gaussian_mixture(num_classes=4, dim=40, per_class=n_per_class, seed=2)
    batch, mask = gen.group_by_class(x.double(), y, torch.arange(4))
    flat = batch[mask]
    ridge = 0.05
    primal = gen._ls_primal(flat, gen.gen_mean(batch, mask).proxies[:, 0], ridge)
    dual = gen._ls_dual(flat, mask, ridge)
    assert torch.allclose(primal, dual, rtol=1e-8, atol=1e-10)
    w = gen.gen_ls(batch, mask, lam=1e-3).proxies[:, 0]  # the public entry picks either form
    second = flat.T @ flat / len(flat)
    r = 1e-3 * torch.trace(second) / 40
    expected = torch.linalg.solve(second + r * torch.eye(40, dtype=torch.float64), gen.gen_mean(batch, mask).proxies[:, 0].T).T / 4
    assert torch.allclose(w, expected, rtol=1e-6, atol=1e-9)
    # the CPU path (numpy, Cholesky) and the torch path (GPUs) solve the same system
    cpu = torch.from_numpy(gen._ls_cpu(flat.numpy(), mask.sum(1).numpy(), 1e-3))
    assert torch.allclose(cpu, gen._ls_torch(flat, mask, 1e-3), rtol=1e-9, atol=1e-12)
    uneven = mask.clone()
    uneven[0, 1:] = False  # one class keeps a single sample: the class means take segment sums
    cpu = torch.from_numpy(gen._ls_cpu(batch[uneven].numpy(), uneven.sum(1).numpy(), 1e-3))
    assert torch.allclose(cpu, gen._ls_torch(batch[uneven], uneven, 1e-3), rtol=1e-9, atol=1e-12)


def test_cosine_on_unit_inputs_reads_the_inner_products():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    p = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=1)
    labels = torch.arange(4).repeat_interleave(3)
    stage = StageSpec.parse("agg", "mnn:m=3,weight=distance,metric=cosine")
    assert agg.matrix_kind(stage, unit_inputs=True) == "dot"
    assert agg.matrix_kind(stage, unit_inputs=False) == "cosine"
    fast = agg.aggregate(stage, q, p, labels, 4, unit_inputs=True)
    general = agg.aggregate(StageSpec.parse("agg", "mnn:m=3,weight=distance,metric=cosine"), q, p, labels, 4)
    assert torch.allclose(fast, general, rtol=1e-4)
    assert torch.equal(fast.argmax(1), general.argmax(1))


def test_score_heads_refuses_bad_queries(data):
    from bench import BenchError

    xs, ys, xq, _ = data
    heads = build_head_grid(["qi2018", "knn"], _episodes(xs, ys, 3, seeds=(0,)))
    flat = [row[0] for row in heads]
    with pytest.raises(BenchError, match="same backbone"):
        score_heads(flat, xq[:, :5])
    bad = xq.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(BenchError, match="NaN or Inf"):
        score_heads(flat, bad)


def test_score_heads_does_not_mix_up_converted_proxies(data):
    xs, ys, xq, _ = data
    eps = _episodes(xs, ys, 4, seeds=range(10))  # same shapes, so freed copies get reused
    heads = [row for row in build_head_grid(["l2/all/l2/l2/max"], eps)][0]
    for head in heads:  # proxies stored in half precision: scoring converts a copy per head
        head.proxies = head.proxies.half()
    for head, scores in zip(heads, score_heads(heads, xq)):
        assert torch.equal(scores, head(xq))


@pytest.mark.parametrize("method", ["knn", "ncm", "l2/all/quantile/l2/mnn:m=3,metric=cosine",
                                    "l2/kmeans:k=2/none/l2/mnn:m=2,metric=cosine",
                                    "none/all/none/l2/mnn:m=3,metric=cosine"])
def test_cosine_mnn_heads_match_the_general_cosine_distance(data, method):
    xs, ys, xq, _ = data
    head = build_head(method, xs, ys, seed=0)
    q = torch.nn.functional.normalize(xq, dim=1)
    m = head.spec.agg.get("agg", "m")
    general = agg.aggregate(StageSpec.parse("agg", f"mnn:m={m},metric=cosine"), q, head.proxies, head.proxy_labels,
                            head.num_classes)
    assert torch.allclose(head(xq), general, atol=1e-5)
    unit = torch.allclose(head.proxies.norm(dim=1), torch.ones(len(head.proxies)), atol=1e-5)
    assert head.meta["unit_proxies"] == unit  # only rows that really are unit take the fast path


def test_cluster_sums_leave_out_padding_and_match_a_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 4, generator=g)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:] = False  # a shorter class, padded
    labels = torch.randint(0, 2, (3, 7), generator=g)
    labels[1, 5:] = 0  # padding must not land in cluster 0
    sums, counts = kmeans._cluster_sums(x, mask, labels, 2)
    for b in range(3):
        for c in range(2):
            members = (labels[b] == c) & mask[b]
            assert torch.allclose(sums[b, c], x[b][members].sum(0), atol=1e-6)
            assert counts[b, c, 0] == members.sum()


def test_lloyd_rows_that_stop_early_keep_their_centres_while_the_batch_runs_on():
    """A row that stops on its tolerance while its assignments still change stays in the batch
    (rows leave only once half have stopped) and keeps iterating there; its result must be
    where it stopped, as when it runs alone, also when the other rows end the run together."""
    g = torch.Generator().manual_seed(3)
    easy = torch.cat([torch.randn(20, 8, generator=g) * 0.1 + 5 * i for i in range(3)])  # 3 clear clusters
    hard = torch.randn(60, 8, generator=g)  # no structure: many iterations
    x = torch.stack([easy, hard, hard])  # two equal hard rows converge in the same iteration
    mask = torch.ones(3, 60, dtype=torch.bool)
    seeds = torch.stack([easy[[0, 1, 2]], hard[:3], hard[:3]])  # one cluster's samples: far from converged
    tol = torch.tensor([1e9, 0.0, 0.0])  # row 0 stops after one update; rows 1 and 2 end together
    batched = kmeans._lloyd(x, mask, seeds, 100, tol)
    for row in range(3):
        alone = kmeans._lloyd(x[row:row + 1], mask[row:row + 1], seeds[row:row + 1], 100, tol[row:row + 1])
        assert torch.equal(batched[row], alone[0]), row
    # run on, row 0's centres would have moved on from where it stopped
    assert not torch.equal(batched[0], kmeans._lloyd(x[:1], mask[:1], seeds[:1], 100, torch.zeros(1))[0])


def test_kmeans_without_the_scoring_pass_gives_the_same_centres():
    x, y = gaussian_mixture(num_classes=4, dim=16, per_class=30, modes=3, seed=2)
    batch, mask = gen.group_by_class(x, y, torch.arange(4))
    scored = kmeans.kmeans_batched(batch, mask, 3, rng=7)
    centres, labels, inertia = kmeans.kmeans_batched(batch, mask, 3, rng=7, score=False)
    assert labels is None and inertia is None
    assert torch.equal(centres, scored[0])
    # several restarts need the inertia to choose, so they score regardless
    assert kmeans.kmeans_batched(batch, mask, 3, rng=7, n_init=2, score=False)[2] is not None


def test_heads_that_share_scores_get_their_own_copies_and_near_equal_options_do_not_share(data):
    xs, ys, xq, _ = data
    specs = ["qi2018", "l2/kmeans:k=1/l2/l2/max", "l2/all/none/l2/lse:t=0.5", "l2/all/none/l2/lse:t=0.50000004"]
    heads = [row[0] for row in build_head_grid(specs, _episodes(xs, ys, 5, seeds=(0,)))]
    scores = score_heads(heads, xq)
    for head, s in zip(heads, scores):
        assert torch.equal(s, head(xq)), head.spec.name
    assert torch.equal(scores[0], scores[1])  # kmeans k=1 is the mean: one reduction ...
    scores[0].zero_()  # ... but each head holds its own tensor
    assert torch.equal(scores[1], heads[1](xq))
    assert not torch.equal(scores[2], scores[3])


def test_twins_with_a_large_support_run_apart_and_give_the_heads_built_alone():
    """Seeded GENs run each twin (every seed of shots=all) on the shared support, not a stacked copy,
    from 2**20 values per episode; each head still equals the head built alone."""
    x, y = gaussian_mixture(num_classes=5, dim=512, per_class=420, modes=3, seed=4)
    assert x.numel() >= 1 << 20
    eps = [SupportSet(x, y, seed=seed) for seed in (0, 1, 2)]
    specs = ["l2/kmeans:k=5/l2/l2/max", "westerhoff2025", "qi2018"]
    grid = build_head_grid(specs, eps)
    for spec, row in zip(specs, grid):
        for head, ep in zip(row, eps):
            assert torch.equal(head.proxies, build_head(spec, ep.embeddings, ep.labels, seed=ep.seed).proxies), spec
    assert not torch.equal(grid[0][0].proxies, grid[0][1].proxies)  # each seed its own k-means


def test_an_episode_without_classes_or_dimensions_is_refused():
    from bench.errors import BenchError

    with pytest.raises(BenchError, match="have no dimensions"):
        build_head_grid(["ls-oracle"], [SupportSet(torch.zeros(4, 0), torch.tensor([0, 0, 1, 1]))])

    with pytest.raises(BenchError, match="an episode has no classes"):
        build_head_grid(["zeroshot"], [SupportSet(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                                                  classes=torch.zeros(0, dtype=torch.long))])


def test_seeding_from_the_gram_matrix_picks_the_centres_of_direct_seeding():
    """k-means++ reads distances to its candidates from the rows' Gram matrix when that pays; on
    data without near ties both ways draw the same centres, and a Gram computed once and passed
    in (as the grid shares it over seeds and k) gives what each call computing its own gives."""
    x, y = gaussian_mixture(num_classes=4, dim=48, per_class=30, modes=6, mode_spread=6.0, seed=1)
    batch, mask = gen.group_by_class(x, y, torch.arange(4))
    mask[2, 25:] = False  # a padded class
    batch[2, 25:] = 0
    u = sampling.RowRandom([(3, 4)]).rand((kmeans._kmeanspp_draws(6),), "cpu")
    direct = kmeans.kmeanspp(batch, mask, 6, u)
    assert torch.equal(kmeans.kmeanspp(batch, mask, 6, u, gram=kmeans.support_gram(batch)), direct)
    assert kmeans.seeding_gram_pays(30, 48, 6)
    own = kmeans.kmeans_batched(batch, mask, 6, rng=3, chunk_elements=1)
    shared = kmeans.kmeans_batched(batch, mask, 6, rng=3, gram=kmeans.support_gram(batch))
    assert all(torch.equal(a, b) for a, b in zip(own, shared))


def test_seeding_reports_each_samples_nearest_centre_for_lloyds_first_step():
    """Lloyd's first assignment is read from seeding's distances: on data without near ties it
    is the nearest centre by direct distances, both with and without the Gram matrix, and the
    k-means result equals that of Lloyd assigning by its own product from the seeds."""
    x, y = gaussian_mixture(num_classes=3, dim=40, per_class=60, modes=5, mode_spread=5.0, seed=4)
    batch, mask = gen.group_by_class(x, y, torch.arange(3))
    u = sampling.RowRandom([(7, 3)]).rand((kmeans._kmeanspp_draws(5),), "cpu")
    for gram in (None, kmeans.support_gram(batch)):
        centres, nearest = kmeans.kmeanspp(batch, mask, 5, u, gram=gram, nearest=True)
        assert torch.equal(centres, kmeans.kmeanspp(batch, mask, 5, u, gram=gram))
        assert torch.equal(nearest, torch.cdist(batch, centres).argmin(-1))
        tol = torch.full((3,), 1e-6)
        assert torch.equal(kmeans._lloyd(batch, mask, centres, 50, tol, nearest),
                           kmeans._lloyd(batch, mask, centres, 50, tol))


def test_gram_matrix_by_blocks_equals_the_whole_product():
    g = torch.Generator().manual_seed(0)
    for cols in (40, 301):  # whole below 128 columns, in blocks above
        a = torch.randn(257, cols, generator=g, dtype=torch.float64).numpy()
        out = gen._gram(a)
        assert (out == out.T).all()
        assert torch.allclose(torch.from_numpy(out), torch.from_numpy(a.T @ a), rtol=1e-13, atol=1e-11)


def test_gen_context_derives_once_per_support_batch():
    calls = []

    def count(t):
        calls.append(t)
        return t.sum()

    ctx = gen.GenContext(classes=torch.arange(2), memo={})
    x, other = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    assert ctx.derived("total", count, x) == 24 and ctx.derived("total", count, x) == 24
    assert ctx.derived("total", count, other) == 0  # another batch is not served the first one's value
    assert len(calls) == 2
    assert gen.GenContext(classes=torch.arange(2)).derived("total", count, x) == 24  # no memo: computed


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_gram_blocks_work_in_a_forked_child():
    """The block product's helper thread does not survive a fork; a child makes its own rather
    than waiting forever on the parent's."""
    import os

    a = torch.randn(300, 200, dtype=torch.float64).numpy()
    expected = gen._gram(a)  # the parent has started its helper thread
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the product completes and is right
        try:
            os._exit(0 if (gen._gram(a) == expected).all() else 1)
        except BaseException:
            os._exit(2)
    for _ in range(200):  # up to 20 s, then the child is stuck: fail instead of hanging
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        __import__("time").sleep(0.1)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung waiting for the parent's helper thread")


def test_an_episode_gets_the_same_heads_whatever_episodes_share_its_batch():
    """Episodes of different class sizes are never padded into one batch, so an episode's heads do
    not depend on its neighbours, nor on how a run's episodes are split over processes (padding
    changes a product's bits, and the way k-means++ seeds)."""
    specs = ["none/kmeans:k=3/none/none/max", "l2/kmeans:k=5/l2/l2/max", "l2/kmeans:k=2/l2/l2/max", "qi2018"]
    differing = []
    for it in range(24):
        g = torch.Generator().manual_seed(it)
        dim = (16, 64, 256)[it % 3]

        def episode(shots, seed):
            modes = torch.randn(10, 3, dim, generator=g) * 2
            x = torch.cat([modes[c][torch.randint(0, 3, (shots,), generator=g)] + 0.5 * torch.randn(shots, dim, generator=g)
                           for c in range(10)])
            return SupportSet(x, torch.arange(10).repeat_interleave(shots), seed=seed)

        small, big = episode((4, 5, 6, 8, 12)[it % 5], it), episode((40, 90)[it % 2], it + 1)
        grid = build_head_grid(specs, [small, big])
        for spec, row in zip(specs, grid):
            if not torch.equal(row[0].proxies, build_head_grid([spec], [small])[0][0].proxies):
                differing.append((it, spec))
    assert differing == []


def test_a_rows_sum_does_not_depend_on_its_batch_or_thread_count():
    """Class means and k-means' tolerance sum each row's samples; in a batched (1 x S) @ (S x D)
    product MKL's kernel depends on the batch size, so a class's mean had other bits in a grid
    than alone. Row sums must equal a sub-batch's, on 1 and 2 threads, padded or not."""
    from bench.imprint.rows import row_sums

    g = torch.Generator().manual_seed(5)
    before = torch.get_num_threads()
    try:
        for _ in range(40):
            b, s, d = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((2, 40), (1, 60), (2, 700)))
            x = torch.randn(b, s, d, generator=g)
            mask = torch.rand(b, s, generator=g) < 0.8
            mask[:, 0] = True
            x[~mask] = 0.0
            cut = int(torch.randint(1, b, (1,), generator=g))
            sums = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for m in (None, mask):
                    whole, part = row_sums(x, m), row_sums(x[cut:], None if m is None else m[cut:])
                    assert torch.equal(whole[cut:], part), (b, s, d, cut, threads)
                    sums.append(whole)
            assert all(torch.equal(sums[0], other) for other in sums[1:])
            assert torch.allclose(sums[0], (x * mask[..., None]).sum(1), atol=1e-4)
    finally:
        torch.set_num_threads(before)



def test_pairwise_row_sums_do_not_depend_on_the_batch_and_match_a_plain_sum():
    """CUDA's row sums (cuBLAS and torch's reductions pick how to split the samples by the whole
    tensor's shape: an H200 gave 904 of 1,200 sub-batches other bits) add samples pairwise with
    elementwise ops only; the same function runs here, so its batch invariance is checked on CPU."""
    from bench.imprint.rows import pairwise_sums

    g = torch.Generator().manual_seed(6)
    for s in (0, 1, 2, 3, 5, 8, 63, 64, 65, 500):
        x = torch.randn(9, s, 33, generator=g)
        whole = pairwise_sums(x)
        assert whole.shape == (9, 33)
        for lo, hi in ((0, 1), (3, 9), (4, 6)):
            assert torch.equal(whole[lo:hi], pairwise_sums(x[lo:hi])), (s, lo, hi)
        assert torch.allclose(whole.double(), x.double().sum(1), atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scores_of_a_grid_with_many_query_normalisations_equal_each_head_alone(dtype):
    """8 classes, several query normalisations (none, l2, each episode's centre) and matrix kinds
    at once, in float32 and float64: score_heads shares queries and matrices between heads, and
    must still give each head the bits of head(queries)."""
    x, y = gaussian_mixture(num_classes=8, dim=40, per_class=70, modes=2, seed=4)
    x = x.to(dtype)
    within = torch.arange(len(y)) % 70
    pool, queries = (within < 50), (within >= 50)
    eps = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        idx = torch.cat([torch.nonzero(y[pool] == c).flatten()[torch.randperm(50, generator=g)[:4]] for c in range(8)])
        eps.append(SupportSet(x[pool][idx], y[pool][idx], seed=seed))
    specs = ["qi2018", "ncm", "janson2022", "simpleshot", "hosoda2024", "ls-oracle", "l2/kmeans:k=2/l2/l2/max"]
    heads = [h for row in build_head_grid(specs, eps) for h in row]
    for h, scores in zip(heads, score_heads(heads, x[queries])):
        assert torch.equal(scores, h(x[queries])), h.spec.name

def test_mean_heads_in_a_grid_equal_heads_built_alone_at_shapes_where_batching_changed_them():
    # 7 classes of uneven size x 334 dims: episodes 0 and 2 share one padded width (15), so the
    # grid batches their 14 classes, a shape where the batched product gave the mean other bits
    # than for episode 2's 7 classes alone (found by a review's fuzzing)
    x, y = gaussian_mixture(num_classes=7, dim=334, per_class=20, modes=2, seed=9)
    sizes = [[9, 14, 14, 12, 12, 15, 13], [5, 4, 7, 4, 5, 2, 4], [12, 15, 6, 1, 12, 14, 7]]
    eps = []
    for seed, counts in enumerate(sizes):
        g = torch.Generator().manual_seed(seed)
        idx = torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(20, generator=g)[:n]]
                         for c, n in enumerate(counts)])
        eps.append(SupportSet(x[idx], y[idx], seed=seed))
    specs = ["l2/mean/l2/l2/max", "l2/mean/none/none/max", "none/mean/none/none/mnn",
             "center-l2/mean/none/center-l2/mnn", "l2/kmeans:k=3/l2/l2/max"]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            grid = build_head_grid(specs, eps)
            for i, spec in enumerate(specs):
                for j, ep in enumerate(eps):
                    alone = build_head(spec, ep.embeddings, ep.labels, seed=ep.seed)
                    assert torch.equal(grid[i][j].proxies, alone.proxies), (spec, j, threads)
    finally:
        torch.set_num_threads(before)


def test_a_grid_names_the_method_whose_proxies_overflow_and_keeps_finite_ones_whose_sum_overflows():
    from bench import BenchError

    big = torch.full((4, 3), 3e38)  # finite float32, but two of them sum to Inf
    big[2:] *= -1
    labels = torch.tensor([0, 0, 1, 1])
    # 'all' keeps the samples (finite, though their sum overflows); the mean's sum overflows to Inf
    heads = build_head_grid(["none/all/none/none/max"], [SupportSet(big, labels)])
    assert torch.isfinite(heads[0][0].proxies).all()
    with pytest.raises(BenchError, match="method 'janson2022' produced NaN or Inf proxies"):
        build_head_grid(["none/all/none/none/max", "janson2022"], [SupportSet(big, labels)])


def test_loading_a_state_dict_into_one_grid_head_leaves_heads_with_other_proxies_alone(data):
    xs, ys, xq, _ = data
    specs = ["qi2018", "ncm", "knn"]  # one GEN result (l2, mean) under two NORM_posts, and another GEN
    grid = build_head_grid(specs, _episodes(xs, ys, 5, seeds=(0, 1)))
    heads = [h for row in grid for h in row]
    before = [h(xq) for h in heads]
    state = heads[0].state_dict()
    state["proxy_labels"] = state["proxy_labels"].flip(0).clone()
    heads[0].load_state_dict(state)
    assert not torch.equal(heads[0](xq), before[0])
    for head, scores in zip(heads[1:], before[1:]):
        assert torch.equal(head(xq), scores), head.spec.name


def test_a_center_l2_head_passes_gradients_to_its_queries(data):
    xs, ys, xq, _ = data
    head = build_head("center-l2/mean/none/center-l2/max", xs, ys)
    q = xq[:7].clone().requires_grad_()
    head(q).sum().backward()  # NORM_inf center-l2 must not normalise in place
    assert q.grad is not None and torch.isfinite(q.grad).all()
