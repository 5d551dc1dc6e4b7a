"""The method registries: methods added through them alone (dc, median, lse, a user's own GEN),
each checked against a known identity."""

import math

import numpy as np
import pytest
import torch

from bench import BenchError
from bench.cli import main
from bench.imprint import (
    Option,
    Reference,
    StageSpec,
    SupportSet,
    agg,
    build_head,
    build_head_grid,
    expand_grid,
    register_gen,
    resolve,
)
from bench.imprint.gen import GenResult, coordinate_median, effective_gen, geometric_median
from bench.imprint.registry import REGISTRY, method_table


def test_lse_tends_to_max_as_t_goes_to_zero():
    g = torch.Generator().manual_seed(0)
    q, p = torch.randn(50, 8, generator=g), torch.randn(12, 8, generator=g)
    labels = torch.arange(4).repeat_interleave(3)
    exact = agg.aggregate(StageSpec.parse("agg", "max"), q, p, labels, 4)
    gaps = []
    for t in (1.0, 0.1, 1e-3, 1e-6):
        soft = agg.aggregate(StageSpec.parse("agg", f"lse:t={t}"), q, p, labels, 4)
        gap = (soft - exact).abs().max().item()
        assert (soft >= exact - 1e-6).all() and gap <= t * math.log(3) + 1e-6  # max <= lse <= max + t log k
        gaps.append(gap)
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-5
    # one proxy per class: the soft max is the score itself
    single = agg.aggregate(StageSpec.parse("agg", "lse:t=0.5"), q, p[:4], torch.arange(4), 4)
    assert torch.allclose(single, q @ p[:4].T, atol=1e-6)


def test_coordinate_median_equals_numpy_with_padding():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, 5, generator=g)
    mask = torch.tensor([[1] * 6, [1] * 5 + [0], [1] * 2 + [0] * 4], dtype=torch.bool)
    med = coordinate_median(x, mask)
    for c in range(3):
        expected = np.median(x[c][mask[c]].numpy(), axis=0)
        assert np.allclose(med[c].numpy(), expected, atol=1e-6)


def test_geometric_median_minimises_the_summed_distance():
    from scipy.optimize import minimize

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 3, dtype=torch.float64, generator=g)
    x[1, 3:] = x[1, :4] * 0 + torch.tensor([[10.0, 10.0, 10.0]], dtype=torch.float64)  # heavy outliers
    mask = torch.ones(2, 7, dtype=torch.bool)
    med = geometric_median(x, mask, iters=500)
    for c in range(2):
        pts = x[c].numpy()
        ref = minimize(lambda y: np.linalg.norm(pts - y, axis=1).sum(), pts.mean(0), method="Nelder-Mead",
                       options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000}).x
        assert np.linalg.norm(pts - med[c].numpy(), axis=1).sum() <= np.linalg.norm(pts - ref, axis=1).sum() + 1e-6
    # symmetric points: the centre; collinear points: the 1-D median
    square = torch.tensor([[[1.0, 1], [1, -1], [-1, 1], [-1, -1]]], dtype=torch.float64) + 3
    assert torch.allclose(geometric_median(square, torch.ones(1, 4, dtype=torch.bool))[0],
                          torch.tensor([3.0, 3.0], dtype=torch.float64), atol=1e-6)
    line = torch.tensor([[[0.0, 0], [1, 0], [5, 0]]], dtype=torch.float64)
    assert torch.allclose(geometric_median(line, torch.ones(1, 3, dtype=torch.bool))[0],
                          torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-5)


def test_median_of_one_sample_is_that_sample():
    assert effective_gen("median", {"kind": "geometric", "iters": 200}, 1) == ("all", {})
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    head = build_head("none/median:kind=geometric/none/none/max", x, y)
    assert torch.equal(head.proxies, x)


def _zero_spread_reference():
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    base = means.repeat_interleave(3, 0)  # every base class: three identical samples
    return Reference.from_embeddings(base, torch.arange(4).repeat_interleave(3)), means


def test_dc_with_no_spread_is_the_calibrated_mean_in_closed_form():
    """With zero base covariance and alpha = 0 every sampled feature is its support sample's
    calibrated mean, so the k=1 proxy is (sum x_i + m sum mu'_i) / (n (1 + m))."""
    reference, means = _zero_spread_reference()
    x = torch.tensor([[1.0, 1.0], [2.0, 0.0], [9.0, 9.0], [8.0, 10.0]])
    y = torch.tensor([0, 0, 1, 1])
    head = build_head("none/dc:alpha=0,samples=10,nearest=2/none/none/max", x, y, reference=reference)
    m = 10 // 2
    for c in range(2):
        xs = x[y == c]
        near = torch.cdist(xs, means).topk(2, largest=False).indices
        calibrated = (means[near].sum(1) + xs) / 3
        expected = (xs.sum(0) + m * calibrated.sum(0)) / (len(xs) * (1 + m))
        assert torch.allclose(head.proxies[c], expected, atol=1e-5)
    # no samples: the mean of the support itself
    plain = build_head("none/dc:samples=0/none/none/max", x, y, reference=reference)
    assert torch.allclose(plain.proxies, torch.stack([x[:2].mean(0), x[2:].mean(0)]))


def test_dc_samples_are_seeded_and_spread_like_the_reference():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(200, 4, generator=g) * torch.tensor([3.0, 0.1, 0.1, 0.1])
    labels = torch.arange(4).repeat(50)
    reference = Reference.from_embeddings(base, labels)
    x, y = torch.randn(6, 4, generator=g), torch.tensor([0, 0, 0, 1, 1, 1])
    spec = "none/dc:k=3,samples=600/none/none/max"
    a, b = (build_head(spec, x, y, reference=reference, seed=7) for _ in range(2))
    c = build_head(spec, x, y, reference=reference, seed=8)
    assert torch.equal(a.proxies, b.proxies) and not torch.equal(a.proxies, c.proxies)
    assert a.proxies.shape == (6, 4) and a.meta["effective_k_max"] == 3
    # k-means proxies spread along the reference's wide axis, not the narrow ones
    spread = a.proxies[a.proxy_labels == 0].std(0)
    assert spread[0] > 3 * spread[1:].max()
    with pytest.raises(BenchError, match="reference"):
        build_head(spec, x, y)
    with pytest.raises(BenchError, match="nearest=5"):
        build_head("none/dc:nearest=5/none/none/max", x, y, reference=reference)


@register_gen("test_trimmed_mean", options={"cut": Option(float, 0.2, minimum=0.0, maximum=0.49)},
              single_proxy=True, one_sample_identity=True, summary="a user's own GEN: the trimmed mean")
def trimmed_mean(x, mask, *, cut: float = 0.2) -> GenResult:
    """Per coordinate, the mean of the values left after cutting a share from each end."""
    values = x.masked_fill(~mask[..., None], float("nan")).sort(dim=1).values
    n = mask.sum(1)
    drop = (n * cut).long()
    rank = torch.arange(x.shape[1])[None, :, None]
    keep = (rank >= drop[:, None, None]) & (rank < (n - drop)[:, None, None])
    proxies = torch.where(keep, values, 0).sum(1) / keep.sum(1)
    ones = torch.ones(len(x), 1, dtype=torch.bool)
    return GenResult(proxies[:, None], ones, ones.sum(1))


def test_a_user_registered_gen_works_in_specs_grids_and_bench_run(tmp_path, monkeypatch):
    assert "test_trimmed_mean" in REGISTRY["gen"]
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0], [5.0], [6.0], [7.0], [8.0], [-90.0]])
    y = torch.tensor([0] * 5 + [1] * 5)
    head = build_head("none/test_trimmed_mean:cut=0.2/none/none/max", x, y)
    assert torch.allclose(head.proxies[:, 0], torch.tensor([2.0, 6.0]))  # the outliers are cut
    zero_cut = build_head("none/test_trimmed_mean:cut=0/none/none/max", x, y)
    assert torch.allclose(zero_cut.proxies, build_head("none/mean/none/none/max", x, y).proxies)  # cut 0 = mean
    grid = expand_grid(["l2/test_trimmed_mean:cut=[0.1,0.3]|mean/l2/l2/max"])
    assert len(grid.specs) == 3
    heads = build_head_grid(grid.specs, [SupportSet(x, y, seed=s) for s in range(2)])
    assert torch.equal(heads[0][0].proxies, heads[0][1].proxies)  # unseeded: identical episodes share it
    with pytest.raises(BenchError, match="cut=0.7"):
        resolve("none/test_trimmed_mean:cut=0.7/none/none/max")
    assert "test_trimmed_mean" in method_table()
    # from a plugin file, through bench run
    plugin = tmp_path / "my_gens.py"
    plugin.write_text(
        "import torch\nfrom bench.imprint import register_gen\nfrom bench.imprint.gen import gen_mean\n\n"
        "@register_gen('plugin_first_sample', single_proxy=True, summary='the first support sample')\n"
        "def first(x, mask):\n    return gen_mean(x[:, :1], mask[:, :1])\n")
    monkeypatch.chdir(tmp_path)
    code = main(["run", f"plugins=[{plugin}]", "methods=[none/plugin_first_sample/none/none/max,qi2018]",
                 "task.classes=[novel]", "task.shots=[1,5]", "task.seeds=[0]", "wandb.mode=disabled",
                 "name=plugin"])
    assert code == 0
    import csv

    rows = {(r["method"], r["shots"]): float(r["acc"]) for r in csv.DictReader(open(tmp_path / "runs/plugin/results.csv"))}
    # at 1 shot the first sample is the only sample: the same classifier as unnormalised mean imprinting
    assert rows[("none/plugin_first_sample/none/none/max", "1")] > 0.2
    assert len(rows) == 4


def test_registering_another_function_under_a_taken_name_is_refused():
    with pytest.raises(BenchError, match="already registered"):
        @register_gen("mean", summary="an impostor")
        def impostor(x, mask):
            return None


@register_gen("test_jitter", single_proxy=True, summary="a user's own seeded GEN: the mean plus seeded noise")
def jitter(x, mask, *, rng) -> GenResult:
    """Takes an rng and does not say `seeded`: the signature says it."""
    from bench.imprint.gen import gen_mean
    from bench.imprint.sampling import RowRandom

    noise = RowRandom.of(rng, len(x)).randn((1, x.shape[-1]), "cpu").to(x)
    mean = gen_mean(x, mask)
    return GenResult(mean.proxies + noise, mean.mask, mean.effective_k)


def test_a_gen_that_takes_an_rng_is_seeded_without_saying_so():
    x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(4)), torch.tensor([0] * 4 + [1] * 4)
    # one support under three seeds (as every seed of shots='all' is): each seed draws its own noise
    row = build_head_grid(["none/test_jitter/none/none/max"], [SupportSet(x, y, seed=s) for s in range(3)])[0]
    for seed, head in enumerate(row):
        assert torch.equal(head.proxies, build_head("none/test_jitter/none/none/max", x, y, seed=seed).proxies)
    assert not torch.equal(row[0].proxies, row[1].proxies)
    assert REGISTRY["gen"]["test_jitter"].seeded and not REGISTRY["gen"]["test_trimmed_mean"].seeded


def test_a_seeded_fact_that_contradicts_the_signature_is_refused():
    with pytest.raises(BenchError, match="takes no rng.*seeded=True"):
        @register_gen("test_claims_seeded", seeded=True, summary="says seeded, draws nothing")
        def claims(x, mask):
            return None
    with pytest.raises(BenchError, match="takes an rng.*seeded=False"):
        @register_gen("test_denies_seeded", seeded=False, summary="draws, says unseeded")
        def denies(x, mask, *, rng):
            return None
    assert "test_claims_seeded" not in REGISTRY["gen"] and "test_denies_seeded" not in REGISTRY["gen"]
