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


def _ddp_worker(fabric, x, y):
    metric = ClassStatistics(4, x.shape[1]).to(fabric.device)
    shard = slice(fabric.global_rank, None, fabric.world_size)
    metric.update(x[shard], y[shard])
    result = metric.compute()
    # Without this, a rank could exit while gloo still serves the other rank's last
    # collective, and its threads abort the process at exit (seen once in CI).
    fabric.barrier()
    torch.distributed.destroy_process_group()
    return result


def test_two_processes_give_the_same_collapse_as_one():
    from lightning.fabric import Fabric

    g = torch.Generator().manual_seed(1)
    x = torch.randn(101, 6, generator=g) + torch.arange(4).repeat(26)[:101, None].float()
    y = torch.arange(4).repeat(26)[:101]
    single = neural_collapse(x, y)
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    multi = fabric.launch(_ddp_worker, x, y)
    for key in ("nc1", "nc1_quotient", "equinorm", "equiangularity", "cdnv", "cdnv_unbiased"):
        assert multi[key] == pytest.approx(single[key], rel=1e-9), key


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


def test_logme_fixed_point_maximises_the_evidence():
    g = torch.Generator().manual_seed(5)
    f = torch.randn(80, 10, generator=g, dtype=torch.float64)
    y = (f[:, 0] > 0).long()
    from bench.diagnostics.transferability import _logme_column

    u, s, _ = torch.linalg.svd(f, full_matrices=False)
    alpha, beta = _logme_column(u, s**2, y.double(), len(f))
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
