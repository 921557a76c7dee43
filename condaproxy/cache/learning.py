"""Writing what a repodata file or shard states into the catalog, in batches: each package's
digest (sha256, size) and, in the ledger, each record's first sighting.

Synchronous, for an executor thread: it uses the thread's own SQLite connection, so a
conda-forge-sized repodata.json is learned in bounded memory without touching the event loop.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from condaproxy.cache.catalog.db import connect_sync
from condaproxy.conda import variants
from condaproxy.conda.decoding import open_decoded
from condaproxy.conda.filtering import iter_records, record_times
from condaproxy.conda.shards import RECORD_KEYS, unpack_zst_msgpack

BATCH = 10_000
_DIGEST = "INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?)"
# Written once, never changed: a record's first sighting stays its first.
_SIGHTING = "INSERT OR IGNORE INTO ledger VALUES (?, ?, ?, ?, ?, ?, ?)"


def _digest(record: dict[str, Any]) -> tuple[str, int | None] | None:
    sha = record.get("sha256")
    if isinstance(sha, bytes):
        sha = sha.hex()
    if not isinstance(sha, str):
        return None
    size = record.get("size")
    return sha.lower(), int(size) if isinstance(size, int | float) and not isinstance(size, bool) else None


def _records(path: Path, filename: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if filename.startswith("shards/"):
        shard = unpack_zst_msgpack(path)
        for key in RECORD_KEYS:
            for name, record in (shard.get(key) or {}).items():
                if isinstance(record, dict):
                    yield name, record
        return
    with open_decoded(path, filename) as stream:
        yield from iter_records(stream)


def _store(
    conn: sqlite3.Connection,
    channel: str,
    subdir: str,
    records: Iterator[tuple[str, dict[str, Any]]],
    now: float,
) -> int:
    count = 0
    digests: list[tuple[str, str, str, str, int | None]] = []
    sightings: list[tuple[str, str, str, str, float, float | None, float | None]] = []

    def flush() -> None:
        conn.executemany(_DIGEST, digests)
        conn.executemany(_SIGHTING, sightings)
        conn.commit()
        digests.clear()
        sightings.clear()

    for filename, record in records:
        digest = _digest(record)
        if digest is not None:
            digests.append((channel, subdir, filename, *digest))
            count += 1
        times = record_times(filename, record)
        sightings.append(
            (channel, subdir, filename, times.name, now, times.timestamp, times.indexed_timestamp)
        )
        if len(sightings) >= BATCH:
            flush()
    flush()
    return count


def learn(
    db_path: Path, channel: str, subdir: str, filename: str, path: Path, now: float | None = None
) -> int:
    """Record the package digests and first sightings a repodata file or shard states; returns how many.

    now: the time of the sighting (the catalog's clock). The first whole repodata.json read for
    a subdir begins its ledger, at that time.
    """
    now = time.time() if now is None else now
    conn = connect_sync(db_path)
    try:
        parts = variants.split(filename)
        if parts is not None and parts[0] == "repodata.json" and parts[2] is None:
            conn.execute("INSERT OR IGNORE INTO ledger_subdirs VALUES (?, ?, ?)", (channel, subdir, now))
            conn.commit()
        return _store(conn, channel, subdir, _records(path, filename), now)
    finally:
        conn.close()
