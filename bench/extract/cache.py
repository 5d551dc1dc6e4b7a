"""Embedding cache: one directory per entry, safetensors tensors plus a JSON manifest.

An entry's name is a hash of everything that changes the numbers (backbone and a fingerprint of
its weights, transform, layer, dataset and split, dtype, and for an image folder the content of
every file: see bench.data.hashing), so a different transform is a different entry. Entries are written under a temporary name and renamed into place, so an
interrupted run never leaves a directory that looks complete. Opening an entry checks the
manifest against the tensors; a mismatch is refused with instructions to rebuild.

Writers of one key take its file lock (``.locks/<key>``), so concurrent runs never work on the
same entry or shards at once; the operating system releases it when a process dies. Reading
takes no lock and writes nothing, so a read-only cache folder serves lookups.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from filelock import FileLock, Timeout

from bench.errors import BenchError

CACHE_VERSION = 1
TENSORS = "tensors.safetensors"
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def cache_key(fields: dict[str, Any]) -> str:
    blob = json.dumps({"cache_version": CACHE_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a crash of the machine, not only of the process)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


ST_DTYPES = {torch.float32: ("F32", "float32"), torch.float16: ("F16", "float16"),
             torch.int64: ("I64", "int64")}
VERIFY_CHECKSUM_MAX_BYTES = 512 << 20  # larger entries are checked by size and shape only


def create_safetensors(path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                       metadata: dict[str, str] | None = None) -> dict[str, np.memmap]:
    """Lay out a safetensors file and return writable memory maps of its tensors.

    Lets a writer fill tensors larger than memory piece by piece; the file is a standard
    safetensors file that any reader opens.
    """
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, shape) in specs.items():
        if dtype not in ST_DTYPES:
            raise BenchError(f"cannot store {dtype} in the cache; use float32 or float16")
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": ST_DTYPES[dtype][0], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        f.truncate(start + offset)
    maps = {}
    for name, (dtype, shape) in specs.items():
        begin = header[name]["data_offsets"][0]
        if int(np.prod(shape)) == 0:
            maps[name] = np.zeros(shape, dtype=ST_DTYPES[dtype][1])
            continue
        maps[name] = np.memmap(path, dtype=ST_DTYPES[dtype][1], mode="r+", offset=start + begin, shape=shape)
    return maps


def mmap_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read-only, memory-mapped tensors of a safetensors file (nothing is loaded up front)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", {}) or {}
    names = {v[0]: v[1] for v in ST_DTYPES.values()}
    out = {}
    for name, info in header.items():
        if info["dtype"] not in names:
            raise BenchError(f"{path}: unexpected dtype {info['dtype']} for tensor {name}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if begin == end:
            out[name] = torch.empty(shape, dtype=getattr(torch, names[info["dtype"]]))
            continue
        arr = np.memmap(path, dtype=names[info["dtype"]], mode="r", offset=8 + n + begin, shape=shape)
        with warnings.catch_warnings():  # read-only by design: entries are never modified in place
            warnings.simplefilter("ignore", UserWarning)
            out[name] = torch.from_numpy(arr)
    return out, meta


@dataclass
class CacheEntry:
    path: Path
    manifest: dict[str, Any]
    embeddings: torch.Tensor  # (N, D), in dataset order
    labels: torch.Tensor  # (N,)
    indices: torch.Tensor  # (N,) dataset indices (all of them, minus skipped corrupt files)

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.get("class_names", []))

    @property
    def key(self) -> str:
        return self.manifest["key"]


def _refuse(path: Path, why: str) -> BenchError:
    return BenchError(
        f"cache entry {path} is broken ({why}); delete that directory or rerun with "
        "extract.rebuild=true to extract it again"
    )


def open_entry(path: str | Path, verify: bool | None = None) -> CacheEntry:
    """Open and validate an entry directory; tensors are memory-mapped, not loaded.

    ``verify=None`` checks the checksum for files up to 512 MiB and only size and shape for
    larger ones, so that opening them does not read them whole; True or False force it.
    """
    path = Path(path)
    mpath, tpath = path / MANIFEST, path / TENSORS
    if not mpath.is_file() or not tpath.is_file():
        raise _refuse(path, f"missing {MANIFEST if not mpath.is_file() else TENSORS}")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as err:
        raise _refuse(path, f"unreadable manifest: {err}") from err
    if manifest.get("complete") is not True:
        raise _refuse(path, "manifest does not mark it complete")
    # The key names what the embeddings are of: a manifest whose fields hash to another key, or
    # that sits in another key's folder (copied or moved by hand), would serve the wrong dataset.
    if manifest.get("key") != cache_key(manifest.get("fields", {})):
        raise _refuse(path, f"its manifest's fields (dataset {manifest.get('fields', {}).get('dataset')!r}) do not "
                            f"hash to its key {manifest.get('key')!r}")
    if not path.name.startswith(".") and path.name != manifest["key"]:
        raise _refuse(path, f"it sits in folder {path.name!r} but its manifest is for key {manifest['key']!r} "
                            f"(dataset {manifest['fields'].get('dataset')!r})")
    size = tpath.stat().st_size
    if size != manifest.get("tensors_bytes"):
        raise _refuse(path, f"tensor file has {size} bytes, the manifest says {manifest.get('tensors_bytes')}")
    if verify is None:
        verify = size <= VERIFY_CHECKSUM_MAX_BYTES
    if verify and file_sha256(tpath) != manifest.get("tensors_sha256"):
        raise _refuse(path, "tensor file does not match the checksum in its manifest")
    try:
        t, _ = mmap_safetensors(tpath)
    except (ValueError, OSError, json.JSONDecodeError) as err:
        raise _refuse(path, f"unreadable tensor file: {err}") from err
    n, dim = manifest["num_samples"], manifest["dim"]
    emb, labels, idx = t.get("embeddings"), t.get("labels"), t.get("indices")
    if emb is None or labels is None or idx is None:
        raise _refuse(path, "tensor file lacks embeddings, labels or indices")
    if tuple(emb.shape) != (n, dim) or labels.shape != (n,) or idx.shape != (n,):
        raise _refuse(path, f"tensor shapes {tuple(emb.shape)} do not match manifest ({n}, {dim})")
    if str(emb.dtype).removeprefix("torch.") != manifest["dtype"]:
        raise _refuse(path, f"dtype {emb.dtype} does not match manifest {manifest['dtype']}")
    return CacheEntry(path, manifest, emb, labels, idx)


class EmbeddingCache:
    """A folder of entries keyed by :func:`cache_key`.

    Constructing one touches nothing: lookups work on a read-only or missing folder, and only
    writing (:meth:`lock`) creates the folder or asks for write access.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @staticmethod
    def open(path: str | Path) -> CacheEntry:
        """Open one entry directory (see :func:`open_entry`)."""
        return open_entry(path)

    def path_for(self, key: str) -> Path:
        return self.root / key

    def shard_dir(self, key: str) -> Path:
        return self.root / f".shards-{key}"

    def lookup(self, key: str) -> CacheEntry | None:
        path = self.path_for(key)
        return open_entry(path) if path.exists() else None

    def require_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise BenchError(f"cannot create cache folder {self.root}: {err.strerror}; choose "
                             "another with cache_dir=...") from err
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise BenchError(f"no write permission for cache folder {self.root}; it can serve cached "
                             "embeddings, but this needs new ones: choose another with cache_dir=...")

    def lock(self, key: str) -> FileLock:
        """The per-key lock every writer of ``key`` holds; reentrant within a thread. Lock files
        stay (removing one while another process waits on it would break the lock), in one
        hidden folder so that the cache folder lists only entries."""
        self.require_writable()
        locks = self.root / ".locks"
        try:
            locks.mkdir(exist_ok=True)
        except OSError as err:
            raise BenchError(f"cannot create {locks}: {err.strerror}; the cache folder must be writable to "
                             "add entries: choose another with cache_dir=...") from err
        return FileLock(str(locks / key), is_singleton=True)

    @contextmanager
    def locked(self, key: str, timeout: float = -1) -> Iterator[None]:
        lock = self.lock(key)
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise
        except OSError as err:  # e.g. a read-only filesystem, which os.access does not see for root
            raise BenchError(f"cannot lock {lock.lock_file}: {err.strerror or err}; the cache folder must be "
                             "writable to add entries: choose another with cache_dir=...") from err
        try:
            yield
        finally:
            lock.release()

    def scratch_dir(self, key: str, tag: str = "tmp") -> Path:
        """A private directory for work in progress; never mistaken for an entry."""
        path = self.root / f".{tag}-{key}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def remove(self, path: Path, key: str) -> None:
        """Delete an entry or shard folder of ``key``: renamed out of the way first, so a reader
        or a killed run never sees it half deleted; a leftover is a ``.tmp-`` folder that
        :meth:`clear_temporaries` removes. Hold the key's lock."""
        if not path.exists():
            return
        trash = self.root / f".tmp-{key}-trash-{uuid.uuid4().hex[:8]}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def clear_temporaries(self, key: str) -> None:
        """Remove what killed writers of ``key`` left (half-written entries, half-deleted
        folders). Hold the key's lock: then no live writer of ``key`` has one."""
        for path in self.root.glob(f".tmp-{key}-*"):
            shutil.rmtree(path, ignore_errors=True)

    def write(
        self,
        key: str,
        fields: dict[str, Any],
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
        **extra: Any,
    ) -> CacheEntry:
        """Write an entry from tensors in memory (see :meth:`write_streaming`)."""

        def fill(maps: dict[str, np.memmap]) -> None:
            maps["embeddings"][:] = embeddings.cpu().numpy()
            maps["labels"][:] = labels.long().cpu().numpy()
            maps["indices"][:] = indices.long().cpu().numpy()

        return self.write_streaming(key, fields, len(embeddings), int(embeddings.shape[1]), embeddings.dtype,
                                    fill, **extra)

    def write_streaming(
        self,
        key: str,
        fields: dict[str, Any],
        num_samples: int,
        dim: int,
        dtype: torch.dtype,
        fill: Callable[[dict[str, np.memmap]], None],
        **extra: Any,
    ) -> CacheEntry:
        """Write an entry atomically: lay out the tensor file, let ``fill`` write into its memory
        maps (piece by piece if it likes), fsync, write the manifest, then one rename.

        A full disk or any other failure removes the temporary directory and says so; nothing
        that looks like an entry is left behind. Holds the key's lock (reentrant, so callers that
        hold it already may call this).
        """
        with self.locked(key):
            return self._write_streaming(key, fields, num_samples, dim, dtype, fill, **extra)

    def _write_streaming(self, key, fields, num_samples, dim, dtype, fill, **extra) -> CacheEntry:
        final = self.path_for(key)
        tmp = self.scratch_dir(key)
        try:
            tpath = tmp / TENSORS
            maps = create_safetensors(tpath, {"embeddings": (dtype, (num_samples, dim)),
                                              "labels": (torch.int64, (num_samples,)),
                                              "indices": (torch.int64, (num_samples,))})
            fill(maps)
            for m in maps.values():
                if isinstance(m, np.memmap):
                    m.flush()
            del maps
            manifest = {
                "key": key,
                "cache_version": CACHE_VERSION,
                "fields": fields,
                "num_samples": int(num_samples),
                "dim": int(dim),
                "dtype": str(dtype).removeprefix("torch."),
                "tensors_bytes": tpath.stat().st_size,
                "tensors_sha256": file_sha256(tpath),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "complete": True,
                **extra,
            }
            mpath = tmp / MANIFEST
            mpath.write_text(json.dumps(manifest, indent=2, sort_keys=True))
            for p in (tpath, mpath):
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            ours = not final.exists()
            if ours:
                os.rename(tmp, final)
                fsync_dir(self.root)
            else:  # another process finished the same entry first: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BenchError(f"could not write cache entry {final}: {err.strerror or err}; free space "
                             "or choose another cache_dir, then rerun") from err
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # The checksum was just computed from the file we wrote; no need to read it again.
        return open_entry(final, verify=None if not ours else False)
