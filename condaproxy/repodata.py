"""Learning package digests from repodata (any encoding) and CEP-16 shards, in bounded memory.

Everything here is synchronous and meant for an executor thread: conda-forge's linux-64
repodata.json is hundreds of MB, so it is parsed as a stream of JSON events (ijson), never
loaded whole, and rows are written in batches through the thread's own SQLite connection.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, cast

import ijson
import msgpack
import zstandard

from condaproxy.catalog import connect_sync

log = logging.getLogger(__name__)

BATCH = 10_000
# A shard or shard index is small (conda-forge's largest index inflates to a few MB): refuse to
# inflate anything absurd, reading in steps so a decompression bomb never gets the memory.
MAX_MSGPACK_BYTES = 96 * 1024 * 1024
_STEP = 1 << 20
_RECORD_KEYS = ("packages", "packages.conda")
# Decompression bombs, for every reader of compressed repodata (digest learning, transcoding):
# real repodata inflates about ten-fold (conda-forge's linux-64 .zst: ~30 MB to ~300 MB), so
# anything past MAX_RATIO times its compressed size (MIN_BUDGET for small files) is refused.
MAX_RATIO = 64
MIN_BUDGET = 64 * 1024 * 1024
# ijson buffers a whole string before emitting it, in superlinear time (16 MB: a second; 300 MB:
# minutes and a GB of memory). No real record holds a token of megabytes: stop feeding one.
MAX_TOKEN_BYTES = 4 * 1024 * 1024

Digest = tuple[str, str, int | None]  # filename, sha256 hex, size


class _Bounded:
    """A read-only stream that refuses to deliver more than limit bytes (ValueError)."""

    def __init__(self, inner: IO[bytes], limit: int, what: str) -> None:
        self._inner = inner
        self.limit = limit
        self.count = 0
        self._what = what

    def read(self, size: int = -1) -> bytes:
        """Up to size bytes (all that is left, within the limit, when size < 0)."""
        if size < 0:
            parts = []
            while part := self.read(_STEP):
                parts.append(part)
            return b"".join(parts)
        data = self._inner.read(min(size, self.limit - self.count + 1))
        self.count += len(data)
        if self.count > self.limit:
            raise ValueError(f"{self._what} past {self.limit} bytes: refused (decompression bomb?)")
        return data


@contextmanager
def open_decoded(path: Path, filename: str) -> Iterator[IO[bytes]]:
    """Open a repodata file as a stream of JSON bytes, whatever its compression."""
    budget = max(MIN_BUDGET, MAX_RATIO * path.stat().st_size)
    what = f"{filename} inflates"
    if filename.endswith(".zst"):
        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as f:
            yield cast(IO[bytes], _Bounded(f, budget, what))
    elif filename.endswith(".bz2"):
        with bz2.open(path, "rb") as f:
            yield cast(IO[bytes], _Bounded(f, budget, what))
    elif filename.endswith(".gz"):
        with gzip.open(path, "rb") as gz:
            yield cast(IO[bytes], _Bounded(cast(IO[bytes], gz), budget, what))
    else:
        with open(path, "rb") as f:
            yield f


def iter_repodata_digests(stream: IO[bytes]) -> Iterator[Digest]:
    """Yield (filename, sha256, size) for every record of a repodata.json stream."""
    current: str | None = None
    sha: str | None = None
    size: int | None = None
    depth_prefix = ""
    guard = _Bounded(stream, MAX_TOKEN_BYTES, "a single JSON token runs")
    for prefix, event, value in ijson.parse(guard, use_float=True):
        guard.count = 0  # the parser made progress: the budget is per token, not per file
        if event == "map_key" and prefix in _RECORD_KEYS:
            if current is not None and sha is not None:
                yield current, sha, size
            current, sha, size = value, None, None
            depth_prefix = f"{prefix}.{value}"
        elif current is not None and prefix.startswith(depth_prefix):
            if prefix == f"{depth_prefix}.sha256" and event == "string":
                sha = value.lower()
            elif prefix == f"{depth_prefix}.size" and event == "number":
                size = int(value)
        elif event == "end_map" and prefix in _RECORD_KEYS:
            if current is not None and sha is not None:
                yield current, sha, size
            current = None
    if current is not None and sha is not None:
        yield current, sha, size


def unpack_zst_msgpack(path: Path) -> Any:
    """Decode a zstd-compressed msgpack document, refusing to inflate past MAX_MSGPACK_BYTES."""
    data = bytearray()
    with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as f:
        while chunk := f.read(_STEP):
            data += chunk
            if len(data) > MAX_MSGPACK_BYTES:
                raise ValueError(f"{path.name}: decompresses to more than {MAX_MSGPACK_BYTES} bytes")
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def iter_shard_digests(path: Path) -> Iterator[Digest]:
    """Yield (filename, sha256, size) from a CEP-16 shard (sha256 stored as raw bytes)."""
    shard = unpack_zst_msgpack(path)
    for key in _RECORD_KEYS:
        for filename, record in (shard.get(key) or {}).items():
            sha = record.get("sha256")
            if isinstance(sha, bytes):
                sha = sha.hex()
            if isinstance(sha, str):
                size = record.get("size")
                yield filename, sha.lower(), int(size) if size is not None else None


def read_shard_index(path: Path) -> tuple[str, dict[str, str]]:
    """A CEP-16 index: (shards_base_url, package name -> shard sha256 hex)."""
    index = unpack_zst_msgpack(path)
    base = str((index.get("info") or {}).get("shards_base_url") or "./shards/")
    shards = {
        name: (digest.hex() if isinstance(digest, bytes) else str(digest))
        for name, digest in (index.get("shards") or {}).items()
    }
    return base, shards


def _store(conn: sqlite3.Connection, channel: str, subdir: str, digests: Iterator[Digest]) -> int:
    count = 0
    batch: list[tuple[str, str, str, str, int | None]] = []
    for filename, sha, size in digests:
        batch.append((channel, subdir, filename, sha, size))
        if len(batch) >= BATCH:
            conn.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?)", batch)
            conn.commit()
            count += len(batch)
            batch.clear()
    if batch:
        conn.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?)", batch)
        conn.commit()
        count += len(batch)
    return count


def learn(db_path: Path, channel: str, subdir: str, filename: str, path: Path) -> int:
    """Record the package digests a repodata file or shard states; returns how many."""
    conn = connect_sync(db_path)
    try:
        if filename.startswith("shards/"):
            return _store(conn, channel, subdir, iter_shard_digests(path))
        with open_decoded(path, filename) as stream:
            return _store(conn, channel, subdir, iter_repodata_digests(stream))
    finally:
        conn.close()


def package_name(filename: str) -> str:
    """The package name of name-version-build.conda / .tar.bz2."""
    stem = filename.removesuffix(".conda").removesuffix(".tar.bz2")
    return stem.rsplit("-", 2)[0]
