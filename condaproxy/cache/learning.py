"""Writing the package digests a repodata file or shard states into the catalog, in batches.

Synchronous, for an executor thread: it uses the thread's own SQLite connection, so a
conda-forge-sized repodata.json is learned in bounded memory without touching the event loop.
Each batch is one BEGIN IMMEDIATE transaction, ordered by SQLite's lock against the catalog's
own writes, and written only while the subdir still has metadata cached: eviction drops a
subdir's digests with its last metadata, and a batch must not bring them back after that.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from condaproxy.cache.catalog.db import HAS_METADATA, connect_sync
from condaproxy.conda.digests import Digest, digests_in

BATCH = 10_000

Row = tuple[str, str, str, str, int | None]


def _write(conn: sqlite3.Connection, channel: str, subdir: str, batch: list[Row]) -> bool:
    """One batch in one transaction; False (nothing written) when the subdir's metadata is gone."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute(HAS_METADATA, (channel, subdir)).fetchone() is None:
            conn.rollback()
            return False
        conn.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?)", batch)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return True


def _store(conn: sqlite3.Connection, channel: str, subdir: str, digests: Iterator[Digest]) -> int:
    count = 0
    batch: list[Row] = []
    for filename, sha, size in digests:
        batch.append((channel, subdir, filename, sha, size))
        if len(batch) >= BATCH:
            if not _write(conn, channel, subdir, batch):
                return count
            count += len(batch)
            batch.clear()
    if batch and _write(conn, channel, subdir, batch):
        count += len(batch)
    return count


def learn(db_path: Path, channel: str, subdir: str, filename: str, path: Path) -> int:
    """Record the package digests a repodata file or shard states; returns how many."""
    conn = connect_sync(db_path)
    try:
        return _store(conn, channel, subdir, digests_in(path, filename))
    finally:
        conn.close()
