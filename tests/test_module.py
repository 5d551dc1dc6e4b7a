import pytest
import torch

from bench import BenchError
from bench.data.datamodules import EpisodeDataModule
from bench.data.episodes import sample_episode
from bench.data.synthetic import gaussian_mixture
from bench.imprint import build_head
from bench.module import ImprintingModule, trainer_for_imprinting

TASK = """name: small
dataset: digits
class_splits: {base: [0, 1, 2, 3, 4], novel: [5, 6, 7, 8, 9]}
classes: [novel, all]
shots: [1, 5, all]
queries: test
seeds: [0, 1]
"""
METHODS = "[qi2018,westerhoff2025,knn,simpleshot,hosoda2024,ls-oracle,l2/kmedoids:k=3/l2/l2/max]"


class Entry:
    """The three tensors an EpisodeDataModule reads from a cache entry."""

    def __init__(self, x, y):
        self.embeddings, self.labels, self.indices = x, y, torch.arange(len(y))


def test_module_heads_and_metrics_equal_the_library():
    x, y = gaussian_mixture(num_classes=4, dim=16, per_class=40, seed=3)
    xq, yq = gaussian_mixture(num_classes=4, dim=16, per_class=10, seed=4)
    pool, queries = Entry(x, y), Entry(xq, yq)
    ep = sample_episode(y.numpy(), [0, 1, 2, 3], 7, "test", seed=2, test_labels=yq.numpy())
    module = ImprintingModule(["qi2018", "l2/kmeans:k=3/l2/l2/max", "knn"], seed=2)
    trainer = trainer_for_imprinting(accelerator="cpu", devices=1)
    dm = EpisodeDataModule(pool, queries, ep, batch_size=5)  # several batches each way
    trainer.fit(module, datamodule=dm)
    assert not any(p.requires_grad for p in module.parameters())
    trainer.test(module, datamodule=dm, verbose=False)
    support = torch.as_tensor(ep.support)
    for spec in module.specs:
        ref = build_head(spec, x[support], y[support], seed=2)
        head = module.heads[module.head_key(spec)]
        assert torch.equal(head.proxies, ref.proxies)
        acc = (ref.predict(xq) == yq).float().mean().item()
        assert module.results[spec.name]["acc"] == pytest.approx(acc)


def test_testing_before_fitting_is_an_error():
    x, y = gaussian_mixture(num_classes=2, dim=4, per_class=10)
    ep = sample_episode(y.numpy(), [0, 1], 2, 3, seed=0)
    trainer = trainer_for_imprinting(accelerator="cpu", devices=1)
    with pytest.raises(BenchError, match="fit"):
        trainer.test(ImprintingModule(["qi2018"]), datamodule=EpisodeDataModule(Entry(x, y), None, ep),
                     verbose=False)


def test_end_to_end_on_images_equals_the_cached_path(quickstart_cache):
    from bench.backbones import build_backbone
    from bench.data.datamodules import ImageEpisodeDataModule
    from bench.data.sources import build_source
    from bench.extract import EmbeddingCache, extract

    bb = build_backbone("tiny-digits")
    pool, test = build_source("digits", "train"), build_source("digits", "test")
    ep = sample_episode(pool.labels, [5, 6, 7, 8, 9], 5, "test", seed=1, test_labels=test.labels)
    methods = ["qi2018", "westerhoff2025"]

    e2e = ImprintingModule(methods, backbone=bb.model, seed=1)
    trainer = trainer_for_imprinting(accelerator="cpu", devices=1)
    dm = ImageEpisodeDataModule(pool, test, ep, bb.transform, batch_size=16)
    trainer.fit(e2e, datamodule=dm)
    trainer.test(e2e, datamodule=dm, verbose=False)

    quiet = {"enable_progress_bar": False}
    cache = EmbeddingCache(quickstart_cache)  # the session's: tiny-digits on both splits, so hits only
    cached = ImprintingModule(methods, seed=1)
    dm2 = EpisodeDataModule(extract(bb, pool, cache, trainer_kwargs=quiet), extract(bb, test, cache, trainer_kwargs=quiet), ep)
    trainer = trainer_for_imprinting(accelerator="cpu", devices=1)
    trainer.fit(cached, datamodule=dm2)
    trainer.test(cached, datamodule=dm2, verbose=False)
    for key in e2e.heads:
        assert torch.allclose(e2e.heads[key].proxies, cached.heads[key].proxies, atol=1e-5)
    for name in e2e.results:
        assert e2e.results[name]["acc"] == pytest.approx(cached.results[name]["acc"], abs=1e-6)
