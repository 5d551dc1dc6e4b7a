import math

import numpy as np
import pytest
import torch
from torch import nn

from bench import BenchError
from bench.diagnostics import (
    ClassStatistics,
    NearestCentreAgreement,
    etf,
    exact_jacobian_sq_norm,
    geometric_complexity,
    h_score,
    linear_cka,
    log_evidence,
    logme,
    nc3_self_duality,
    ncc_accuracy,
    ncti_scores,
    neural_collapse,
)


def test_simplex_etf_without_spread_is_fully_collapsed():
    c = 6
    means = etf(c, 10, scale=3.0)
    x = means.repeat_interleave(4, 0).float()
    y = torch.arange(c).repeat_interleave(4)
    nc = neural_collapse(x, y)
    assert nc["nc1"] == pytest.approx(0, abs=1e-10) and nc["nc1_quotient"] == pytest.approx(0, abs=1e-10)
    assert nc["equiangularity"] == pytest.approx(0, abs=1e-6)
    assert nc["mean_cosine"] == pytest.approx(-1 / (c - 1), abs=1e-6)
    assert nc["max_angle"] == pytest.approx(0, abs=1e-6) and nc["equinorm"] == pytest.approx(0, abs=1e-6)
    assert nc["cdnv"] == pytest.approx(0, abs=1e-10)


def _direct(x: np.ndarray, y: np.ndarray) -> dict:
    classes = np.unique(y)
    c, n = len(classes), len(y)
    mu = np.stack([x[y == k].mean(0) for k in classes])
    mu_g = mu.mean(0)
    sw = sum((x[y == k] - mu[i]).T @ (x[y == k] - mu[i]) for i, k in enumerate(classes)) / n
    sb = (mu - mu_g).T @ (mu - mu_g) / c
    nc1 = np.trace(sw @ np.linalg.pinv(sb, rcond=1e-6, hermitian=True)) / c
    m = mu - mu_g
    norms = np.linalg.norm(m, axis=1)
    unit = m / norms[:, None]
    cos = unit @ unit.T
    pairs = [(i, j) for i in range(c) for j in range(i + 1, c)]
    pc = np.array([cos[i, j] for i, j in pairs])
    var = np.array([((x[y == k] - mu[i]) ** 2).sum(1).mean() for i, k in enumerate(classes)])
    cnt = np.array([(y == k).sum() for k in classes])
    s2 = var * cnt / (cnt - 1)
    cdnv = np.mean([(var[i] + var[j]) / (2 * ((mu[i] - mu[j]) ** 2).sum()) for i, j in pairs])
    cdnv_u = np.mean([(s2[i] + s2[j]) / (2 * (((mu[i] - mu[j]) ** 2).sum() - s2[i] / cnt[i] - s2[j] / cnt[j]))
                      for i, j in pairs])
    return dict(nc1=nc1, nc1_quotient=np.trace(sw) / np.trace(sb), equinorm=norms.std(ddof=1) / norms.mean(),
                equiangularity=pc.std(ddof=1), max_angle=np.abs(pc + 1 / (c - 1)).mean(), cdnv=cdnv,
                cdnv_unbiased=cdnv_u)


@pytest.mark.parametrize("normalize", [False, True])
def test_collapse_matches_a_direct_numpy_computation(normalize):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=g, dtype=torch.float64) + 2 * torch.randn(5, 12, generator=g,
                                                                                dtype=torch.float64).repeat(60, 1)
    y = torch.arange(5).repeat(60)
    ours = neural_collapse(x, y, normalize=normalize, batch_size=64)
    xs = torch.nn.functional.normalize(x, dim=1) if normalize else x
    ref = _direct(xs.numpy(), y.numpy())
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


RANK_SCRIPT = r'''
import json, sys

import torch
import torch.distributed as dist

from bench.diagnostics import ClassStatistics

args = json.loads(sys.argv[1])
rank, world = args["rank"], 2
dist.init_process_group("gloo", init_method="file://" + args["store"], rank=rank, world_size=world)
data = torch.load(args["data"], weights_only=True)
y, results = data["y"], []
for x in data["sets"]:
    metric = ClassStatistics(4, x.shape[1])
    shard = slice(rank, None, world)
    for start in range(0, len(y), 16):  # several batches per rank: merges within and across ranks
        metric.update(x[shard][start:start + 16], y[shard][start:start + 16])
    results.append({k: v for k, v in metric.compute().items() if isinstance(v, float)})  # synced over ranks
# Without this, a rank could exit while gloo still serves the other rank's last collective, and
# its threads abort the process at exit (seen once in CI).
dist.barrier()
dist.destroy_process_group()
with open(args["out"], "w") as f:
    json.dump(results, f)
'''


def test_two_processes_give_the_same_collapse_as_one(tmp_path, forks):
    import json

    g = torch.Generator().manual_seed(1)
    x = torch.randn(101, 6, generator=g) + torch.arange(4).repeat(26)[:101, None].float()
    y = torch.arange(4).repeat(26)[:101]
    far = x.double() + 1e5  # a large common offset: per-rank class statistics must merge exactly
    torch.save({"sets": [x, far], "y": y}, tmp_path / "data.pt")
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    ranks = [forks.start([json.dumps({"rank": r, "store": str(tmp_path / "store"), "data": str(tmp_path / "data.pt"),
                                      "out": str(tmp_path / f"rank{r}.json")})], script=tmp_path / "rank.py",
                         cwd=tmp_path) for r in (0, 1)]
    for rank in ranks:
        assert rank.wait(300) == 0, rank.stderr[-3000:]
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert per_rank[0] == per_rank[1]  # every rank computes the merged statistics
    for data, result in zip((x, far), per_rank[0]):
        single = neural_collapse(data, y)
        ref = _direct(data.double().numpy(), y.numpy())
        for key in ("nc1", "nc1_quotient", "equinorm", "equiangularity", "cdnv", "cdnv_unbiased"):
            assert result[key] == pytest.approx(single[key], rel=1e-9), key
            assert result[key] == pytest.approx(ref[key], rel=1e-6), key


def test_collapse_is_exact_far_from_the_origin():
    # Raw moments lose every digit of the within-class scatter at this offset (NC1 was off by 0.23).
    g = torch.Generator().manual_seed(7)
    means = 3 * torch.randn(5, 16, generator=g, dtype=torch.float64)
    y = torch.arange(5).repeat(40)
    x = means[y] + 0.1 * torch.randn(200, 16, generator=g, dtype=torch.float64) + 1e5
    ref = _direct(x.numpy(), y.numpy())
    for batch_size in (200, 23):
        ours = neural_collapse(x, y, batch_size=batch_size)
        for key, value in ref.items():
            assert ours[key] == pytest.approx(value, rel=1e-6), (key, batch_size)


def test_batches_missing_classes_merge_exactly():
    g = torch.Generator().manual_seed(8)
    y = torch.arange(4).repeat_interleave(10)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64) + 2 * y[:, None] + 1e4
    metric = ClassStatistics(4, 5)
    metric.update(x[:20], y[:20])  # classes 0 and 1 only
    metric.update(x[:0], y[:0])  # an empty batch, as a rank without data has
    metric.update(x[20:], y[20:])  # classes 2 and 3 only
    first, second = ClassStatistics(4, 5), ClassStatistics(4, 5)
    first.update(x[:20], y[:20])
    second.update(x[20:], y[20:])
    first.merge_state(second)  # what torchmetrics' merge_state does across metric copies
    ref = _direct(x.numpy(), y.numpy())
    for ours in (metric.compute(), first.compute()):
        for key, value in ref.items():
            assert ours[key] == pytest.approx(value, rel=1e-9), key


def test_unbiased_cdnv_is_undefined_when_means_are_closer_than_their_noise():
    # Corrected squared distance: 0.1^2 - 2/2 - 2/2 < 0, so the corrected CDNV has no value.
    x = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.1, 1.0], [0.1, -1.0], [9.0, 9.0], [9.0, 11.0]])
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    nc = neural_collapse(x, y)
    assert math.isnan(nc["cdnv_unbiased"])
    assert "1 of 3 class pairs" in nc["undefined"]["cdnv_unbiased"]
    assert math.isfinite(nc["cdnv"]) and nc["cdnv"] > 0


def test_one_sample_classes_skip_only_what_is_undefined():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0], [9.0, 1.0], [9.0, 0.0]])
    y = torch.tensor([0, 0, 1, 2, 2])
    nc = neural_collapse(x, y)
    assert math.isnan(nc["cdnv_unbiased"]) and "one sample" in nc["undefined"]["cdnv_unbiased"]
    assert math.isfinite(nc["nc1"]) and math.isfinite(nc["cdnv"])


def test_bad_input_for_collapse():
    with pytest.raises(BenchError, match="at least two classes"):
        neural_collapse(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    bad = torch.randn(6, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(BenchError, match="NaN"):
        neural_collapse(bad, torch.tensor([0, 0, 0, 1, 1, 1]))
    with pytest.raises(BenchError, match="class means coincide"):
        neural_collapse(torch.ones(6, 3), torch.tensor([0, 0, 0, 1, 1, 1]))


def test_nc3_and_nc4():
    means = etf(4, 6).float()
    assert nc3_self_duality(means - means.mean(0), means) == pytest.approx(0, abs=1e-6)
    assert nc3_self_duality(torch.randn(4, 6), means) > 0.1
    x = means.repeat(3, 1) + 0.01 * torch.randn(12, 6)
    agree = NearestCentreAgreement(means)
    agree.update(x, torch.arange(4).repeat(3))
    assert float(agree.compute()) == 0.0
    agree.update(x, torch.zeros(12, dtype=torch.long))
    assert float(agree.compute()) == pytest.approx(9 / 24)


def test_geometric_complexity_equals_frobenius_norm_for_a_linear_map():
    lin = nn.Linear(7, 5, bias=True).double()
    x = torch.randn(20, 7, dtype=torch.float64)
    gc = geometric_complexity(lin, [x[:10], x[10:]], probes=5)
    assert gc["exact"] and gc["gc"] == pytest.approx(float(lin.weight.detach().pow(2).sum()), rel=1e-9)


def test_geometric_complexity_estimate_is_close_to_the_exact_jacobian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 16))
    x = torch.randn(200, 10)
    exact = exact_jacobian_sq_norm(model, x).mean().item()
    est = geometric_complexity(model, [x], probes=6)["gc"]
    assert abs(est - exact) / exact < 0.05


def test_geometric_complexity_refuses_a_non_differentiable_model():
    class Rounder(nn.Module):
        def forward(self, x):
            return torch.round(x).detach()

    with pytest.raises(BenchError, match="differentiabl"):
        geometric_complexity(Rounder(), [torch.randn(4, 3)])


@pytest.mark.parametrize("n, d", [(60, 8), (12, 40)])  # more and fewer samples than dimensions
def test_logme_matches_direct_evidence_with_log_determinants(n, d):
    g = torch.Generator().manual_seed(n)
    f = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (torch.arange(n) % 3)
    col = (y == 1).double()
    for alpha, beta in [(0.5, 2.0), (3.0, 0.7)]:
        cov = f @ f.T / alpha + torch.eye(n, dtype=torch.float64) / beta
        _, logdet = torch.linalg.slogdet(cov)
        direct = -0.5 * (n * math.log(2 * math.pi) + logdet + col @ torch.linalg.solve(cov, col))
        assert log_evidence(f, col, alpha, beta) == pytest.approx(float(direct), rel=1e-9)
    score = logme(f, y)
    assert math.isfinite(score["logme"])


def _noise_free_evidence(f: torch.Tensor, col: torch.Tensor) -> float:
    """The evidence as beta -> inf, maximised over alpha: col ~ N(0, F F^T / alpha), F F^T invertible."""
    n = len(f)
    gram = f @ f.T
    q = float(col @ torch.linalg.solve(gram, col))
    alpha = n / q
    _, logdet = torch.linalg.slogdet(gram / alpha)
    return -0.5 * (n * math.log(2 * math.pi) + float(logdet) + alpha * q)


def test_logme_takes_the_noise_free_limit_when_n_is_below_d_and_classes_separate():
    # Fewer samples than dimensions and separable classes: the evidence grows with beta up to a
    # finite limit (noise-free regression). The fixed point ran beta into an OverflowError.
    g = torch.Generator().manual_seed(0)
    n, d = 12, 40
    y = torch.arange(n) % 3
    f = torch.randn(n, d, generator=g, dtype=torch.float64)
    f[:, :3] += 5 * nn.functional.one_hot(y, 3).double()
    score = logme(f, y)
    limits = [_noise_free_evidence(f, (y == k).double()) for k in range(3)]
    assert score["noise_free_classes"] == 3 and score["beta_mean"] == math.inf
    assert score["logme"] == pytest.approx(sum(limits) / 3 / n, rel=1e-9)
    for k, limit in enumerate(limits):  # the limit is the supremum over finite (alpha, beta)
        col = (y == k).double()
        assert log_evidence(f, col, n / float(col @ torch.linalg.solve(f @ f.T, col)), math.inf) == pytest.approx(limit)
        for alpha in (1.0, 10.0, 100.0, 1000.0):
            for beta in (1.0, 1e3, 1e6, 1e9):
                assert log_evidence(f, col, alpha, beta) <= limit + 1e-9


def test_logme_takes_the_zero_weight_limit_for_uninformative_features():
    # Random features and labels: the evidence is highest as alpha -> inf (the weights vanish and
    # the column is pure noise), where it equals the evidence of N(0, nu I) with nu = |y|^2 / N.
    g = torch.Generator().manual_seed(0)
    n, d = 12, 40
    f = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.arange(n) % 3
    score = logme(f, y)
    assert math.isfinite(score["logme"])
    noise_only = -0.5 * (math.log(2 * math.pi) + math.log(4 / 12) + 1)  # per sample, |y|^2 = 4 of 12
    assert score["logme"] >= noise_only - 1e-12


def test_logme_fixed_point_maximises_the_evidence():
    g = torch.Generator().manual_seed(5)
    f = torch.randn(80, 10, generator=g, dtype=torch.float64)
    y = (f[:, 0] > 0).long()
    from bench.diagnostics.transferability import _logme_column, _project, _thin_svd

    u, s = _thin_svd(f)
    z, rest = _project(u, y.double()[:, None])
    evidence, alpha, beta = _logme_column(s**2, z[:, 0], float(rest[0]), len(f))
    assert math.isfinite(alpha) and math.isfinite(beta)
    assert evidence == pytest.approx(log_evidence(f, y.double(), alpha, beta), rel=1e-12)
    best = log_evidence(f, y.double(), alpha, beta)
    for da, db in [(1.2, 1), (0.8, 1), (1, 1.2), (1, 0.8)]:
        assert log_evidence(f, y.double(), alpha * da, beta * db) <= best + 1e-9


def test_logme_and_h_score_prefer_informative_features():
    g = torch.Generator().manual_seed(2)
    y = torch.arange(4).repeat(50)
    good = torch.randn(200, 6, generator=g) + 3 * nn.functional.one_hot(y, 6).float()
    bad = torch.randn(200, 6, generator=g)
    assert logme(good, y)["logme"] > logme(bad, y)["logme"]
    assert h_score(good, y) > h_score(bad, y)
    assert ncc_accuracy(good, y) > ncc_accuracy(bad, y)


def test_h_score_without_shrinkage_matches_numpy():
    g = torch.Generator().manual_seed(3)
    y = torch.arange(3).repeat(40)
    f = torch.randn(120, 5, generator=g, dtype=torch.float64) + y[:, None]
    x = f.numpy() - f.numpy().mean(0)
    cov = x.T @ x / len(x)
    mu = np.stack([x[y.numpy() == k].mean(0) for k in range(3)])
    between = (mu * 40).T @ mu / 120
    assert h_score(f, y, shrinkage=False) == pytest.approx(np.trace(np.linalg.solve(cov, between)), rel=1e-8)


def _ledoit_wolf_direct(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit & Wolf (2004) on centred rows x: shrink S = x^T x / n towards mu I, mu = tr(S) / d."""
    n, d = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / d
    delta2 = ((s - mu * np.eye(d)) ** 2).sum() / d
    beta2 = sum(((np.outer(r, r) - s) ** 2).sum() for r in x) / n**2 / d
    alpha = min(beta2, delta2) / delta2
    return (1 - alpha) * s + alpha * mu * np.eye(d), alpha


@pytest.mark.parametrize("n, d", [(120, 5), (30, 50)])
def test_regularised_h_score_matches_the_published_formula(n, d):
    # Ibrahim et al. 2022: tr(cov_alpha(f)^-1 (1 - alpha) cov(E[f | y])), cov(E[f | y]) over N - 1.
    g = torch.Generator().manual_seed(n)
    y = torch.cat([torch.zeros(n // 2), torch.ones(n // 3), torch.full((n - n // 2 - n // 3,), 2)]).long()
    f = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.7 * y[:, None]
    x = f.numpy() - f.numpy().mean(0)
    cov_alpha, alpha = _ledoit_wolf_direct(x)
    assert 0 < alpha < 1
    cond = np.stack([x[y.numpy() == k].mean(0) for k in range(3)])[y.numpy()]
    between = np.cov(cond, rowvar=False)
    expected = np.trace(np.linalg.solve(cov_alpha, (1 - alpha) * between))
    assert h_score(f, y) == pytest.approx(expected, rel=1e-8)


def test_linear_cka_properties():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3 * x @ q) == pytest.approx(1.0)  # rotation and scale invariant
    assert linear_cka(x, x @ q, debiased=True) == pytest.approx(1.0)
    noise = torch.randn(50, 8, generator=g, dtype=torch.float64)
    xc, nc = x - x.mean(0), noise - noise.mean(0)
    feature_form = float((nc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (nc.T @ nc).norm()))
    assert linear_cka(x, noise) == pytest.approx(feature_form, rel=1e-9)
    assert abs(linear_cka(x, noise, debiased=True)) < linear_cka(x, noise)  # the bias inflates CKA


def test_ncti_ranks_the_more_collapsed_backbone_higher():
    a = {"nc1": 0.1, "equinorm": 0.05, "max_angle": 0.02, "ncc_accuracy": 0.95}
    b = {"nc1": 2.0, "equinorm": 0.3, "max_angle": 0.2, "ncc_accuracy": 0.6}
    scores = ncti_scores({"a": a, "b": b})
    assert scores["a"] == pytest.approx(3.0) and scores["b"] == pytest.approx(0.0)
