"""ImprintedHead: identities from the literature, persistence, bad input."""

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.neighbors import KNeighborsClassifier

from bench import BenchError
from bench.data.synthetic import gaussian_mixture
from bench.imprint import ImprintedHead, build_head
from bench.imprint.gen import group_by_class
from bench.imprint.kmeans import kmeans_batched


@pytest.fixture(scope="module")
def gmm():
    x, y = gaussian_mixture(num_classes=6, dim=32, per_class=60, seed=1)
    idx = torch.arange(len(y)) % 60
    support, query = idx < 40, idx >= 40
    return x[support], y[support], x[query], y[query]


def _pred(method, gmm, **kw):
    xs, ys, xq, _ = gmm
    return build_head(method, xs, ys, **kw).predict(xq)


@pytest.mark.parametrize("gen", ["mean", "kmeans:k=4", "all"])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_max_on_l2_proxies_and_queries_equals_1nn(gmm, gen, metric):
    a = _pred(f"l2/{gen}/l2/l2/max", gmm)
    b = _pred(f"l2/{gen}/l2/l2/mnn:m=1,metric={metric}", gmm)
    assert torch.equal(a, b)


def test_all_plus_max_is_1nn_over_the_support_set(gmm):
    xs, ys, xq, _ = gmm
    ours = _pred("l2/all/l2/l2/max", gmm)
    knn = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(xs.numpy(), ys.numpy())
    assert np.array_equal(ours.numpy(), knn.predict(xq.numpy()))


def test_mean_with_l2_equals_qi2018(gmm):
    xs, ys, xq, _ = gmm
    a = build_head("l2/mean/l2/l2/max", xs, ys)
    b = build_head("qi2018", xs, ys)
    assert torch.equal(a.proxies, b.proxies) and torch.equal(a(xq), b(xq))


def test_kmeans_with_one_cluster_equals_the_mean(gmm):
    xs, ys, xq, _ = gmm
    a = build_head("none/kmeans:k=1/none/none/max", xs, ys)
    b = build_head("none/mean/none/none/max", xs, ys)
    assert torch.allclose(a.proxies, b.proxies, atol=1e-5)


def test_quantile_head_does_not_depend_on_class_order(gmm):
    xs, ys, _, _ = gmm
    perm = torch.tensor([3, 0, 5, 1, 4, 2])  # relabel class c as perm[c]
    order = torch.randperm(len(ys), generator=torch.Generator().manual_seed(0))
    a = build_head("hosoda2024", xs, ys)
    b = build_head("hosoda2024", xs[order], perm[ys[order]])
    # the support of each class keeps its sample order only up to the shuffle, and mean is
    # order-free, so class c of `a` must equal class perm[c] of `b` exactly.
    assert torch.allclose(a.proxies, b.proxies[perm], atol=1e-6)


def test_effective_k_is_recorded_when_k_exceeds_the_support(gmm):
    xs, ys, _, _ = gmm
    few = torch.cat([torch.nonzero(ys == c).flatten()[:3] for c in range(6)])
    head = build_head("l2/kmeans:k=20/l2/l2/max", xs[few], ys[few])
    assert head.meta["effective_k"] == [3] * 6 and head.meta["num_proxies"] == 18


def test_center_l2_uses_reference_mean_when_given(gmm):
    xs, ys, xq, _ = gmm
    ref = torch.ones(xs.shape[1])
    head = build_head("simpleshot", xs, ys, reference=ref)
    assert torch.equal(head.center, ref) and head.meta["center"] == "reference"
    assert build_head("simpleshot", xs, ys).meta["center"] == "support"


def test_kmeans_inertia_within_one_percent_of_sklearn_and_deterministic():
    x, y = gaussian_mixture(num_classes=10, dim=512, per_class=500, seed=0)
    batch, mask = group_by_class(x, y, torch.arange(10))
    for k in (5, 20):
        _, _, ours = kmeans_batched(batch, mask, k, rng=0)
        ref = [KMeans(k, random_state=0).fit(batch[c].numpy()).inertia_ for c in range(10)]
        assert ours.sum().item() <= 1.01 * sum(ref), (k, ours.sum().item(), sum(ref))
        again = kmeans_batched(batch, mask, k, rng=0)
        assert torch.equal(again[2], ours)


@pytest.mark.parametrize("method", ["westerhoff2025", "knn", "simpleshot", "hosoda2024",
                                    "l2/kmedoids:k=3/l2/l2/mnn:m=3,weight=distance"])
def test_save_load_round_trip(tmp_path, gmm, method):
    xs, ys, xq, _ = gmm
    head = build_head(method, xs, ys + 10, seed=4)  # labels need not start at 0
    head.save(tmp_path / "head.safetensors")
    loaded = ImprintedHead.load(tmp_path / "head.safetensors")
    assert loaded.spec == head.spec and loaded.spec.name == head.spec.name
    assert torch.equal(loaded(xq), head(xq))
    assert loaded.predict(xq).min() >= 10
    assert loaded.meta == head.meta


def test_loading_something_else_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(BenchError, match="not a saved ImprintedHead"):
        ImprintedHead.load(tmp_path / "x.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(BenchError, match="cannot read head file"):
        ImprintedHead.load(tmp_path / "junk.safetensors")


def test_bad_embeddings_are_refused(gmm):
    xs, ys, xq, _ = gmm
    bad = xs.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(BenchError, match="NaN or Inf in 1 row"):
        build_head("qi2018", bad, ys)
    head = build_head("qi2018", xs, ys)
    with pytest.raises(BenchError, match="same backbone"):
        head(xq[:, :10])
    inf = xq.clone()
    inf[0, 0] = float("inf")
    with pytest.raises(BenchError, match="query embeddings contain NaN or Inf"):
        head(inf)
    with pytest.raises(BenchError, match=r"classes \[99\] have no support"):
        build_head("qi2018", xs, ys, classes=torch.tensor([*range(6), 99]))
    with pytest.raises(BenchError, match="labels have shape"):
        build_head("qi2018", xs, ys[:-1])


@pytest.mark.parametrize("method", ["westerhoff2025", "l2/kmedoids:k=3/l2/l2/max", "l2/random:k=2/l2/l2/max",
                                    "none/none/none/none/max", "ls-oracle", "knn", "hosoda2024"])
def test_batched_heads_equal_heads_built_alone(gmm, method):
    from bench.imprint import SupportSet, build_heads

    xs, ys, xq, _ = gmm
    # episodes of different sizes and class sets in one batch
    eps = [
        SupportSet(xs, ys, seed=0),
        SupportSet(xs[ys < 3][:20], ys[ys < 3][:20], seed=1),
        SupportSet(xs[::3], ys[::3], seed=2),
    ]
    batched = build_heads(method, eps)
    for ep, head in zip(eps, batched):
        alone = build_head(method, ep.embeddings, ep.labels, seed=ep.seed)
        assert torch.allclose(head.proxies, alone.proxies, atol=1e-6)
        assert torch.equal(head.proxy_labels, alone.proxy_labels)
        assert head.meta["effective_k"] == alone.meta["effective_k"]
        assert torch.equal(head.predict(xq), alone.predict(xq))
