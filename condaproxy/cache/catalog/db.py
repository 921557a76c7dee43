"""The catalog's database: one aiosqlite connection (WAL), its schema, and the write helpers.

The tables are reached through small classes over this one connection (unit_rows.py, learned.py,
eviction.py); catalog.py puts them together. Rows of units live in a bounded hot-row cache
here, since every table class that changes a row must keep it coherent.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final, Self

import aiosqlite
from cachetools import LRUCache

from condaproxy.cache.unit import Unit
from condaproxy.conda.paths import UnitKey
from condaproxy.errors import CatalogBusy

SCHEMA_VERSION = 3
BUSY_TIMEOUT_MS = 5000
# Rows kept in memory for hot look-ups. A row costs ~2 KB (its headers): 10,000 bound the
# cache to ~20 MB, where 50,000 let a 10-minute soak over thousands of channels grow by 89 MB.
HOT_ROWS = 10_000
WRITE_ATTEMPTS = 4
# Write transactions take the write lock when they begin. A deferred one (sqlite3's default)
# starts on a read snapshot, and if another connection - the digest learner's - commits while
# it waits for the lock, WAL answers SQLITE_BUSY_SNAPSHOT at once, whatever the busy timeout.
WRITE_TRANSACTIONS: Final = "IMMEDIATE"

# Documents a reader refused (past a nesting, work, size or object bound), by sha256: never read again.
_REFUSED = """
CREATE TABLE IF NOT EXISTS refused_documents (
    sha256 TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    path TEXT NOT NULL,
    refused_at REAL NOT NULL
) WITHOUT ROWID;
"""

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS units (
    channel TEXT NOT NULL,
    subdir TEXT NOT NULL,
    filename TEXT NOT NULL,
    kind TEXT NOT NULL,
    upstream_url TEXT NOT NULL,
    state TEXT NOT NULL,
    blob_key TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    headers TEXT NOT NULL,
    etag TEXT,
    last_modified TEXT,
    fetched_at REAL NOT NULL,
    validated_at REAL NOT NULL,
    accessed_at REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0,
    source_blob TEXT,
    PRIMARY KEY (channel, subdir, filename)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS units_blob ON units (blob_key);
CREATE TABLE IF NOT EXISTS digests (
    channel TEXT NOT NULL,
    subdir TEXT NOT NULL,
    filename TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER,
    PRIMARY KEY (channel, subdir, filename)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS shard_bases (
    channel TEXT NOT NULL,
    subdir TEXT NOT NULL,
    base_url TEXT NOT NULL,
    PRIMARY KEY (channel, subdir)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS package_bases (
    channel TEXT NOT NULL,
    subdir TEXT NOT NULL,
    base_url TEXT NOT NULL,
    PRIMARY KEY (channel, subdir)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending (
    blob_key TEXT PRIMARY KEY,
    since REAL NOT NULL
) WITHOUT ROWID;
"""
    + _REFUSED
)

# Additive migrations, keyed by the version they lead to.
_MIGRATIONS = {2: "ALTER TABLE units ADD COLUMN source_blob TEXT", 3: _REFUSED}


def connect_sync(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection for work done in executor threads (digest learning)."""
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=WRITE_TRANSACTIONS)
    # No journal_mode pragma here: WAL is a property of the file (set once by Catalog.open),
    # and asking for it again on every connection needlessly takes locks of its own.
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class CatalogDB:
    """The connection and the state every table class shares; the only writer of the file."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        # Hot look-ups: rows only change through this object, so the cache stays coherent.
        self._rows: LRUCache[UnitKey, Unit] = LRUCache(maxsize=HOT_ROWS)
        self._touched: dict[UnitKey, tuple[float, int]] = {}
        # Blobs the evictor is deleting: a put of the same bytes waits, or it would trust a
        # file that is about to vanish (the store's put skips a blob that already exists).
        self._claims: dict[str, asyncio.Event] = {}
        self.on_complete: Callable[[Unit], None] | None = None  # told of every committed row

    @classmethod
    async def open(cls, path: Path) -> Self:
        """Open (creating or migrating) the catalog at path."""
        db = await aiosqlite.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=WRITE_TRANSACTIONS)
        db.row_factory = sqlite3.Row
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        async with db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
            version = row[0] if row else 0
        if version > SCHEMA_VERSION:
            await db.close()
            raise RuntimeError(f"{path}: catalog schema {version} is newer than this condaproxy")
        # A new file gets the current schema whole; an older one is migrated step by step.
        await db.executescript(_SCHEMA)
        if version:
            for target in range(version + 1, SCHEMA_VERSION + 1):
                await db.execute(_MIGRATIONS[target])
        await db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        await db.commit()
        return cls(db, path)

    async def _execute(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        try:
            async with self._db.execute(sql, tuple(params)) as cur:
                return list(await cur.fetchall())
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise CatalogBusy(str(exc)) from exc
            raise

    async def _write(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        """One statement in its own transaction; rolled back if it or its commit fails.

        A lock conflict SQLite reports without waiting out its busy timeout is tried again a
        few times (bounded) before it becomes CatalogBusy.
        """
        for attempt in range(WRITE_ATTEMPTS):
            try:
                rows = await self._execute(sql, params)
                try:
                    await self._db.commit()
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) and "busy" not in str(exc):
                        raise
                    raise CatalogBusy(str(exc)) from exc
            except BaseException as exc:
                # SQLite may leave the transaction open after SQLITE_BUSY or SQLITE_FULL: close it,
                # or this connection's next statements would join a transaction that cannot commit.
                await asyncio.shield(self._db.rollback())
                if not isinstance(exc, CatalogBusy) or attempt + 1 == WRITE_ATTEMPTS:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            return rows
        raise AssertionError("unreachable")
