"""Writing what a repodata file or shard states into the catalog, in batches: each package's
digest (sha256, size) and, in the ledger, each record's first sighting.

Synchronous, for an executor thread: it uses the thread's own SQLite connection, so a
conda-forge-sized repodata.json is learned in bounded memory without touching the event loop.
Each batch is one BEGIN IMMEDIATE transaction, ordered by SQLite's lock against the catalog's
own writes, and written only while the subdir still has metadata cached: eviction drops a
subdir's digests with its last metadata, and a batch must not bring them back after that.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from condaproxy.cache.catalog.db import HAS_METADATA, connect_sync
from condaproxy.conda import variants
from condaproxy.conda.decoding import open_decoded
from condaproxy.conda.digests import work_budget
from condaproxy.conda.filtering import iter_records, record_times
from condaproxy.conda.shards import iter_shard_records

BATCH = 10_000
_DIGEST = "INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?)"
# Written once, never changed: a record's first sighting stays its first.
_SIGHTING = "INSERT OR IGNORE INTO ledger VALUES (?, ?, ?, ?, ?, ?, ?)"
# The first whole repodata.json read for a subdir begins its ledger.
_BEGIN = "INSERT OR IGNORE INTO ledger_subdirs VALUES (?, ?, ?)"

Row = tuple[str, str, str, str, int | None]
Sighting = tuple[str, str, str, str, float, float | None, float | None]


def _write(
    conn: sqlite3.Connection,
    channel: str,
    subdir: str,
    batch: list[Row],
    sightings: list[Sighting],
    begin: float | None,
) -> bool:
    """One batch in one transaction; False (nothing written) when the subdir's metadata is gone."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute(HAS_METADATA, (channel, subdir)).fetchone() is None:
            conn.rollback()
            return False
        if begin is not None:
            conn.execute(_BEGIN, (channel, subdir, begin))
        conn.executemany(_DIGEST, batch)
        conn.executemany(_SIGHTING, sightings)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return True


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
        yield from iter_shard_records(path)  # a stream: an object bomb costs no memory
        return
    budget = work_budget(path.stat().st_size)
    with open_decoded(path, filename) as stream:
        yield from iter_records(stream, budget)


def _store(
    conn: sqlite3.Connection,
    channel: str,
    subdir: str,
    records: Iterator[tuple[str, dict[str, Any]]],
    now: float,
    begins: bool,
) -> int:
    count = 0
    batch: list[Row] = []
    sightings: list[Sighting] = []
    begin = now if begins else None
    for filename, record in records:
        digest = _digest(record)
        if digest is not None:
            batch.append((channel, subdir, filename, *digest))
        times = record_times(filename, record)
        sightings.append(
            (channel, subdir, filename, times.name, now, times.timestamp, times.indexed_timestamp)
        )
        if len(sightings) >= BATCH:
            if not _write(conn, channel, subdir, batch, sightings, begin):
                return count
            count += len(batch)
            batch.clear()
            sightings.clear()
            begin = None
    if (sightings or begin is not None) and _write(conn, channel, subdir, batch, sightings, begin):
        count += len(batch)
    return count


def learn(
    db_path: Path, channel: str, subdir: str, filename: str, path: Path, now: float | None = None
) -> int:
    """Record the package digests and first sightings a repodata file or shard states; returns how many.

    now: the time of the sighting (the catalog's clock). The first whole repodata.json read for
    a subdir begins its ledger, at that time.
    """
    now = time.time() if now is None else now
    parts = variants.split(filename)
    begins = parts is not None and parts[0] == "repodata.json" and parts[2] is None
    conn = connect_sync(db_path)
    try:
        return _store(conn, channel, subdir, _records(path, filename), now, begins)
    finally:
        conn.close()
