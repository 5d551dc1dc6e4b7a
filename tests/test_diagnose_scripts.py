import json
import math

import pytest
import torch

from bench.cli import main
from bench.diagnostics.collapse import etf
from bench.diagnostics.diagnose import correlations, format_correlations
from bench.diagnostics.local import feature_collapse
from bench.diagnostics.studies import feature_collapse as feature_collapse_study
from bench.diagnostics.studies import zoo_collapse


def test_role_collapse_of_exactly_collapsed_tokens():
    roles = torch.arange(4).repeat_interleave(5)
    tokens = etf(4, 6).float()[roles]
    fc = feature_collapse(tokens, roles)
    assert fc["nc1"] == pytest.approx(0, abs=1e-10)
    assert fc["role_mean_spectrum"][:3] == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)  # ETF: C-1 equal values
    assert fc["role_mean_spectrum"][3] == pytest.approx(0, abs=1e-6)
    noisy = feature_collapse(tokens + 0.5 * torch.randn(20, 6, generator=torch.Generator().manual_seed(0)), roles)
    assert noisy["nc1"] > 0.01


def test_diagnose_two_backbones_reports_correlations(tmp_path, monkeypatch, capsys):
    from bench.backbones import save_checkpoint
    from bench.backbones.tiny import TinyCNN

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    save_checkpoint(TinyCNN(8), tmp_path / "rand.safetensors", arch="tiny-cnn",
                    transform={"size": 8, "channels": 1, "mean": [0.3], "std": [0.4]}, width=8)
    (tmp_path / "t.yaml").write_text("name: t\ndataset: digits\nclass_splits: {novel: [5, 6, 7, 8, 9]}\n"
                                     "classes: [novel]\nshots: [5]\nqueries: test\nseeds: [0, 1]\n")
    code = main(["diagnose", f"task={tmp_path / 't.yaml'}", "wandb.mode=offline", "name=d",
                 f"diagnose.backbones=[tiny-digits, 'checkpoint:{tmp_path / 'rand.safetensors'}']",
                 "diagnose.gc_samples=32", "diagnose.gc_probes=4"])
    assert code == 0
    out = capsys.readouterr().out
    assert "nc1" in out and "Kendall tau needs at least 3 backbones, got 2" in out
    import csv

    with open(tmp_path / "runs" / "d" / "diagnostics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["backbone"] for r in rows} == {"tiny-digits", "checkpoint:rand.safetensors"}
    for r in rows:
        for key in ("nc1", "l2_nc1", "cdnv", "cdnv_unbiased", "logme", "h_score", "gc", "gc_normalized", "ncti"):
            assert math.isfinite(float(r[key])), key
    with open(tmp_path / "runs" / "d" / "cka.csv") as f:
        cka = list(csv.DictReader(f))
    assert 0 < float(cka[0]["linear_cka"]) <= 1
    assert list((tmp_path / "runs" / "d" / "wandb").glob("offline-run-*"))


def _rows(diag, acc):
    diag_rows = [{"backbone": b, "classes": "novel", "nc1": v, "cdnv_unbiased": u} for b, v, u in diag]
    acc_rows = [{"backbone": b, "classes": "novel", "method": "qi2018", "shots": 5, "acc": a} for b, a in acc]
    return correlations(diag_rows, acc_rows)


def test_rank_correlations_of_two_backbones_say_why_they_are_undefined():
    rows = _rows([("a", 0.1, 1.0), ("b", 0.5, 2.0)], [("a", 0.9), ("b", 0.7)])
    assert len(rows) == 2 and all(math.isnan(r["kendall_tau"]) for r in rows)
    assert all("at least 3 backbones" in r["undefined"] and "got 2" in r["undefined"] for r in rows)
    assert "at least 3 backbones" in format_correlations(rows)


def test_rank_correlations_name_the_backbone_whose_diagnostic_is_undefined():
    rows = _rows([("a", 0.1, 1.0), ("b", 0.5, float("nan")), ("c", 0.3, 3.0)],
                 [("a", 0.9), ("b", 0.7), ("c", 0.8)])
    by = {r["diagnostic"]: r for r in rows}
    assert by["nc1"]["kendall_tau"] == pytest.approx(-1.0) and by["nc1"]["undefined"] == ""
    assert math.isnan(by["cdnv_unbiased"]["kendall_tau"]) and "b" in by["cdnv_unbiased"]["undefined"]
    text = format_correlations(rows)
    assert "nc1" in text and "cdnv_unbiased" in text and "undefined" in text


def test_zoo_script_small(tmp_path):
    summary = zoo_collapse.main(["--out", str(tmp_path), "--epochs", "1", "--lrs", "0.05", "0.2",
                                           "--batch-sizes", "64", "--weight-decays", "0", "0.01",
                                           "--gc-samples", "64", "--gc-probes", "4"])
    assert len(summary["models"]) == 4 and len(summary["taus"]) == 8
    assert json.loads((tmp_path / "zoo.json").read_text())["models"][0]["gc_base"] > 0


def test_feature_collapse_script_small(tmp_path):
    results = feature_collapse_study.main(["--epochs", "30", "--seeds", "1", "--out", str(tmp_path / "fc.json")])
    assert [(r["layernorm"], r["samples_per_latent"]) for r in results] == [(False, 3), (False, 100), (True, 3), (True, 100)]
    many = [r for r in results if r["samples_per_latent"] == 100]
    few = [r for r in results if r["samples_per_latent"] == 3]
    assert all(m["test_acc"] > f["test_acc"] for m, f in zip(many, few))
    assert all(m["word_nc1"] < f["word_nc1"] for m, f in zip(many, few))
