import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from bench import BenchError
from bench.backbones import build_backbone
from bench.data.sources import build_source
from bench.extract import EmbeddingCache, extract, open_entry
from tests.helpers import rank_envs, write_image_folder

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


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", **extra}


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


def test_killed_ddp_extraction_resumes_to_the_single_process_cache(tmp_path, forks):
    import time

    from bench.backbones import save_checkpoint

    torch.manual_seed(0)
    resnet = build_backbone("torchvision:resnet18", weights=None)
    save_checkpoint(resnet.model, tmp_path / "r18.safetensors", arch="torchvision:resnet18",
                    transform={"size": 32, "channels": 3})
    common = ["extract", "task=digits-base-novel", f"backbone.name=checkpoint:{tmp_path / 'r18.safetensors'}",
              "extract.batch_size=16", "extract.shard_size=32"]
    ddp = [*common, f"cache_dir={tmp_path / 'ddp'}", "trainer.devices=2", "trainer.strategy=ddp"]
    # the killed run's two ranks started as a cluster launcher starts them (both forked)
    ranks = [forks.start(ddp, module="bench.cli", cwd=tmp_path, env=env) for env in rank_envs(_env())]
    deadline = time.time() + 300
    while time.time() < deadline and len(list((tmp_path / "ddp").glob(".shards-*/rank*.safetensors"))) < 6:
        time.sleep(0.02)
    for rank in ranks:  # the whole DDP run, mid-run
        os.killpg(rank.pid, signal.SIGKILL)
    for rank in ranks:
        rank.wait()
    written = list((tmp_path / "ddp").glob(".shards-*/rank*.safetensors"))
    assert len(written) >= 6
    assert not [p for p in (tmp_path / "ddp").iterdir() if not p.name.startswith(".")]  # no entry yet
    assert {p.name[:8] for p in written} == {"rank0000", "rank0001"}  # both ranks had written
    assert len(list((tmp_path / "ddp").glob(".shards-*"))) == 1  # the train split's: test is extracted afresh

    again = forks.start(ddp, module="bench.cli", cwd=tmp_path, env=_env())  # Lightning starts rank 1
    # The single-process cache, made here while the DDP run resumes: on one thread, as two threads
    # beside busy processes stall at every small kernel.
    from bench import pipeline
    from bench.config import load_config
    from bench.runtime import torch_threads

    with torch_threads(1):
        pipeline.extract_stage(load_config(None, [*common[1:], f"cache_dir={tmp_path / 'one'}"]))
    assert again.wait() == 0, again.stderr[-3000:]
    assert len(_entries(tmp_path / "one")) == 2
    for entry_dir in _entries(tmp_path / "one"):
        a, b = open_entry(entry_dir), open_entry(tmp_path / "ddp" / entry_dir.name)
        assert b.manifest["world_size"] == 2
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


@pytest.fixture(scope="module")
def torchrun_cache(tmp_path_factory):
    """The quickstart's task extracted by two ranks that torchrun starts (Lightning takes them from
    torchelastic), in several shards per rank; read only. Lightning's own launch (`trainer.devices=2`
    alone) extracts in test_killed_ddp_extraction_resumes_to_the_single_process_cache."""
    root = tmp_path_factory.mktemp("torchrun")
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "bench.cli", "extract",
                           "task=digits-base-novel", f"cache_dir={root / 'c'}", "extract.batch_size=64",
                           "extract.shard_size=256", "trainer.devices=2", "trainer.strategy=ddp"],
                          cwd=root, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "c"


def test_torchrun_launch_uses_two_ranks(torchrun_cache):
    entries = _entries(torchrun_cache)
    assert len(entries) == 2  # train and test
    for d in entries:
        entry = open_entry(d)
        assert entry.manifest["world_size"] == 2
        assert torch.equal(entry.indices, torch.arange(entry.manifest["num_samples"]))  # every index once, in order


def test_ddp_extraction_on_two_processes_equals_one(torchrun_cache, quickstart_cache):
    """Two ranks write the entries, under the same keys and bit for bit, that one process writes
    (the session's quickstart cache, extracted in one process with the same backbone and data)."""
    ones = _entries(quickstart_cache)
    assert len(ones) == 2 and sorted(p.name for p in _entries(torchrun_cache)) == sorted(p.name for p in ones)
    for split_dir in ones:
        a = open_entry(split_dir)
        b = open_entry(torchrun_cache / split_dir.name)  # same key: same backbone, data, dtype
        assert b.manifest["world_size"] == 2
        assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.embeddings, b.embeddings)


def test_a_full_disk_fails_clearly_and_leaves_no_entry(tmp_path, forks):
    """RLIMIT_FSIZE makes every write past 100 KB fail as a full disk would (EFBIG)."""
    args = ["extract", "task=digits-base-novel", f"cache_dir={tmp_path}", "extract.shard_size=64",
            "extract.batch_size=64"]
    env = _env(PYTHONDONTWRITEBYTECODE="1")
    proc = forks.bench(args, cwd=tmp_path, env=env, file_size_limit=100_000)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "could not write cache entry" in proc.stderr and "free space" in proc.stderr
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]  # nothing looks complete
    assert not list(tmp_path.glob(".tmp-*"))  # the half-written entry was removed
    again = forks.bench(args, cwd=tmp_path, env=env)  # with space again, the kept shards are merged
    assert again.returncode == 0, again.stderr[-2000:]
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 2


# --- The cache never serves stale embeddings: content keys, locking, kills, read-only use ---

def write_bmp_folder(root: Path, classes=("cat", "dog"), per_class: int = 4, size: int = 12) -> Path:
    """Uncompressed images: every file has the same byte size, so one can replace another."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.full((size, size, 3), 40, dtype=np.uint8)
            pixels[..., c] = 200
            pixels = np.clip(pixels + rng.integers(-30, 30, pixels.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.bmp")
    return root


def test_an_image_replaced_by_another_of_the_same_size_is_extracted_again(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("BENCH_DIGEST_MEMO", str(tmp_path / "memo.sqlite"))
    root = write_bmp_folder(tmp_path / "imgs")
    bb = build_backbone("tiny-digits", transform={"size": 8, "channels": 1})
    cache = EmbeddingCache(tmp_path / "cache")
    before = extract(bb, build_source(f"imagefolder:{root}"), cache, trainer_kwargs=QUIET)

    target, donor = root / "cat" / "001.bmp", root / "dog" / "002.bmp"
    st = target.stat()
    assert donor.stat().st_size == st.st_size
    target.write_bytes(donor.read_bytes())
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # even the old timestamp does not hide it
    src = build_source(f"imagefolder:{root}")
    after = extract(bb, src, cache, trainer_kwargs=QUIET)

    assert after.path != before.path
    i = src.files.index(target)
    with Image.open(target) as img:
        fresh = bb.model(bb.transform(img.copy())[None])[0]
    assert torch.allclose(after.embeddings[i], fresh, atol=1e-5)
    assert not torch.allclose(before.embeddings[i], fresh, atol=1e-3)
    others = torch.arange(len(src)) != i
    assert torch.equal(after.embeddings[others], before.embeddings[others])


class Rewrite(L.Callback):
    """Replaces an image with another while the extraction runs."""

    def __init__(self, target: Path, donor: Path) -> None:
        self.target, self.donor = target, donor

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.target.write_bytes(self.donor.read_bytes())


def test_images_that_change_during_the_extraction_are_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DIGEST_MEMO", str(tmp_path / "memo.sqlite"))
    root = write_bmp_folder(tmp_path / "imgs")
    bb = build_backbone("tiny-digits", transform={"size": 8, "channels": 1})
    cache = EmbeddingCache(tmp_path / "cache")
    with pytest.raises(BenchError, match="changed while it was extracted"):
        extract(bb, build_source(f"imagefolder:{root}"), cache, trainer_kwargs=QUIET, batch_size=2,
                callbacks=[Rewrite(root / "dog" / "003.bmp", root / "cat" / "000.bmp")])
    assert _entries(cache.root) == [] and _leftovers(cache.root) == []
    src = build_source(f"imagefolder:{root}")
    entry = extract(bb, src, cache, trainer_kwargs=QUIET)  # settled now: extracted and cached
    assert torch.allclose(entry.embeddings[src.files.index(root / "dog" / "003.bmp")], entry.embeddings[0],
                          atol=1e-6)


def test_file_digests_come_from_the_memo_until_a_file_changes(tmp_path, monkeypatch):
    from bench.data import hashing
    from bench.data.hashing import HashStats, files_digest

    monkeypatch.setattr(hashing, "SETTLE_NS", 0)  # files written by this test count as settled
    root = write_bmp_folder(tmp_path / "imgs")
    files = sorted(root.rglob("*.bmp"))
    memo = tmp_path / "memo.sqlite"

    def digest(**kw):
        stats = HashStats()
        return files_digest(files, root, memo=memo, stats=stats, **kw), stats

    first, s = digest()
    assert (s.hashed, s.memoised, s.bytes_hashed) == (len(files), len(files), sum(f.stat().st_size for f in files))
    again, s = digest()
    assert again == first and s.hashed == 0 and s.memo_hits == len(files)  # nothing read twice

    st = files[0].stat()
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a new mtime alone: read again
    same, s = digest()
    assert same == first and s.hashed == 1

    st = files[1].stat()
    files[1].write_bytes(files[-1].read_bytes())  # same size, other content, old mtime put back
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    changed, s = digest()
    assert s.hashed == 1 and changed != first
    assert changed == files_digest(files, root, memo=None)

    renamed = files[2].with_name("zzz.bmp")
    files[2].rename(renamed)
    files[2] = renamed
    assert digest()[0] != changed  # file names (and so class folders) are part of the digest

    memo.write_bytes(b"not a database" * 100)  # a torn or foreign memo is replaced, never trusted
    rebuilt, s = digest()
    assert rebuilt == files_digest(files, root, memo=None) and s.hashed == len(files)
    (tmp_path / "file").write_text("")
    unusable = files_digest(files, root, memo=tmp_path / "file" / "memo.sqlite")  # cannot be created
    assert unusable == rebuilt
    files[0].unlink()  # listed, then gone before it was read
    with pytest.raises(BenchError, match=f"{files[0].name} disappeared"):
        files_digest(files, root, memo=None)


def test_bench_extract_prints_hashing_next_to_decoding(tmp_path):
    from bench.benchmarks.extraction import main

    out = main(["--hashing", "--hash-images", "30", "--hash-size", "32", "--repeats", "1",
                "--out", str(tmp_path / "h.json")])
    assert out["images"] == 30 and json.loads((tmp_path / "h.json").read_text())["bytes"] == out["bytes"] > 0
    assert out["ratio_to_decode"]["decode (PIL, 1 thread)"] == 1.0
    assert {"read + xxh3_128, 1 thread", "read + blake2b, 1 thread",
            "cache key from the memo (re-run)"} <= set(out["images_per_s"])


def test_a_file_written_moments_ago_is_never_served_from_the_memo(tmp_path):
    """A filesystem with a coarse clock gives a rewrite in the same tick the same timestamps;
    so a digest is memoised only once the file's timestamps are older than any such tick."""
    from bench.data.hashing import HashStats, files_digest

    f = tmp_path / "a" / "x.bin"
    f.parent.mkdir()
    memo = tmp_path / "memo.sqlite"
    for i in range(20):
        f.write_bytes(bytes([i]) * 4096)
        stats = HashStats()
        got = files_digest([f], tmp_path, memo=memo, stats=stats)
        assert got == files_digest([f], tmp_path, memo=None)
        assert stats.hashed == 1 and stats.memoised == 0


EXTRACT_SCRIPT = r'''
import hashlib, json, os, sys, time
from pathlib import Path

import lightning as L

from bench.backbones import build_backbone
from bench.data.sources import build_source
from bench.extract import EmbeddingCache, extract

args = json.loads(sys.argv[1])


def pause(where):
    print(f"paused {where}", flush=True)
    time.sleep(600)


class Steps(L.Callback):
    """Slows each batch (so that two runs overlap) or stops after some (to be killed there)."""

    batches = 0

    def on_predict_batch_end(self, *_):
        time.sleep(args.get("batch_sleep", 0))
        self.batches += 1
        if self.batches == args.get("pause_after_batches"):
            pause("in the extraction")


class PausingCache(EmbeddingCache):
    """Stops for the parent's SIGKILL inside the merge: tensors filled but no manifest yet, or
    the entry renamed into place but the shards not yet removed."""

    def write_streaming(self, key, fields, num_samples, dim, dtype, fill, **extra):
        def fill_then_pause(maps):
            fill(maps)
            if args.get("pause") == "filled":
                pause("in the merge")

        entry = super().write_streaming(key, fields, num_samples, dim, dtype, fill_then_pause, **extra)
        if args.get("pause") == "renamed":
            pause("in the merge")
        return entry


print("ready", flush=True)
while args.get("go") and not Path(args["go"]).exists():
    time.sleep(0.01)
entry = extract(build_backbone("tiny-digits"), build_source("digits", split=args.get("split", "test")),
                PausingCache(args["cache"]), trainer_kwargs={"enable_progress_bar": False, **args.get("trainer", {})},
                batch_size=args.get("batch_size", 32), shard_size=args.get("shard_size", 64), callbacks=[Steps()])
if os.environ.get("LOCAL_RANK", "0") == "0":
    print("entry", entry.path.name, hashlib.sha256(entry.embeddings.numpy().tobytes()).hexdigest(), flush=True)
'''


def _start(forks, tmp_path: Path, env: dict | None = None, **args):
    script = tmp_path / "extract_script.py"
    if not script.exists():  # a run started before may be reading it
        script.write_text(EXTRACT_SCRIPT)
    env = {**(env or _env()), "PYTHONUNBUFFERED": "1"}
    return forks.start([json.dumps(args)], script=script, cwd=tmp_path, env=env)


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".shards-")))


def _entries(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if not p.name.startswith(".")]


def _assert_same_entry(a, b) -> None:
    assert a.path.name == b.path.name
    assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.embeddings, b.embeddings)  # same batches in both runs, so the same bits


def test_two_concurrent_extractions_of_one_key_both_succeed_with_one_entry(tmp_path, tiny, forks):
    cache = tmp_path / "cache"
    go = tmp_path / "go"
    runs = [_start(forks, tmp_path, cache=str(cache), go=str(go), batch_sleep=0.05) for _ in range(2)]
    for run in runs:
        run.wait_for_line("ready")
    go.touch()  # both start extracting at the same moment
    for run in runs:
        assert run.wait(300) == 0, run.stderr[-3000:]
    reported = {line for run in runs for line in run.stdout.splitlines() if line.startswith("entry")}
    assert len(reported) == 1  # the same entry, with the same embeddings, for both
    assert len(_entries(cache)) == 1 and _leftovers(cache) == []
    ref = extract(tiny, build_source("digits", split="test"), EmbeddingCache(tmp_path / "ref"), trainer_kwargs=QUIET,
                  batch_size=32, shard_size=64)
    _assert_same_entry(open_entry(_entries(cache)[0]), ref)


@pytest.mark.parametrize("point", ["filled", "renamed"])
def test_a_kill_in_the_merge_then_a_rerun_equals_an_uninterrupted_run(tmp_path, tiny, forks, point):
    root = tmp_path / "cache"
    run = _start(forks, tmp_path, cache=str(root), pause=point)
    run.wait_for_line("paused in the merge")
    if point == "filled":
        assert _entries(root) == [] and any(p.startswith(".tmp-") for p in _leftovers(root))
    else:
        assert len(_entries(root)) == 1 and any(p.startswith(".shards-") for p in _leftovers(root))
    run.kill()

    counter = Counter()
    src = build_source("digits", split="test")
    again = extract(tiny, src, EmbeddingCache(root), trainer_kwargs=QUIET, batch_size=32, shard_size=64,
                    callbacks=[counter])
    assert counter.seen == 0  # the killed run's shards (or entry) were complete: nothing extracted again
    ref = extract(tiny, src, EmbeddingCache(tmp_path / "ref"), trainer_kwargs=QUIET, batch_size=32, shard_size=64)
    _assert_same_entry(again, ref)
    assert again.manifest["fields"] == ref.manifest["fields"]
    assert _leftovers(root) == [] and len(_entries(root)) == 1


def test_a_waiting_ddp_run_takes_over_the_shards_of_a_killed_run(tmp_path, tiny, forks):
    root = tmp_path / "cache"
    first = _start(forks, tmp_path, cache=str(root), split="train", batch_size=16, shard_size=32,
                   pause_after_batches=6)
    first.wait_for_line("paused in the extraction")  # holds the key's lock, 3 shards written
    # the DDP run's two ranks started as a cluster launcher starts them (both forked)
    ddp = {"devices": 2, "strategy": "ddp", "accelerator": "cpu"}
    second, other = [_start(forks, tmp_path, env=env, cache=str(root), split="train", batch_size=16, shard_size=32,
                            trainer=ddp) for env in rank_envs(_env())]
    second.wait_for_line("waiting for another run")
    assert _entries(root) == []
    first.kill()
    lines = second.wait_for_line("entry")
    for rank in (second, other):
        assert rank.wait(300) == 0, rank.stderr[-3000:]
    src = build_source("digits", split="train")
    assert any(line.startswith(f"resuming extraction: 96 of {len(src)} ") for line in lines), lines
    ref = extract(tiny, src, EmbeddingCache(tmp_path / "ref"), trainer_kwargs=QUIET, batch_size=16)
    entry = open_entry(_entries(root)[0])
    assert entry.manifest["world_size"] == 2 and _leftovers(root) == []
    assert torch.equal(entry.indices, ref.indices) and torch.equal(entry.labels, ref.labels)
    assert torch.allclose(entry.embeddings, ref.embeddings, atol=1e-6)


READ_ONLY_SCRIPT = r'''
import hashlib, json, os, sys


def drop_root_file_access():
    """As root, give up the capabilities that let root write past permission bits: in this process
    (capset) and in the bounding set, so that the processes it launches never regain them."""
    if os.getuid() != 0:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    caps = (1, 2, 3)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    sets = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable; capabilities 0-31, then 32-63
    ok = all(libc.prctl(24, cap, 0, 0, 0) == 0 for cap in caps)  # PR_CAPBSET_DROP
    ok = ok and libc.capget(header, sets) == 0
    for i in range(3):
        sets[i] &= ~sum(1 << cap for cap in caps) & 0xFFFFFFFF
    if not (ok and libc.capset(header, sets) == 0):
        print(f"cannot give up root's file access here (errno {ctypes.get_errno()})", file=sys.stderr)
        sys.exit(77)


drop_root_file_access()  # before anything touches the cache

from bench import BenchError
from bench.backbones import build_backbone
from bench.data.sources import build_source
from bench.extract import EmbeddingCache, cache_key, entry_fields, extract

args = json.loads(sys.argv[1])
backbone, source = build_backbone("tiny-digits"), build_source("digits", split="test")
entry = EmbeddingCache(args["cache"]).lookup(cache_key(entry_fields(backbone, source, "float32")))
print("lookup", entry.path.name, hashlib.sha256(entry.embeddings.numpy().tobytes()).hexdigest())
hit = extract(backbone, source, EmbeddingCache(args["cache"]), trainer_kwargs={"enable_progress_bar": False})
print("extract", hit.path.name)
ddp = {"enable_progress_bar": False, "devices": 2, "strategy": "ddp", "accelerator": "cpu"}
hit = extract(backbone, source, EmbeddingCache(args["cache"]), trainer_kwargs=ddp)  # every rank agrees: a hit
print(f"rank {os.environ.get('LOCAL_RANK', '0')} extract", hit.path.name)
try:
    extract(backbone, source, EmbeddingCache(args["cache"]), dtype="float16",
            trainer_kwargs={"enable_progress_bar": False})
except BenchError as err:
    print("refused", err)
'''


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_a_read_only_cache_serves_lookups_and_hits(tmp_path, forks, quickstart_cache):
    import hashlib
    import stat

    from tests.helpers import copy_cache

    root = copy_cache(quickstart_cache, tmp_path / "cache")
    src = build_source("digits", split="test")
    entry = extract(build_backbone("tiny-digits"), src, EmbeddingCache(root), trainer_kwargs=QUIET)  # a hit
    digest = hashlib.sha256(entry.embeddings.numpy().tobytes()).hexdigest()
    script = tmp_path / "read_only.py"
    script.write_text(READ_ONLY_SCRIPT)
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = _tree(root)
    env = _env(PYTHONDONTWRITEBYTECODE="1", BENCH_DIGEST_MEMO="off")
    try:
        proc = forks.run([json.dumps({"cache": str(root)})], script=script, cwd=tmp_path, env=env, timeout=300)
        if proc.returncode == 77:
            pytest.skip(f"{proc.stderr.strip()}, and root writes through chmod")
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = proc.stdout.splitlines()
        assert f"lookup {entry.path.name} {digest}" in lines
        assert f"extract {entry.path.name}" in lines
        assert {f"rank {r} extract {entry.path.name}" for r in (0, 1)} <= set(lines)
        refused = [line for line in lines if line.startswith("refused")]
        assert refused and "no write permission for cache folder" in refused[0] and str(root) in refused[0]
        assert _tree(root) == before  # reading wrote nothing, not even a lock file
    finally:
        for p in [root, *root.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
