"""Content digests of dataset files for cache keys, memoised so a re-run reads no file again.

A cache key that covered only file names and sizes would reuse the old embedding of an image
replaced by another of the same size. Keys therefore cover every file's bytes, streamed through
xxh3_128: a non-cryptographic 128-bit hash (the key guards against accidental change, not an
adversary) that runs at memory speed, so a first run is bound by the disk, never by the hash;
blake2b, the fastest cryptographic hash in the standard library, is several times slower
(``scripts/bench_extract.py --hashing`` prints both next to the decode throughput).

The memo maps a path and its stat signature (size, mtime_ns, ctime_ns, inode) to the digest,
in a SQLite file that any number of processes share. A file is looked up again only when all
four match. ctime cannot be set by a user, so an edit that restores the old mtime still shows.
A digest is not memoised while the file's timestamps are within :data:`SETTLE_NS` of the hash.
That covers a coarse filesystem clock, where a rewrite in the same tick would keep the same
timestamps. Nor is it memoised if the file changed while it was read.

The memo lives at ``$BENCH_DIGEST_MEMO``, or ``$XDG_CACHE_HOME/bench/file-digests.sqlite``
(``~/.cache/bench/...``). It is kept out of the embedding cache folder so that a read-only
cache still gets memo hits. Set ``BENCH_DIGEST_MEMO=off`` to hash without a memo. The file
can be deleted at any time.

Per-sample digests (64 bits each) tell which samples two splits share, by content: see
:func:`bytes_digests` and :func:`hex_to_sample_digests`, and ``bench.data.splits``.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import xxhash
from tqdm import tqdm

from bench.errors import BenchError
from bench.runtime import atomic_path

ALGO = "xxh3_128"
SETTLE_NS = 2_000_000_000  # more than any common filesystem's timestamp granularity (FAT: 2 s)
CHUNK = 1 << 20
BATCH = 4096  # files per thread-pool round and per memo transaction
THREADS = 8

Signature = tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode
_per_thread = threading.local()


@dataclass
class HashStats:
    """What one :func:`files_digest` call did: ``hashed`` files were read, the rest came from
    the memo."""

    files: int = 0
    hashed: int = 0
    bytes_hashed: int = 0
    memo_hits: int = 0
    memoised: int = 0
    seconds: float = 0.0
    memo: str | None = None


def signature(st: os.stat_result) -> Signature:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def hash_file(path: str | Path) -> tuple[str, Signature, bool]:
    """The file's digest, its stat signature, and whether the digest may be memoised."""
    h = xxhash.xxh3_128()
    buf = getattr(_per_thread, "buf", None)
    if buf is None:  # one buffer per thread: allocating it per file costs more than hashing a small one
        buf = _per_thread.buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        before = os.fstat(f.fileno())
        while n := f.readinto(buf):
            h.update(view[:n])
        after = os.fstat(f.fileno())
    sig = signature(before)
    settled = time.time_ns() - max(before.st_mtime_ns, before.st_ctime_ns) > SETTLE_NS
    return h.hexdigest(), sig, settled and signature(after) == sig


def memo_location() -> Path | None:
    env = os.environ.get("BENCH_DIGEST_MEMO")
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "none", "false") else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bench" / "file-digests.sqlite"


_warned: set[str] = set()


def _note_once(path: Path, why: str) -> None:
    if str(path) not in _warned:
        _warned.add(str(path))
        print(f"file digest memo {path} {why}; hashing without it (set BENCH_DIGEST_MEMO to a writable "
              "file to reuse digests across runs)", file=sys.stderr)


class DigestMemo:
    """(path, stat signature) -> digest in SQLite. Any failure to read or write it only costs
    speed: the caller hashes the files again, so the memo can never change a digest."""

    SCHEMA = ("CREATE TABLE IF NOT EXISTS digests (path TEXT NOT NULL, algo TEXT NOT NULL, size INTEGER NOT NULL,"
              " mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, ino TEXT NOT NULL, digest TEXT NOT NULL,"
              " PRIMARY KEY (path, algo)) WITHOUT ROWID")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db: sqlite3.Connection | None = None
        self.writable = True
        try:
            self.db = self._connect()
        except sqlite3.OperationalError as err:  # cannot open it (no permission, locked for a minute)
            _note_once(path, f"cannot be opened ({err})")
        except sqlite3.DatabaseError as err:  # not a database (a torn or foreign file): start afresh
            try:
                path.unlink()
                self.db = self._connect()
                print(f"file digest memo {path} was unreadable ({err}); started a new one", file=sys.stderr)
            except (OSError, sqlite3.Error) as again:
                _note_once(path, f"is unusable ({again})")
        except OSError as err:
            _note_once(path, f"cannot be created ({err.strerror or err})")

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(self.path), timeout=60)
        try:
            db.execute(self.SCHEMA)
            db.commit()
        except sqlite3.Error as err:
            if not isinstance(err, sqlite3.OperationalError) or "readonly" not in str(err):
                db.close()
                raise
            self.writable = False  # a read-only memo still answers lookups
            _note_once(self.path, "is read-only")
        return db

    def get(self, paths: Sequence[str], root: str) -> dict[str, tuple[Signature, str]]:
        """Rows for ``paths``; one range query when they all lie under ``root``."""
        if self.db is None:
            return {}
        try:
            prefix = root.rstrip(os.sep) + os.sep
            rows = self.db.execute(
                "SELECT path, size, mtime_ns, ctime_ns, ino, digest FROM digests "
                "WHERE algo = ? AND path >= ? AND path < ?",
                (ALGO, prefix, prefix[:-1] + chr(ord(os.sep) + 1))).fetchall()
            found = {r[0]: ((r[1], r[2], r[3], int(r[4])), r[5]) for r in rows}
            outside = [p for p in paths if not p.startswith(prefix)]
            for i in range(0, len(outside), 500):
                part = outside[i:i + 500]
                rows = self.db.execute(
                    "SELECT path, size, mtime_ns, ctime_ns, ino, digest FROM digests WHERE algo = ? AND path IN "
                    f"({','.join('?' * len(part))})", (ALGO, *part)).fetchall()
                found.update({r[0]: ((r[1], r[2], r[3], int(r[4])), r[5]) for r in rows})
            return found
        except sqlite3.Error as err:
            _note_once(self.path, f"cannot be read ({err})")
            return {}

    def put(self, rows: Iterable[tuple[str, Signature, str]]) -> int:
        rows = [(p, ALGO, s[0], s[1], s[2], str(s[3]), d) for p, s, d in rows]
        if self.db is None or not self.writable or not rows:
            return 0
        try:
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            return len(rows)
        except sqlite3.Error as err:  # read-only, full disk, locked for a minute: only speed is lost
            self.writable = False
            _note_once(self.path, f"cannot be written ({err})")
            return 0

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None


def _rank_zero() -> bool:
    return all(os.environ.get(v, "0") == "0" for v in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def files_digest(files: Sequence[str | Path], root: str | Path, *, memo: Path | None | str = "default",
                 threads: int | None = None, stats: HashStats | None = None) -> str:
    """One digest of ``files`` in order: each file's content digest and its path relative to
    ``root`` (which also names its class). Returns ``"xxh3_128:<hex>"``.

    ``memo``: a SQLite file, None for no memo, or "default" for :func:`memo_location`.
    ``threads`` read files in parallel. Reading is bound by I/O latency, not by CPUs: a network
    filesystem answers many small reads at once far faster than one after another. From the
    page cache one thread is about 1.5 times faster, but either is over ten times faster than
    decoding the images, which extraction does next.
    """
    stats = stats if stats is not None else HashStats()
    digests = file_digests(files, root, memo=memo, threads=threads, stats=stats)
    start = time.perf_counter()
    combined = combine_file_digests(files, root, digests)
    stats.seconds += time.perf_counter() - start
    return combined


def combine_file_digests(files: Sequence[str | Path], root: str | Path, digests: Sequence[str]) -> str:
    """The digest of :func:`files_digest` from the files' own digests (:func:`file_digests`)."""
    root = os.path.abspath(root)
    h = xxhash.xxh3_128()
    prefix = root.rstrip(os.sep) + os.sep
    for f, d in zip(files, digests):
        p = os.path.abspath(f)
        rel = p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, root)
        h.update(Path(rel).as_posix().encode("utf-8", "surrogateescape"))
        h.update(b"\0")
        h.update(d.encode())
        h.update(b"\n")
    return f"{ALGO}:{h.hexdigest()}"


def file_digests(files: Sequence[str | Path], root: str | Path, *, memo: Path | None | str = "default",
                 threads: int | None = None, stats: HashStats | None = None) -> list[str]:
    """Each file's content digest (hex), from the memo where the file is unchanged; the
    arguments are :func:`files_digest`'s."""
    start = time.perf_counter()
    stats = stats if stats is not None else HashStats()
    root = os.path.abspath(root)
    paths = [os.path.abspath(f) for f in files]
    location = memo_location() if memo == "default" else (Path(memo) if memo is not None else None)
    store = DigestMemo(location) if location is not None else None
    stats.files, stats.memo = len(paths), str(location) if location else None
    digests: list[str | None] = [None] * len(paths)
    try:
        known = store.get(paths, root) if store else {}
        misses = []
        for i, p in enumerate(paths):
            row = known.get(p)
            if row is not None:
                try:
                    current = signature(os.stat(p))
                except OSError:
                    current = None
                if current == row[0]:
                    digests[i] = row[1]
                    continue
            misses.append(i)
        stats.memo_hits = len(paths) - len(misses)
        workers = threads or THREADS
        bar = tqdm(total=len(misses), desc="hashing images", unit="file", delay=2, disable=not _rank_zero(),
                   leave=False)
        with ThreadPoolExecutor(workers) as pool:
            run = pool.map if workers > 1 else map
            for b in range(0, len(misses), BATCH):
                batch = misses[b:b + BATCH]
                try:
                    results = list(run(hash_file, [paths[i] for i in batch]))
                except FileNotFoundError as err:
                    raise BenchError(f"image {err.filename} disappeared while it was hashed for the cache key: "
                                     "the dataset folder changed during the run; rerun when it is settled") from err
                except OSError as err:
                    raise BenchError(f"cannot read {err.filename} to hash it for the cache key: "
                                     f"{err.strerror or err}; fix its permissions or remove it from the "
                                     "dataset folder") from err
                fresh = []
                for i, (digest, sig, memoisable) in zip(batch, results):
                    digests[i] = digest
                    stats.bytes_hashed += sig[0]
                    if memoisable:
                        fresh.append((paths[i], sig, digest))
                stats.memoised += store.put(fresh) if store else 0
                stats.hashed += len(batch)
                bar.update(len(batch))
        bar.close()
    finally:
        if store:
            store.close()
    stats.seconds = time.perf_counter() - start
    return digests  # type: ignore[return-value]


# -- per-sample digests: which samples two splits share ------------------------------------
#
# A pool split that holds query images scores those queries as seen. Sources name their samples
# by content with one 64-bit digest each (uint64 arrays intersect in one numpy call); at 2**64
# values a chance collision between a million pool and a million query samples has odds of
# about 1 in 20 million.


def hex_to_sample_digests(digests: Sequence[str]) -> np.ndarray:
    """64-bit sample digests from :func:`file_digests`' hex digests (their first 16 digits)."""
    return np.fromiter((int(d[:16], 16) for d in digests), dtype=np.uint64, count=len(digests))


def bytes_digests(items: Iterable[bytes], count: int = -1) -> np.ndarray:
    """One 64-bit digest per bytes object (an encoded image, or an image array's raw bytes)."""
    return np.fromiter((xxhash.xxh3_64_intdigest(b) for b in items), dtype=np.uint64, count=count)


def array_digest(array: np.ndarray) -> str:
    """A digest of an array's values (e.g. a split's sample digests), for cache keys."""
    return f"{ALGO}:{xxhash.xxh3_128_hexdigest(np.ascontiguousarray(array).tobytes())}"


def labels_digest(labels: np.ndarray, class_names: Sequence[str]) -> str:
    """A digest of a split's class ids and names, for cache keys: a rule that reads labels
    differently (or a dataset whose labels were corrected) must not be served old labels."""
    h = xxhash.xxh3_128(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    for name in class_names:
        h.update(name.encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return f"{ALGO}:{h.hexdigest()}"


def memoised_sample_digests(token: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """``compute()``, kept beside the file digest memo under ``token`` (a dataset's content
    fingerprint), so a rerun does not read every image again just to compare splits. As with
    the file memo, any failure to read or write it only costs speed."""
    location = memo_location()
    if location is None or not token:
        return compute()
    path = location.parent / "sample-digests" / f"{xxhash.xxh3_128_hexdigest(token.encode())}.npy"
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        pass
    digests = compute()
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, digests, allow_pickle=False)
    except OSError as err:
        _note_once(path.parent, f"cannot be written ({err.strerror or err})")
    return digests
