import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from bench import BenchError
from bench.backbones import build_backbone
from bench.data.sources import build_source
from bench.extract import EmbeddingCache, extract, open_entry
from tests.helpers import write_image_folder

QUIET = {"enable_progress_bar": False}


@pytest.fixture(scope="module")
def tiny():
    return build_backbone("tiny-digits")


def test_extract_writes_a_complete_entry_and_reuses_it(tmp_path, tiny):
    cache = EmbeddingCache(tmp_path)
    src = build_source("digits", split="test")
    entry = extract(tiny, src, cache, trainer_kwargs=QUIET, batch_size=100)
    assert entry.embeddings.shape == (len(src), 64)
    assert torch.equal(entry.indices, torch.arange(len(src)))
    assert torch.equal(entry.labels, torch.from_numpy(src.labels))
    manifest = json.loads((entry.path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["fields"]["weights_sha256"] == tiny.fingerprint
    # direct embedding of the same images agrees with the cache
    x = torch.stack([tiny.transform(src.load(i)) for i in range(5)])
    assert torch.allclose(tiny.model(x), entry.embeddings[:5], atol=1e-5)

    mtime = (entry.path / "tensors.safetensors").stat().st_mtime_ns
    again = extract(tiny, src, cache, trainer_kwargs=QUIET)
    assert again.path == entry.path
    assert (entry.path / "tensors.safetensors").stat().st_mtime_ns == mtime  # a hit, not a rewrite


def test_a_different_transform_or_dtype_is_a_miss(tmp_path, tiny):
    cache = EmbeddingCache(tmp_path)
    src = build_source("digits", split="test")
    a = extract(tiny, src, cache, trainer_kwargs=QUIET)
    other = build_backbone("tiny-digits", transform={"size": 8, "channels": 1, "mean": [0.5], "std": [0.5]})
    b = extract(other, src, cache, trainer_kwargs=QUIET)
    c = extract(tiny, src, cache, trainer_kwargs=QUIET, dtype="float16")
    assert len({a.path, b.path, c.path}) == 3
    assert c.embeddings.dtype == torch.float16
    assert not torch.allclose(a.embeddings, b.embeddings)


def test_a_manifest_that_does_not_match_is_refused(tmp_path, tiny):
    cache = EmbeddingCache(tmp_path)
    src = build_source("digits", split="test")
    entry = extract(tiny, src, cache, trainer_kwargs=QUIET)
    manifest = json.loads((entry.path / "manifest.json").read_text())
    manifest["num_samples"] += 1
    manifest["tensors_sha256"] = "0" * 64
    (entry.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BenchError, match="broken.*checksum.*extract.rebuild=true"):
        open_entry(entry.path)
    with pytest.raises(BenchError, match="broken"):
        extract(tiny, src, cache, trainer_kwargs=QUIET)
    fixed = extract(tiny, src, cache, trainer_kwargs=QUIET, rebuild=True)
    assert fixed.manifest["num_samples"] == len(src)


class Boom(L.Callback):
    def __init__(self, after: int) -> None:
        self.after = after

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx + 1 == self.after:
            raise RuntimeError("injected failure")


def test_an_interrupted_extraction_leaves_nothing_reusable(tmp_path, tiny):
    cache = EmbeddingCache(tmp_path)
    src = build_source("digits", split="train")
    with pytest.raises(RuntimeError, match="injected failure"):
        extract(tiny, src, cache, trainer_kwargs=QUIET, batch_size=64, shard_size=128, callbacks=[Boom(5)])
    entries = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert entries == []  # no directory that looks like an entry
    full = extract(tiny, src, cache, trainer_kwargs=QUIET, batch_size=64, shard_size=128)
    ref = extract(tiny, src, EmbeddingCache(tmp_path / "ref"), trainer_kwargs=QUIET, batch_size=500)
    assert torch.equal(full.indices, torch.arange(len(src)))
    assert torch.allclose(full.embeddings, ref.embeddings, atol=1e-6)


def test_corrupt_images_fail_by_name_or_are_skipped_and_counted(tmp_path, tiny):
    root = write_image_folder(tmp_path / "imgs")
    bad = root / "dog" / "001.png"
    bad.write_bytes(b"garbage")
    bb = build_backbone("tiny-digits", transform={"size": 8, "channels": 1})
    src = build_source(f"imagefolder:{root}")
    cache = EmbeddingCache(tmp_path / "cache")
    with pytest.raises(BenchError, match="001.png"):
        extract(bb, src, cache, trainer_kwargs=QUIET, batch_size=4)
    entry = extract(bb, src, cache, trainer_kwargs=QUIET, batch_size=4, skip_corrupt=True)
    index = src.files.index(bad)
    assert entry.manifest["skipped"] == [index]
    assert index not in entry.indices.tolist() and len(entry.indices) == len(src) - 1


def _cli(args, cwd, env_extra=None):
    env = {**os.environ, "WANDB_MODE": "disabled", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_ddp_extraction_on_two_processes_equals_one(tmp_path):
    common = ["extract", "task=digits-base-novel", "extract.batch_size=64", "extract.shard_size=256"]
    one = _cli([*common, f"cache_dir={tmp_path / 'one'}"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli([*common, f"cache_dir={tmp_path / 'two'}", "trainer.devices=2", "trainer.strategy=ddp"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    for split_dir in (tmp_path / "one").iterdir():
        assert open_entry(tmp_path / "two" / split_dir.name).manifest["world_size"] == 2
        a = open_entry(split_dir)
        b = open_entry(tmp_path / "two" / split_dir.name)  # same key: same backbone, data, dtype
        assert torch.equal(b.indices, torch.arange(len(b.indices)))  # every index once, in order
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.embeddings, b.embeddings)


def test_a_rerun_extracts_only_what_is_missing(tmp_path, tiny, capsys):
    cache = EmbeddingCache(tmp_path)
    src = build_source("digits", split="train")
    with pytest.raises(RuntimeError, match="injected failure"):
        extract(tiny, src, cache, trainer_kwargs=QUIET, batch_size=50, shard_size=100, callbacks=[Boom(7)])
    shards = list(tmp_path.glob(".shards-*/rank*.safetensors"))
    assert len(shards) == 3  # 3 full shards of 100 rows were written before the failure

    counter = Counter()
    entry = extract(tiny, src, cache, trainer_kwargs=QUIET, batch_size=50, shard_size=100, callbacks=[counter])
    assert counter.seen == len(src) - 300  # only the missing samples were extracted
    assert "resuming extraction: 300 of" in capsys.readouterr().out
    ref = extract(tiny, src, EmbeddingCache(tmp_path / "ref"), trainer_kwargs=QUIET)
    assert torch.equal(entry.indices, ref.indices) and torch.allclose(entry.embeddings, ref.embeddings, atol=1e-6)
    assert not list(tmp_path.glob(".shards-*"))  # merged shards are cleaned up


class Counter(L.Callback):
    seen = 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.seen += len(outputs["indices"])


def test_shards_of_a_changed_dataset_or_another_config_are_refused(tmp_path, tiny):
    from bench.extract.extractor import scan_shards

    cache = EmbeddingCache(tmp_path)
    src = build_source("digits", split="test")
    with pytest.raises(RuntimeError):
        extract(tiny, src, cache, trainer_kwargs=QUIET, batch_size=50, shard_size=50, callbacks=[Boom(3)])
    shard_dir = next(tmp_path.glob(".shards-*"))
    key = shard_dir.name.removeprefix(".shards-")
    with pytest.raises(BenchError, match="dataset changed|changed between runs"):
        scan_shards(shard_dir, key, len(src) + 5)
    with pytest.raises(BenchError, match="another extraction"):
        scan_shards(shard_dir, "someotherkey", len(src))


def test_killed_ddp_extraction_resumes_to_the_single_process_cache(tmp_path):
    import signal
    import time

    from bench.backbones import save_checkpoint

    torch.manual_seed(0)
    resnet = build_backbone("torchvision:resnet18", weights=None)
    save_checkpoint(resnet.model, tmp_path / "r18.safetensors", arch="torchvision:resnet18",
                    transform={"size": 64, "channels": 3})
    common = ["extract", "task=digits-base-novel", f"backbone.name=checkpoint:{tmp_path / 'r18.safetensors'}",
              "extract.batch_size=16", "extract.shard_size=32"]
    ddp = [*common, f"cache_dir={tmp_path / 'ddp'}", "trainer.devices=2", "trainer.strategy=ddp"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "bench.cli", *ddp], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((tmp_path / "ddp").glob(".shards-*/rank*.safetensors"))) < 6:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole DDP group, mid-run
    proc.wait()
    written = list((tmp_path / "ddp").glob(".shards-*/rank*.safetensors"))
    assert len(written) >= 6
    assert not [p for p in (tmp_path / "ddp").iterdir() if not p.name.startswith(".")]  # no entry yet
    assert {p.name[:8] for p in written} == {"rank0000", "rank0001"}  # both ranks had written

    again = _cli(ddp, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    one = _cli([*common, f"cache_dir={tmp_path / 'one'}"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    for entry_dir in (tmp_path / "one").iterdir():
        if entry_dir.name.startswith("."):
            continue
        a, b = open_entry(entry_dir), open_entry(tmp_path / "ddp" / entry_dir.name)
        assert torch.equal(b.indices, torch.arange(len(b.indices)))  # every index exactly once
        assert torch.equal(a.labels, b.labels)
        assert torch.allclose(a.embeddings, b.embeddings, atol=1e-5)


def test_streamed_hf_dataset_extracts_like_the_random_access_one(tmp_path, tiny):
    import datasets

    root = write_image_folder(tmp_path / "imgs", per_class=5)
    folder = build_source(f"imagefolder:{root}")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=folder.class_names)})
    ds = datasets.Dataset.from_dict({"image": [str(f) for f in folder.files], "label": folder.labels.tolist()},
                                    features=features)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    bb = build_backbone("tiny-digits", transform={"size": 8, "channels": 1})
    stream = build_source(f"hf:{tmp_path / 'd.parquet'}", streaming=True)
    assert stream.labels.tolist() == folder.labels.tolist()
    a = extract(bb, stream, EmbeddingCache(tmp_path / "s"), trainer_kwargs=QUIET, batch_size=4, shard_size=4)
    b = extract(bb, build_source(f"hf:{tmp_path / 'd.parquet'}"), EmbeddingCache(tmp_path / "r"),
                trainer_kwargs=QUIET, batch_size=7)
    assert torch.equal(a.indices, torch.arange(len(folder)))
    assert torch.equal(a.labels, b.labels) and torch.allclose(a.embeddings, b.embeddings, atol=1e-6)


def test_torchrun_launch_uses_two_ranks(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "bench.cli", "extract",
                           "task=digits-base-novel", f"cache_dir={tmp_path / 'c'}", "trainer.devices=2",
                           "trainer.strategy=ddp"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for d in (tmp_path / "c").iterdir():
        entry = open_entry(d)
        assert entry.manifest["world_size"] == 2
        assert torch.equal(entry.indices, torch.arange(entry.manifest["num_samples"]))


def test_a_full_disk_fails_clearly_and_leaves_no_entry(tmp_path):
    """RLIMIT_FSIZE makes every write past 100 KB fail as a full disk would (EFBIG)."""
    import resource
    import signal

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONDONTWRITEBYTECODE": "1"}
    args = [sys.executable, "-m", "bench.cli", "extract", "task=digits-base-novel", f"cache_dir={tmp_path}",
            "extract.shard_size=64", "extract.batch_size=64"]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                          preexec_fn=limit_file_size)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "could not write cache entry" in proc.stderr and "free space" in proc.stderr
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]  # nothing looks complete
    assert not list(tmp_path.glob(".tmp-*"))  # the half-written entry was removed
    again = _cli(args[3:], tmp_path)  # with space again, the kept shards are merged
    assert again.returncode == 0, again.stderr[-2000:]
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 2
