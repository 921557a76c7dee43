"""Writing the package digests a repodata file or shard states into the catalog, in batches.

Synchronous, for an executor thread: it uses the thread's own SQLite connection, so a
conda-forge-sized repodata.json is learned in bounded memory without touching the event loop.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

from condaproxy.cache.catalog.db import connect_sync
from condaproxy.conda.digests import Digest, digests_in

BATCH = 10_000


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
        return _store(conn, channel, subdir, digests_in(path, filename))
    finally:
        conn.close()
