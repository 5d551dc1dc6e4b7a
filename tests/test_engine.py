"""The imprint stage of `bench run` / `bench imprint`: the grid engine over every episode, with
no Trainer per episode, the same numbers as the per-episode Lightning path, and the same
numbers whatever the batching or the number of processes."""

import csv
import dataclasses
import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from bench import pipeline
from bench.config import load_config
from bench.data.datamodules import EpisodeDataModule
from bench.imprint import ImprintedHead, expand_grid
from bench.metrics import HeadGridMetrics, head_metrics
from bench.module import ImprintingModule, trainer_for_imprinting
from bench.naming import head_path
from tests.helpers import copy_cache, one_and_two_processes

ROOT = Path(__file__).resolve().parents[1]
PRESET_METHODS = "[qi2018,hosoda2024,janson2022,westerhoff2025,simpleshot,ncm,knn,ls-oracle,dinov2-knn,logreg]"


@pytest.fixture(scope="module")
def quickstart(quickstart_cache, tmp_path_factory):
    """The quickstart's config and its cached embeddings (the session's cache, read only)."""
    root = tmp_path_factory.mktemp("engine")
    cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                      [f"cache_dir={quickstart_cache}", f"out_dir={root / 'runs'}", "wandb.mode=disabled"])
    pipeline.quiet_lightning()
    return cfg, pipeline.extract_stage(cfg, require_cached=True), root


def _two_seeds(emb):
    """The quickstart's suite on seeds 0 and 1 (16 episodes): every (classes, shots) group still
    batches several episodes together."""
    return dataclasses.replace(emb, suite=emb.suite.model_copy(update={"seeds": [0, 1]}))


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "gen_time_s"} for r in rows]


def test_stage_equals_the_per_episode_trainer_path(quickstart, tmp_path, monkeypatch):
    """Rows and heads of the engine equal the path that built one ImprintingModule, data
    module and Trainer per episode (the product's imprint stage before the engine)."""
    cfg, emb, _ = quickstart
    emb = _two_seeds(emb)
    grid = expand_grid(cfg.methods)
    built = []
    real_init = L.Trainer.__init__

    def counting_init(self, *args, **kwargs):
        built.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "__init__", counting_init)
    cfg = cfg.model_copy(update={"save_heads": True})
    rows, _, _ = pipeline.imprint_stage(cfg, emb, tmp_path, grid)
    assert built == []  # no Trainer anywhere in the imprint stage
    monkeypatch.setattr(L.Trainer, "__init__", real_init)

    reference = pipeline.reference_stats(cfg, emb, grid)
    episodes = list(emb.suite.episodes(emb.pool.labels.numpy(), emb.queries.labels.numpy()))
    assert len(rows) == len(episodes) * len(grid.specs) == 16 * 11
    by_cell = {(r["classes"], r["shots"], r["seed"], r["method"]): r for r in rows}
    for subset, ep in episodes:
        module = ImprintingModule(grid.specs, seed=ep.seed, reference=reference)
        dm = EpisodeDataModule(emb.pool, emb.queries, ep, batch_size=4096)
        trainer = trainer_for_imprinting(accelerator="cpu", devices=1)
        trainer.fit(module, datamodule=dm)
        trainer.test(module, datamodule=dm, verbose=False)
        for spec in grid.specs:
            row = by_cell[(subset, str(ep.shots), ep.seed, spec.name)]
            before = module.results[spec.name]
            for key, value in before.items():
                if key != "gen_time_s":
                    assert row[key] == pytest.approx(value, abs=1e-6), (subset, ep.shots, ep.seed, spec.name, key)
            saved = ImprintedHead.load(head_path(tmp_path, subset, ep.shots, ep.seed, spec.name))
            head = module.heads[module.head_key(spec)]
            assert torch.equal(saved.proxies, head.proxies) and torch.equal(saved.proxy_labels, head.proxy_labels)
            assert torch.equal(saved.classes, head.classes) and torch.equal(saved.center, head.center)


def test_batching_and_query_chunks_do_not_change_a_number(quickstart, tmp_path):
    cfg, emb, _ = quickstart
    emb = _two_seeds(emb)
    grid = expand_grid(cfg.methods)
    big, _, _ = pipeline.imprint_stage(cfg, emb, None, grid)
    tiny_cfg = cfg.model_copy(update={"imprint": cfg.imprint.model_copy(update={"max_batch_bytes": 1})})
    tiny, _, _ = pipeline.imprint_stage(tiny_cfg, emb, None, grid)  # one episode per batch, one query per chunk
    assert _strip(big) == _strip(tiny)


def test_head_grid_metrics_equal_torchmetrics():
    g = torch.Generator().manual_seed(0)
    for classes in (2, 5, 9):
        target = torch.randint(0, classes, (60,), generator=g)
        target[target == 1] = 0  # a class without queries
        preds = torch.randint(0, classes, (4, 60), generator=g)
        preds[0] = target  # a perfect head
        ours = HeadGridMetrics(4, classes)
        ours.update(preds[:, :25], target[:25])
        ours.update(preds[:, 25:], target[25:])
        values = ours.compute()
        assert values["acc"][0] == 1.0
        for h in range(4):
            ref = head_metrics(classes)
            ref.update(torch.nn.functional.one_hot(preds[h], classes).float(), target)
            expected = ref.compute()
            for key in ("acc", "balanced_acc", "macro_f1"):
                assert float(values[key][h]) == pytest.approx(float(expected[key]), abs=1e-6)
            assert torch.allclose(values["per_class_acc"][h].float(), expected["per_class_acc"], atol=1e-6)


def _rows(run_dir):
    with open(run_dir / "results.csv") as f:
        return _strip(csv.DictReader(f))


def test_every_preset_is_bit_identical_on_one_and_two_processes(tmp_path, forks, quickstart_cache):
    """The quickstart suite with the 10 presets: `bench run` on 1 process, then `bench imprint`
    from the same cache on 2 (devices=2 alone picks our DDP), results and heads equal."""
    cache = copy_cache(quickstart_cache, tmp_path / "cache")
    common = ["-c", str(ROOT / "configs" / "quickstart.yaml"), f"methods={PRESET_METHODS}",
              f"cache_dir={cache}", f"out_dir={tmp_path / 'runs'}", "save_heads=true"]
    # Lightning's own launch of the same stage: test_extract's killed DDP extraction
    one_and_two_processes(forks, tmp_path, "run", common)
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    record = json.loads((two / "run.json").read_text())
    assert record["complete"] and record["world_size"] == 2
    cpus = len(os.sched_getaffinity(0))
    assert record["threads_per_process"] == max(1, cpus // 2)
    rows_one, rows_two = _rows(one), _rows(two)
    assert len(rows_one) == 24 * 10 and rows_one == rows_two
    heads = sorted(p.relative_to(one) for p in one.glob("heads/*/*.safetensors"))
    assert len(heads) == 24 * 10 and heads == sorted(p.relative_to(two) for p in two.glob("heads/*/*.safetensors"))
    for rel in heads:
        a, b = ImprintedHead.load(one / rel), ImprintedHead.load(two / rel)
        for name in ("proxies", "proxy_labels", "classes", "center", "bias"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (rel, name)
