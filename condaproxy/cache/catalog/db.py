"""The catalog's database: its schema, its two connections, and write transactions one at a time.

The tables are reached through small classes over these connections (unit_rows.py, learned.py,
eviction.py); catalog.py puts them together. Every write is a transaction(): one at a time on
the writer connection, so one coroutine's rollback or commit never takes another's statements
with it. Reads go to a second connection and see committed rows only. Rows of units live in a
bounded hot-row cache here, changed only once what they show is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Final, Self

import aiosqlite
from cachetools import LRUCache

from condaproxy.cache.unit import Unit
from condaproxy.conda.paths import Kind, UnitKey
from condaproxy.errors import CatalogBusy

SCHEMA_VERSION = 6
BUSY_TIMEOUT_MS = 5000
# Rows kept in memory for hot look-ups. A row costs ~2 KB (its headers): 10,000 bound the
# cache to ~20 MB, where 50,000 let a 10-minute soak over thousands of channels grow by 89 MB.
HOT_ROWS = 10_000
WRITE_ATTEMPTS = 4
WRITE_BACKOFF = 0.05
# Write transactions take the write lock when they begin. A deferred one (sqlite3's default)
# starts on a read snapshot, and if another connection - the digest learner's - commits while
# it waits for the lock, WAL answers SQLITE_BUSY_SNAPSHOT at once, whatever the busy timeout.
WRITE_TRANSACTIONS: Final = "IMMEDIATE"
# The WAL file is cut back to this size whenever it is reset: it counts against max_size.
WAL_LIMIT = 4 * 1024 * 1024

# What the proxy learned from a subdir (package digests, foreign bases) is kept only while some
# of the subdir's metadata is cached: the unit it was learned from, or one saying the same
# (learned.py says when each kind goes).
METADATA_KINDS: Final = (Kind.REPODATA.value, Kind.SHARD_INDEX.value, Kind.SHARD.value)
# A kept revision (`repodata.json@rev-<sha256>`, for views) is history, not the subdir's
# metadata: what was learned goes with the last live document, and the ledger with it.
HAS_METADATA: Final = (
    "SELECT 1 FROM units WHERE channel=? AND subdir=? AND kind IN "
    f"({', '.join(repr(k) for k in METADATA_KINDS)}) AND filename NOT LIKE '%@rev-%' LIMIT 1"
)
LEARNED_TABLES: Final = ("digests", "shard_bases", "package_bases")

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
CREATE INDEX IF NOT EXISTS units_kind ON units (channel, subdir, kind);
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
    put INTEGER PRIMARY KEY,
    blob_key TEXT NOT NULL,
    since REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS pending_blob ON pending (blob_key);
CREATE TABLE IF NOT EXISTS ledger (
    channel TEXT NOT NULL,
    subdir TEXT NOT NULL,
    filename TEXT NOT NULL,
    name TEXT NOT NULL,
    first_seen REAL NOT NULL,
    timestamp REAL,
    indexed_timestamp REAL,
    PRIMARY KEY (channel, subdir, filename)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ledger_subdirs (
    channel TEXT NOT NULL,
    subdir TEXT NOT NULL,
    since REAL NOT NULL,
    PRIMARY KEY (channel, subdir)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS private_channels (
    channel TEXT PRIMARY KEY,
    since REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS revisions (
    channel TEXT NOT NULL,
    subdir TEXT NOT NULL,
    filename TEXT NOT NULL,
    first_at REAL NOT NULL,
    last_at REAL NOT NULL,
    blob_key TEXT NOT NULL,
    PRIMARY KEY (channel, subdir, filename, first_at)
) WITHOUT ROWID;
"""
    + _REFUSED
)

# Migrations, keyed by the version they lead to; each runs in one transaction with its version.
_MIGRATIONS = {
    2: "ALTER TABLE units ADD COLUMN source_blob TEXT;",
    # One mark per put, not per blob: two puts of the same bytes no longer share (and clear) one.
    3: """CREATE TABLE pending_puts (put INTEGER PRIMARY KEY, blob_key TEXT NOT NULL, since REAL NOT NULL);
          INSERT INTO pending_puts (blob_key, since) SELECT blob_key, since FROM pending;
          DROP TABLE pending;
          ALTER TABLE pending_puts RENAME TO pending;
          CREATE INDEX pending_blob ON pending (blob_key);""",
    # The ledger of first sightings and the revision history: created by the schema script.
    4: "SELECT 1;",
    # Documents a reader refused (nesting, work, size or object bounds): read and refused once.
    5: _REFUSED,
    # Channels learned to be private: created by the schema script.
    6: "SELECT 1;",
}


async def connect(path: Path) -> aiosqlite.Connection:
    """An aiosqlite connection to the catalog at path, rows readable by column name."""
    db = await aiosqlite.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=WRITE_TRANSACTIONS)
    db.row_factory = sqlite3.Row
    return db


# How the catalog opens its connections; tests pass one that wraps them to pause at chosen steps.
Connect = Callable[[Path], Awaitable[aiosqlite.Connection]]


def connect_sync(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection for work done in executor threads (digest learning).

    Its writes must be transactions begun with BEGIN IMMEDIATE: SQLite's own lock then orders
    them against the catalog's writer.
    """
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=WRITE_TRANSACTIONS)
    # No journal_mode pragma here: WAL is a property of the file (set once by Catalog.open),
    # and asking for it again on every connection needlessly takes locks of its own.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
    return conn


def is_busy(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused for a lock another connection holds."""
    return "locked" in str(exc) or "busy" in str(exc)


class Tx:
    """The statements of one write transaction; only valid inside CatalogDB.transaction()."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        """Run one statement; its rows (RETURNING or SELECT)."""
        try:
            async with self._db.execute(sql, tuple(params)) as cur:
                return list(await cur.fetchall())
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                raise CatalogBusy(str(exc)) from exc
            raise

    async def count(self, sql: str, params: Iterable[Any] = ()) -> int:
        """Run one statement; how many rows it changed."""
        try:
            async with self._db.execute(sql, tuple(params)) as cur:
                return int(cur.rowcount)
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                raise CatalogBusy(str(exc)) from exc
            raise

    async def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        """Run one statement for every row of parameters."""
        try:
            await self._db.executemany(sql, [tuple(r) for r in rows])
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                raise CatalogBusy(str(exc)) from exc
            raise


class CatalogDB:
    """The connections and the state every table class shares; the only writer of the file."""

    def __init__(self, db: aiosqlite.Connection, reader: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self._reader = reader
        self.path = path
        # One write transaction at a time on the writer connection (reads never wait for it).
        self._lock = asyncio.Lock()
        # Bumped as every write transaction ends: a look-up that overlapped one may have read
        # what was true before it, and must not put that into the hot-row cache.
        self._generation = 0
        # Hot look-ups: rows only change through this object, so the cache stays coherent.
        self._rows: LRUCache[UnitKey, Unit] = LRUCache(maxsize=HOT_ROWS)
        self._touched: dict[UnitKey, tuple[float, int]] = {}
        # Blobs being deleted: a put of the same bytes waits, or it would trust a file that is
        # about to vanish (the store's put skips a blob that already exists).
        self._claims: dict[str, asyncio.Event] = {}
        # Blobs a put left unused while another removal held their claim: that removal settles them.
        self._left: set[str] = set()
        self.on_complete: Callable[[Unit], None] | None = None  # told of every committed row
        # Told of every blob deleted from the store (copies kept elsewhere are dropped).
        self.on_blob_deleted: Callable[[str], None] | None = None
        # The time of ledger sightings and revisions; injectable so tests move time, not sleep.
        self.clock: Callable[[], float] = time.time

    async def _completing(self, tx: Tx, unit: Unit) -> None:
        """Called inside the transaction that makes unit visible (revisions.py records history)."""

    @classmethod
    async def open(cls, path: Path, *, connect: Connect = connect) -> Self:
        """Open (creating or migrating) the catalog at path."""
        db = await connect(path)
        try:
            async with db.execute("PRAGMA user_version") as cur:
                row = await cur.fetchone()
                version = row[0] if row else 0
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{path}: catalog schema {version} is newer than this condaproxy")
            # Incremental auto-vacuum lets eviction give freed pages back to the file system. It
            # takes effect here only on a new file; an older one is rebuilt once, below.
            await db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            # A new file gets the current schema whole; an older one is migrated step by step.
            await db.executescript(_SCHEMA)
            if version:
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    await _migrate(db, target)
            await db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            await db.commit()
            async with db.execute("PRAGMA auto_vacuum") as cur:
                row = await cur.fetchone()
            if row is None or row[0] != 2:
                await db.execute("VACUUM")
            reader = await connect(path)
        except BaseException:
            await db.close()
            raise
        try:
            await reader.execute("PRAGMA query_only=1")
        except BaseException:
            await reader.close()
            await db.close()
            raise
        return cls(db, reader, path)

    async def _read(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        """One query on the read connection: committed rows only."""
        try:
            async with self._reader.execute(sql, tuple(params)) as cur:
                return list(await cur.fetchall())
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                raise CatalogBusy(str(exc)) from exc
            raise

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """One write transaction, atomic with respect to every other: committed when the body
        ends, rolled back when it raises (cancellation included).

        A lock conflict with another connection is waited out (SQLite's busy timeout), then
        tried again a few times before it becomes CatalogBusy.
        """
        async with self._lock:
            try:
                await self._begin()
                try:
                    yield Tx(self._db)
                    await self._commit()
                except BaseException:
                    # SQLite may leave the transaction open after SQLITE_BUSY or SQLITE_FULL: close
                    # it, or this connection's next transaction would start inside it.
                    await asyncio.shield(self._db.rollback())
                    raise
            finally:
                self._generation += 1

    async def _begin(self) -> None:
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                async with self._db.execute("BEGIN IMMEDIATE"):
                    return
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    raise
                if attempt == WRITE_ATTEMPTS:
                    raise CatalogBusy(str(exc)) from exc
            await asyncio.sleep(WRITE_BACKOFF * attempt)

    async def _commit(self) -> None:
        try:
            await self._db.commit()
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                raise CatalogBusy(str(exc)) from exc
            raise

    def _cache(self, key: UnitKey, unit: Unit, generation: int) -> None:
        """Remember a row read at generation, unless a write transaction ended since."""
        if generation == self._generation:
            self._rows[key] = unit

    def _claim(self, blob_key: str) -> bool:
        """Claim blob_key for deletion; False when another removal holds it."""
        if blob_key in self._claims:
            return False
        self._claims[blob_key] = asyncio.Event()
        return True

    def _claim_or_leave(self, blob_key: str) -> bool:
        """Claim a blob a put stopped using; if another removal holds it, leave it to that one."""
        if self._claim(blob_key):
            return True
        self._left.add(blob_key)
        return False

    def _release(self, blob_key: str) -> None:
        """Let puts of blob_key go on: the blob is gone, or stays."""
        self._left.discard(blob_key)
        if (claim := self._claims.pop(blob_key, None)) is not None:
            claim.set()

    async def _mark_orphan(self, tx: Tx, blob_key: str) -> bool:
        """Inside a transaction holding blob_key's claim: mark it pending deletion if nothing uses it.

        The mark makes the next start sweep the blob should the process die before deleting it.
        """
        used = await tx.execute(
            "SELECT 1 FROM units WHERE blob_key=? UNION ALL SELECT 1 FROM pending WHERE blob_key=? LIMIT 1",
            (blob_key, blob_key),
        )
        if used:
            return False
        await tx.execute("INSERT INTO pending (blob_key, since) VALUES (?, ?)", (blob_key, time.time()))
        return True


async def _migrate(db: aiosqlite.Connection, target: int) -> None:
    try:
        await db.executescript(
            f"BEGIN IMMEDIATE; {_MIGRATIONS[target]} PRAGMA user_version={target}; COMMIT;"
        )
    except BaseException:
        await asyncio.shield(db.rollback())
        raise
