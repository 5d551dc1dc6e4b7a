"""The support-conditioned head generator (D2NWG): schedule, symmetry, determinism, a tiny fit,
checkpoint checks and meta-train/meta-test separation."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from bench import BenchError
from bench.weightspace.generator.metatasks import (
    ClassSplit,
    GaussianFamily,
    build_meta_source,
    build_metatasks,
    check_no_leak,
    draw_task,
    normalize,
    parse_classes,
)
from bench.weightspace.generator.model import CONFIG_FILE, MODEL_FILE, HeadGenerator

DIM = 12


def tiny_config(sources=None, dim=DIM, norm="l2") -> dict:
    from bench.weightspace.generator.diffusion import training_schedule

    sources = sources or [{"dataset": "gmm:t", "backbone": "f" * 64, "backbone_name": "gmm-family:t", "dim": dim,
                           "meta_train_classes": list(range(10)), "meta_test_classes": list(range(100, 110))}]
    return {"format": "bench-d2nwg/1", "embedding_dim": dim, "norm": norm,
            "backbone_fingerprint": sources[0]["backbone"],
            "sources": sources,
            "model": {"latent": 4, "vae_hidden": 16, "vae_depth": 1, "width": 16, "set_width": 8, "heads": 2,
                      "set_layers": 1, "class_layers": 1},
            "schedule": dict(training_schedule(100).config), "latent_scale": 1.0}


def random_generator(seed=0, **kw) -> HeadGenerator:
    """Random weights everywhere (the zero-initialised output layer too), so outputs depend on
    every input: symmetry and determinism tests are not trivially true."""
    torch.manual_seed(seed)
    gen = HeadGenerator(tiny_config(**kw))
    with torch.no_grad():
        for p in gen.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.3)
    return gen.eval()


def support(c=4, s=3, d=DIM, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(c, s, d, generator=g) + 2 * torch.randn(c, 1, d, generator=g), dim=-1)
    return x, torch.ones(c, s, dtype=torch.bool)


# ---- the forward process ---------------------------------------------------------------------
def test_forward_noising_matches_closed_form():
    from bench.weightspace.generator.training import LatentDiffusionModule

    gen = HeadGenerator(tiny_config())
    schedule = LatentDiffusionModule(gen, 1e-3, 10, 1).schedule  # the one training uses
    steps = schedule.config.num_train_timesteps

    # Cosine schedule (Nichol & Dhariwal 2021): alpha_bar(t) from its formula, betas capped at 0.999.
    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)], dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 4, generator=g)
    noise = torch.randn(5, 3, 4, generator=g)
    t = torch.tensor([0, 1, steps // 2, steps - 2, steps - 1])
    got = schedule.add_noise(x0, noise, t)
    a = alpha_bar[t].float().view(-1, 1, 1)
    assert torch.allclose(got, a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-5)
    # and as a distribution: q(x_t | x_0) = N(sqrt(abar) x_0, (1 - abar) I)
    t_mid = torch.full((20000,), steps // 3)
    x0 = torch.full((20000, 1), 1.5)
    xt = schedule.add_noise(x0, torch.randn(20000, 1, generator=g), t_mid)
    a = float(alpha_bar[steps // 3])
    assert abs(float(xt.mean()) - math.sqrt(a) * 1.5) < 0.03
    assert abs(float(xt.var()) - (1 - a)) < 0.03


# ---- symmetry and determinism ----------------------------------------------------------------
@pytest.mark.parametrize("select,sampler", [("support", "ddim"), ("mean", "ddpm")])
def test_generated_heads_are_equivariant_to_class_order(select, sampler):
    gen = random_generator()
    x, mask = support()
    classes = [3, 7, 11, 19]
    w, b = gen.generate(x, mask, classes, 5, steps=6, samples=3, select=select, sampler=sampler)
    perm = torch.tensor([2, 0, 3, 1])
    wp, bp = gen.generate(x[perm], mask[perm], [classes[i] for i in perm], 5, steps=6, samples=3, select=select,
                          sampler=sampler)
    assert torch.allclose(wp, w[perm], atol=1e-5) and torch.allclose(bp, b[perm], atol=1e-5)
    # shuffling the samples within a class changes nothing either (a set encoder)
    ws, _ = gen.generate(x[:, [2, 0, 1]], mask, classes, 5, steps=6, samples=3, select=select, sampler=sampler)
    assert torch.allclose(ws, w, atol=1e-5)


def test_same_seed_same_head_and_seed_matters():
    gen = random_generator()
    x, mask = support()
    classes = [0, 1, 2, 3]
    a = gen.generate(x, mask, classes, 11, steps=5, samples=4, sampler="ddpm")
    b = gen.generate(x, mask, classes, 11, steps=5, samples=4, sampler="ddpm")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = gen.generate(x, mask, classes, 12, steps=5, samples=4, sampler="ddpm")
    assert not torch.allclose(a[0], c[0])
    # a torch.Generator seeded alike gives the same head as well
    d = gen.generate(x, mask, classes, torch.Generator().manual_seed(3), steps=5, samples=4)
    e = gen.generate(x, mask, classes, torch.Generator().manual_seed(3), steps=5, samples=4)
    assert torch.equal(d[0], e[0])


def test_support_selection_keeps_the_most_likely_sample():
    from bench.weightspace.generator.diffusion import head_log_likelihood

    x = torch.eye(3)
    y = torch.arange(3)
    good = torch.cat([torch.eye(3), torch.zeros(3, 1)], 1)
    bad = good[[1, 2, 0]]
    ll, temp = head_log_likelihood(torch.stack([bad, good, -good]), x, y)
    assert int(ll.argmax()) == 1 and float(temp[1]) > 1  # a correct head prefers sharp logits


# ---- trained target heads --------------------------------------------------------------------
def test_logistic_heads_match_sklearn_and_canonical_rows_keep_predictions():
    from sklearn.linear_model import LogisticRegression

    from bench.weightspace.generator.target_heads import canonical_rows, fit_logistic_heads, stratified_validation_mask

    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(20)
    x = torch.randn(2, 60, 5, generator=g) + 1.5 * F.one_hot(y, 5).float() + 3.0  # a common offset too
    fit = fit_logistic_heads(x, y.expand(2, -1).clone(), 3, weight_decays=(1e-2,))
    lam = 1e-2
    ref = LogisticRegression(C=1 / (lam * 60), tol=1e-10, max_iter=10000).fit(x[1].numpy(), y.numpy())
    w = fit.weights[1] - fit.weights[1].mean(0)
    ref_w = torch.tensor(ref.coef_, dtype=torch.float32)
    assert torch.allclose(w, ref_w - ref_w.mean(0), atol=2e-3)
    assert fit.max_grad < 1e-3
    rows, scale = canonical_rows(fit.weights, fit.bias)
    xa = torch.cat([x, torch.ones(2, 60, 1)], -1)
    before = (x @ fit.weights.transpose(1, 2) + fit.bias[:, None]).argmax(-1)
    assert torch.equal((xa @ rows.transpose(1, 2)).argmax(-1), before)
    assert torch.allclose(rows[..., :-1].square().sum(-1).mean(-1), torch.ones(2))
    # validation split: a quarter of each class, padding never chosen, one sample always kept to train
    yy = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, -1, -1], [0, 1, 0, 1, 0, 1, 0, 1, 1, 0]])
    val = stratified_validation_mask(yy, 2, 0.5, torch.Generator().manual_seed(1))
    assert val[0, 8:].sum() == 0 and int(val[0, :4].sum()) == 2 and int(val[0, 4:8].sum()) == 2
    assert int(val[1][yy[1] == 1].sum()) == 2 and int(val[1][yy[1] == 0].sum()) == 2


def test_trained_head_needs_two_samples_per_class():
    from bench.weightspace.generator.target_heads import fit_logistic_heads

    with pytest.raises(BenchError, match="at least 2 per class"):
        fit_logistic_heads(torch.randn(1, 3, 4), torch.tensor([[0, 0, 1]]), 2)


# ---- a tiny fit ------------------------------------------------------------------------------
def test_tiny_fit_overfits_one_task(tmp_path):
    from bench.weightspace.generator.config import GeneratorFitConfig
    from bench.weightspace.generator.training import fit_generator

    cfg = GeneratorFitConfig(out=str(tmp_path / "gen"), sources=["gmm:a"], tasks=[1], ways=(4, 4), per_class=(40, 40),
                             shots=[5], dim=DIM, latent=8, vae_hidden=64, width=32, set_width=16, heads=2,
                             set_layers=1, class_layers=1, vae_steps=300, diffusion_steps=400, batch_size=1,
                             noise_levels=64, lr=1e-2, prediction="v_prediction", cache_dir=str(tmp_path / "cache"),
                             wandb={"mode": "disabled"}, accelerator="cpu", progress=False)
    path = fit_generator(cfg)
    gen = HeadGenerator.load(path)
    from bench.weightspace.generator.metatasks import MetaTaskSet

    tasks = MetaTaskSet.load(path / "metatasks.safetensors")
    src = build_meta_source("gmm:a", dim=DIM)
    x, y = tasks.pool(0, [src])
    rows = tasks.rows[0, :4]
    trained = float(((x @ rows[:, :-1].T + rows[:, -1]).argmax(1) == y).float().mean())
    shots = torch.stack([x[y == c][:5] for c in range(4)])
    w, b = gen.generate(shots, torch.ones(4, 5, dtype=torch.bool), tasks.task_classes(0), 0, steps=20, samples=4)
    generated = float(((x @ w.T + b).argmax(1) == y).float().mean())
    assert trained > 0.6
    assert generated >= trained - 0.05, (generated, trained)
    cos = F.cosine_similarity(torch.cat([w, b[:, None]], 1).flatten(), rows.flatten(), dim=0)
    assert cos > 0.95
    saved = json.loads((path / CONFIG_FILE).read_text())
    assert saved["embedding_dim"] == DIM and saved["sources"][0]["dataset"] == "gmm:a"
    assert saved["sources"][0]["meta_train_classes"][:3] == [0, 1, 2]


TINY_FIT = ["--source", "gmm:a", "--tasks", "2", "--ways", "3", "3", "--per-class", "10", "10", "--shots", "2",
            "--latent", "4", "--width", "16", "--vae-steps", "3", "--diffusion-steps", "3", "--batch-size", "2",
            "--threads", "1", "--accelerator", "cpu", "--no-progress", f"dim={DIM}", "vae_hidden=16", "set_width=8",
            "heads=2", "set_layers=1", "class_layers=1"]


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory):
    """A checkpoint of `bench generator fit` in seconds (3 steps per stage), fitted with W&B mode
    `auto` and no credentials."""
    from bench.cli import main

    root = tmp_path_factory.mktemp("gens")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("WANDB_API_KEY", raising=False)
        mp.delenv("WANDB_MODE", raising=False)
        mp.setenv("HOME", str(root))  # no ~/.netrc: no credentials
        assert main(["generator", "fit", *TINY_FIT, "--cache-dir", str(root / "cache"), "--wandb", "auto",
                     "--out", str(root / "first")]) == 0
    return root / "first"


def test_fit_config_is_a_run_style_config_and_a_fit_replays_from_it(tiny_generator, tmp_path, capsys):
    """`bench generator fit` reads keys like `bench run`, saves its resolved config with the
    checkpoint, and `-c <checkpoint>/config.yaml` fits the same generator again. Its W&B mode is
    bench.runtime's: `auto` (which the generator refused before) is offline without credentials."""
    from safetensors.torch import load_file

    from bench.cli import main
    from bench.config import load_config
    from bench.weightspace.generator.config import GeneratorFitConfig

    cfg = load_config(None, ["sources=gmm:a"], model=GeneratorFitConfig)
    assert cfg.sources == ["gmm:a"] and cfg.tasks == [400] and cfg.wandb.project == "bench-generator"
    with pytest.raises(BenchError, match=r"^config: 2 source\(s\) but 1 task count"):
        load_config(None, ["sources=[gmm:a, digits]", "tasks=[5]"], model=GeneratorFitConfig)
    with pytest.raises(BenchError, match=r"^config: 'wandb.mode' = 'sometimes' is not valid: expected auto"):
        load_config(None, ["wandb.mode=sometimes"], model=GeneratorFitConfig)
    with pytest.raises(BenchError, match=r"^config: ways is \[MIN, MAX\]"):
        load_config(None, ["ways=[5, 3]"], model=GeneratorFitConfig)

    first = tiny_generator
    assert list((first.parent / "wandb").rglob("offline-run-*")), "auto without credentials runs offline"
    saved = load_config(first / "config.yaml", model=GeneratorFitConfig)
    assert saved.vae_steps == 3 and saved.ways == (3, 3) and saved.wandb.mode == "auto"
    assert main(["generator", "fit", "-c", str(first / "config.yaml"), "wandb.mode=disabled"]) == 2
    assert "exists; choose another out" in capsys.readouterr().err
    again = tmp_path / "again"
    assert main(["generator", "fit", "-c", str(first / "config.yaml"), f"out={again}", "wandb.mode=disabled"]) == 0
    a, b = load_file(first / MODEL_FILE), load_file(again / MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluation_end_to_end(tiny_generator, tmp_path, monkeypatch):
    """The generator evaluation (scripts/generator_eval.py) on the tiny checkpoint: every method
    on meta-test tasks, flipped labels, a family it never saw, memorisation and cost."""
    import csv

    from bench.weightspace.generator.evaluation import main

    monkeypatch.setenv("BENCH_GENERATOR_DIR", str(tmp_path / "elsewhere"))
    out = tmp_path / "eval"
    summary = main(["--ckpt", str(tiny_generator), "--tasks", "2", "--shots", "5", "--ways", "3", "--queries", "3",
                    "--per-class", "10", "--steps", "2", "--samples", "2", "--repeats", "1",
                    "--cache-dir", str(tiny_generator.parent / "cache"), "--out", str(out)])
    assert os.environ["BENCH_GENERATOR_DIR"] == str(tmp_path / "elsewhere")  # the caller's value is back
    clean = summary["sources"]["gmm:a"]["clean"]
    assert {"d2nwg", "d2nwg-mean", "qi2018", "simpleshot", "westerhoff2025", "dc", "retrieval", "trained"} <= set(clean)
    assert 0 <= clean["d2nwg"][5]["mean"] <= 1 and "flipped" in summary["sources"]["gmm:a"]
    assert "gmm:b (never seen)" in summary["sources"] and summary["cost"]["d2nwg_seconds_per_head"] > 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["condition"] for r in rows} == {"clean", "flip0.2", "cross-family"}
    assert (out / "accuracy.png").stat().st_size > 10_000


# ---- checkpoint checks -----------------------------------------------------------------------
def test_checkpoint_refuses_wrong_dimension_fingerprint_and_damage(tmp_path):
    gen = random_generator()
    path = gen.save(tmp_path / "g")
    loaded = HeadGenerator.load(path)
    ok = dict(dim=DIM, backbone="f" * 64, dataset="gmm:t", classes=[100, 101], norm="l2")
    loaded.check_use(**ok)
    with pytest.raises(BenchError, match="trained on 12-dim embeddings; this run's are 64-dim"):
        loaded.check_use(**{**ok, "dim": 64})
    with pytest.raises(BenchError, match="not of backbone 0123456789ab"):
        loaded.check_use(**{**ok, "backbone": "0123456789ab" * 5})
    with pytest.raises(BenchError, match="needs the backbone fingerprint"):
        loaded.check_use(**{**ok, "backbone": None})
    with pytest.raises(BenchError, match="NORM_pre is 'none'"):
        loaded.check_use(**{**ok, "norm": "none"})
    with pytest.raises(BenchError, match="exists"):
        gen.save(tmp_path / "g")
    # a model file that does not match its config's sha256 is refused
    blob = bytearray((path / MODEL_FILE).read_bytes())
    blob[-1] ^= 1
    (path / MODEL_FILE).write_bytes(bytes(blob))
    with pytest.raises(BenchError, match="does not match the sha256"):
        HeadGenerator.load(path)
    with pytest.raises(BenchError, match="does not exist"):
        HeadGenerator.load(tmp_path / "missing")


def test_gen_through_the_registry_checks_the_run(tmp_path, monkeypatch):
    from bench.imprint import build_head

    random_generator().save(tmp_path / "gens" / "tiny")
    monkeypatch.setenv("BENCH_GENERATOR_DIR", str(tmp_path / "gens"))
    x, _ = support(c=3, s=2)
    emb, labels = x.reshape(6, DIM), torch.tensor([100, 100, 104, 104, 107, 107])
    spec = "l2/d2nwg:ckpt=tiny,steps=4,samples=2/none/l2/max"
    head = build_head(spec, emb, labels, seed=1, dataset="gmm:t", backbone="f" * 64)
    again = build_head(spec, emb, labels, seed=1, dataset="gmm:t", backbone="f" * 64)
    assert head(emb).shape == (6, 3) and torch.equal(head(emb), again(emb))
    with pytest.raises(BenchError, match="not of backbone"):
        build_head(spec, emb, labels, seed=1, dataset="gmm:t", backbone="e" * 64)
    with pytest.raises(BenchError, match="12-dim"):
        build_head(spec, torch.randn(6, 20), labels, seed=1, dataset="gmm:t", backbone="f" * 64)
    with pytest.raises(BenchError, match=r"classes \[3\] of gmm:t were meta-train classes"):
        build_head(spec, emb, torch.tensor([3, 3, 104, 104, 107, 107]), seed=1, dataset="gmm:t", backbone="f" * 64)
    with pytest.raises(BenchError, match="neither a path nor a folder"):
        build_head("l2/d2nwg:ckpt=nothere/none/l2/max", emb, labels, dataset="gmm:t", backbone="f" * 64)
    with pytest.raises(BenchError, match="NORM_inf 'l2'"):
        build_head("l2/d2nwg:ckpt=tiny/none/none/max", emb, labels, dataset="gmm:t", backbone="f" * 64)
    with pytest.raises(BenchError, match="NORM_post"):
        build_head("l2/d2nwg:ckpt=tiny/l2/l2/max", emb, labels, dataset="gmm:t", backbone="f" * 64)
    with pytest.raises(BenchError, match="inner-product scoring"):
        build_head("l2/d2nwg:ckpt=tiny/none/l2/mnn", emb, labels, dataset="gmm:t", backbone="f" * 64)


# ---- meta-train / meta-test separation -------------------------------------------------------
def test_meta_test_classes_cannot_leak_into_meta_training():
    src = GaussianFamily("t", dim=DIM, seed=3)
    with pytest.raises(BenchError, match=r"classes \[5\] are both meta-train and meta-test"):
        ClassSplit(tuple(range(6)), tuple(range(5, 10)))
    # two entries for one dataset: the second trains on what the first holds out
    first = ClassSplit(tuple(range(5)), tuple(range(5, 10)))
    second = ClassSplit(tuple(range(5, 8)), (20,))
    with pytest.raises(BenchError, match="meta-test in one source entry and meta-train in another"):
        build_metatasks([(src, first, 2), (src, second, 2)], ways=(2, 3), per_class=(4, 4), progress=False,
                        weight_decays=(1e-1,))
    info = {"dataset": "digits", "backbone": "x"}
    check_no_leak([(info, first), ({"dataset": "digits", "backbone": "y"}, second)])  # other backbone: fine
    # tasks only ever use meta-train classes, and the split is written down with them
    tasks = build_metatasks([(src, first, 6)], ways=(2, 3), per_class=(4, 4), progress=False, weight_decays=(1e-1,))
    used = set(tasks.classes[tasks.classes >= 0].tolist())
    assert used <= set(first.train) and tasks.sources[0]["meta_test_classes"] == list(first.test)
    # a cached source refuses meta-train classes it does not have
    with pytest.raises(BenchError, match="not in"):
        ClassSplit.default(_cached_source(), "0-4,12")


def _cached_source():
    from bench.weightspace.generator.metatasks import CachedSource

    x = torch.randn(40, DIM)
    return CachedSource(x, torch.arange(4).repeat_interleave(10), "toy", "b" * 64, "toy-net")


def test_tasks_are_pure_functions_of_their_seed_and_sources_are_deterministic():
    src = build_meta_source("gmm:a", dim=DIM)
    a = draw_task(src, [5, 1, 9], 7, 6)
    b = draw_task(src, [1, 5, 9], 7, 6)
    assert torch.equal(a[0], b[0]) and a[1].tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert src.backbone == build_meta_source("gmm:a", dim=DIM).backbone != build_meta_source("gmm:b", dim=DIM).backbone
    cached = _cached_source()
    x, y, idx = cached.draw([2, 0], 3, torch.Generator().manual_seed(0))
    assert y.tolist() == [2, 2, 2, 0, 0, 0] and torch.equal(cached.embeddings[idx], x)
    assert parse_classes("0-2,7") == [0, 1, 2, 7]
    with pytest.raises(BenchError, match="not an int or a range"):
        parse_classes("0-x")
    assert torch.allclose(normalize(torch.tensor([[3.0, 4.0]]), "l2"), torch.tensor([[0.6, 0.8]]))


def test_cli_refuses_bad_input_in_one_line(capsys, tmp_path):
    from bench.cli import main

    assert main(["generator", "fit", "--source", "nope", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "unknown meta-task source 'nope'" in err and "\n" not in err
    (tmp_path / "taken").mkdir()
    assert main(["generator", "fit", "--out", str(tmp_path / "taken")]) == 2
    assert "exists; choose another out (--out) or pass overwrite=true" in capsys.readouterr().err
    assert main(["generator", "fit", "--train-classes", "digits"]) == 2
    assert "DATASET=CLASSES" in capsys.readouterr().err
    assert main(["generator", "show", "/nonexistent/ckpt"]) == 2
    assert "does not exist" in capsys.readouterr().err
