"""The logistic-regression probe against scikit-learn, and DINOv2's weighted kNN against a direct computation."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from bench.imprint import SupportSet, build_head, build_head_grid, resolve
from bench.imprint.probes import C_GRID, DEFAULT_C
from bench.imprint.registry import get


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    return x[order].astype(np.float32), y[order]


@pytest.mark.parametrize("c", [0.01, 1.0])
def test_logreg_matches_sklearn_on_digits(digits, c):
    x, y = digits
    support, query = slice(0, 300), slice(300, None)
    head = build_head(f"none/logreg:c={c}/none/none/max", torch.from_numpy(x[support]), torch.from_numpy(y[support]))
    ours = float((head.predict(torch.from_numpy(x[query])).numpy() == y[query]).mean())
    reference = LogisticRegression(C=c, max_iter=10_000).fit(x[support], y[support]).score(x[query], y[query])
    assert abs(ours - reference) <= 0.005


def _episodes(digits, validation: bool):
    x, y = digits
    out = []
    for seed, start in enumerate((0, 200)):
        sl = slice(start, start + 120)
        val = (torch.from_numpy(x[1000 + start:1100 + start]), torch.from_numpy(y[1000 + start:1100 + start]))
        out.append(SupportSet(torch.from_numpy(x[sl]), torch.from_numpy(y[sl]), seed, torch.arange(10),
                              validation=val if validation else None))
    return out


@pytest.mark.parametrize("validation", [False, True])
def test_logreg_same_bits_batched_or_alone(digits, validation):
    eps = _episodes(digits, validation)
    specs = ["none/logreg/none/none/max", "l2/mean/l2/l2/max"]
    together = build_head_grid(specs, eps)[0]
    for ep, head in zip(eps, together):
        alone = build_head_grid(specs[:1], [ep])[0][0]
        assert torch.equal(alone.proxies, head.proxies) and torch.equal(alone.bias, head.bias)


def test_logreg_chooses_c_on_validation_else_default(digits):
    no_val, with_val = _episodes(digits, False)[0], _episodes(digits, True)[0]
    default = build_head_grid(["none/logreg/none/none/max"], [no_val])[0][0]
    fixed = build_head_grid([f"none/logreg:c={DEFAULT_C}/none/none/max"], [no_val])[0][0]
    assert torch.equal(default.proxies, fixed.proxies)
    chosen = build_head_grid(["none/logreg/none/none/max"], [with_val])[0][0]
    val_x, val_y = with_val.validation
    acc = lambda h: float((h.predict(val_x) == val_y).float().mean())
    # warm-started along the grid, the chosen fit is at least as good on validation as any cold fit but a hair
    best_cold = max(acc(build_head_grid([f"none/logreg:c={c}/none/none/max"], [with_val])[0][0]) for c in C_GRID)
    assert acc(chosen) >= best_cold - 0.02
    assert default.summary()["chosen"] == "c=1" and fixed.summary()["chosen"] == "c=1"
    assert chosen.summary()["chosen"] in {f"c={c:g}" for c in C_GRID}
    assert build_head_grid(["l2/mean/l2/l2/max"], [with_val])[0][0].summary()["chosen"] == ""
    # a twin episode without validation is not shared with one that has it
    pair = build_head_grid(["none/logreg/none/none/max"], [no_val, with_val])[0]
    assert torch.equal(pair[0].proxies, default.proxies) and torch.equal(pair[1].proxies, chosen.proxies)


def test_training_free_fact():
    assert get("gen", "logreg").training_free is False
    assert get("gen", "mean").training_free and get("gen", "ls").training_free
    assert resolve("logreg").gen.name == "logreg"


def _direct_knn(support, labels, queries, k, t, classes):
    s = torch.nn.functional.normalize(support.double(), dim=1)
    q = torch.nn.functional.normalize(queries.double(), dim=1)
    sim = q @ s.T
    top, idx = sim.topk(min(k, len(s)), dim=1)
    scores = torch.zeros(len(q), classes, dtype=torch.float64)
    for n in range(len(q)):
        for value, i in zip(top[n], idx[n]):
            scores[n, labels[i]] += torch.exp(value / t)
    return scores


@pytest.mark.parametrize("k", [3, 20, 200])
@pytest.mark.parametrize("spec", ["l2/all/none/l2/knn:k={k},t=0.07", "none/all/none/none/knn:k={k},t=0.07"])
def test_knn_matches_direct_computation(k, spec):
    gen = torch.Generator().manual_seed(0)
    support, queries = torch.randn(30, 8, generator=gen), torch.randn(50, 8, generator=gen)
    labels = torch.arange(30) % 4
    head = build_head(spec.format(k=k), support, labels)
    ours = head(queries).double()
    direct = _direct_knn(support, labels, queries, k, 0.07, 4)
    # DINOv2 normalises the top-k weights per query: one positive factor, so scores are proportional
    assert torch.allclose(ours, direct / direct.sum(1, keepdim=True), atol=1e-5)
    assert torch.equal(ours.argmax(1), direct.argmax(1))


def test_dinov2_knn_preset():
    spec = resolve("dinov2-knn")
    assert (spec.gen.name, spec.agg.name) == ("all", "knn")
    assert (spec.agg.get("agg", "k"), spec.agg.get("agg", "t")) == (20, 0.07)


def test_logreg_in_the_row_space_equals_the_full_problem():
    from bench.imprint.probes import fit_logreg, row_space

    rng = np.random.default_rng(1)
    flat, y = rng.normal(size=(24, 100)), np.repeat(np.arange(4), 6)
    flat[:, :4] += 2 * np.eye(4)[y]
    feats, basis = row_space(flat)
    assert feats.shape == (24, 24) and basis.shape == (24, 100)
    reduced = fit_logreg(feats, y, 4, 0.5)
    full = fit_logreg(flat, y, 4, 0.5)
    queries = rng.normal(size=(200, 100))
    lifted = np.hstack([reduced[:, :-1] @ basis, reduced[:, -1:]])
    assert np.allclose(lifted, full, atol=1e-4)
    ours, theirs = queries @ lifted[:, :-1].T + lifted[:, -1], queries @ full[:, :-1].T + full[:, -1]
    assert (ours.argmax(1) == theirs.argmax(1)).all()
