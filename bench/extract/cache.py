"""Embedding cache: one directory per entry, safetensors tensors plus a JSON manifest.

An entry's name is a hash of everything that changes the numbers (backbone and a fingerprint of
its weights, transform, layer, dataset and split, dtype), so a different transform is a
different entry. Entries are written under a temporary name and renamed into place, so an
interrupted run never leaves a directory that looks complete. Opening an entry checks the
manifest against the tensors; a mismatch is refused with instructions to rebuild.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bench.errors import BenchError

CACHE_VERSION = 1
TENSORS = "tensors.safetensors"
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_key(fields: dict[str, Any]) -> str:
    blob = json.dumps({"cache_version": CACHE_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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


def open_entry(path: str | Path) -> CacheEntry:
    """Open and validate an entry directory."""
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
    if tpath.stat().st_size != manifest.get("tensors_bytes") or file_sha256(tpath) != manifest.get(
        "tensors_sha256"
    ):
        raise _refuse(path, "tensor file does not match the checksum in its manifest")
    with safe_open(str(tpath), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
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
    """A folder of entries keyed by :func:`cache_key`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise BenchError(f"cannot create cache folder {self.root}: {err.strerror}; choose "
                             "another with cache_dir=...") from err
        if not os.access(self.root, os.W_OK):
            raise BenchError(f"no write permission for cache folder {self.root}; choose another "
                             "with cache_dir=...")

    def path_for(self, key: str) -> Path:
        return self.root / key

    def lookup(self, key: str) -> CacheEntry | None:
        path = self.path_for(key)
        return open_entry(path) if path.exists() else None

    def scratch_dir(self, key: str, tag: str = "tmp") -> Path:
        """A private directory for work in progress; never mistaken for an entry."""
        path = self.root / f".{tag}-{key}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def write(
        self,
        key: str,
        fields: dict[str, Any],
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
        **extra: Any,
    ) -> CacheEntry:
        """Write an entry atomically: a temporary directory, fsync, then one rename."""
        final = self.path_for(key)
        tmp = self.scratch_dir(key)
        try:
            tpath = tmp / TENSORS
            save_file(
                {"embeddings": embeddings.contiguous(), "labels": labels.long().contiguous(),
                 "indices": indices.long().contiguous()},
                str(tpath),
            )
            manifest = {
                "key": key,
                "cache_version": CACHE_VERSION,
                "fields": fields,
                "num_samples": int(len(embeddings)),
                "dim": int(embeddings.shape[1]),
                "dtype": str(embeddings.dtype).removeprefix("torch."),
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
            if final.exists():  # another process finished the same entry first: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.rename(tmp, final)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BenchError(f"could not write cache entry {final}: {err}") from err
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return open_entry(final)
