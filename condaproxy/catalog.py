"""The unit catalog: SQLite (WAL) rows saying which units are complete in the blob store.

A row exists only for a unit whose blob is durably stored; the `pending` table records a
blob being put so that a crash between "blob written" and "row committed" is swept at the
next start. Package digests learned from repodata and shards live in `digests`.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import aiosqlite
from cachetools import LRUCache

from condaproxy.errors import CatalogBusy
from condaproxy.paths import Kind, UnitKey

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 5000
# Rows kept in memory for hot look-ups. A row costs ~2 KB (its headers): 10,000 bound the
# cache to ~20 MB, where 50,000 let a 10-minute soak over thousands of channels grow by 89 MB.
HOT_ROWS = 10_000
WRITE_ATTEMPTS = 4
# Write transactions take the write lock when they begin. A deferred one (sqlite3's default)
# starts on a read snapshot, and if another connection - the digest learner's - commits while
# it waits for the lock, WAL answers SQLITE_BUSY_SNAPSHOT at once, whatever the busy timeout.
WRITE_TRANSACTIONS: Final = "IMMEDIATE"

_SCHEMA = """
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

# Additive migrations, keyed by the version they lead to.
_MIGRATIONS = {2: "ALTER TABLE units ADD COLUMN source_blob TEXT"}

COMPLETE = "complete"
_REPRESENTATION_HEADERS = frozenset(
    {"ETag", "Last-Modified", "Content-Type", "Content-Encoding", "Content-Md5"}
)


@dataclass(frozen=True, slots=True)
class Unit:
    """A catalog row: a complete unit and what is needed to serve and revalidate it."""

    key: UnitKey
    upstream_url: str
    blob_key: str
    sha256: str
    size: int
    headers: dict[str, str] = field(hash=False)
    etag: str | None
    last_modified: str | None
    fetched_at: float
    validated_at: float
    state: str = COMPLETE
    source: str | None = None  # a derived unit: blob key of the variant it was made from


def _unit(row: sqlite3.Row) -> Unit:
    return Unit(
        key=UnitKey(row["channel"], row["subdir"], row["filename"], Kind(row["kind"])),
        upstream_url=row["upstream_url"],
        blob_key=row["blob_key"],
        sha256=row["sha256"],
        size=row["size"],
        headers=json.loads(row["headers"]),
        etag=row["etag"],
        last_modified=row["last_modified"],
        fetched_at=row["fetched_at"],
        validated_at=row["validated_at"],
        state=row["state"],
        source=row["source_blob"],
    )


def connect_sync(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection for work done in executor threads (digest learning)."""
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=WRITE_TRANSACTIONS)
    # No journal_mode pragma here: WAL is a property of the file (set once by Catalog.open),
    # and asking for it again on every connection needlessly takes locks of its own.
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class Catalog:
    """Async access to the catalog; the only writer of unit rows."""

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
    async def open(cls, path: Path) -> Catalog:
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

    async def close(self) -> None:
        """Flush access statistics and close; safe to call twice."""
        if self._db is None:
            return
        try:
            await self.flush_touches()
        finally:
            db, self._db = self._db, None  # type: ignore[assignment]
            await db.close()

    async def _execute(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        try:
            async with self._db.execute(sql, tuple(params)) as cur:
                return list(await cur.fetchall())
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise CatalogBusy(str(exc)) from exc
            raise

    async def get(self, key: UnitKey) -> Unit | None:
        """The complete unit for key, or None."""
        unit = self._rows.get(key)
        if unit is not None:
            return unit
        rows = await self._execute(
            "SELECT * FROM units WHERE channel=? AND subdir=? AND filename=? AND state=?",
            (key.channel, key.subdir, key.filename, COMPLETE),
        )
        if not rows:
            return None
        unit = _unit(rows[0])
        self._rows[key] = unit
        return unit

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

    async def begin_put(self, blob_key: str) -> None:
        """Record the intent to put a blob, before it is written into the store."""
        while (claim := self._claims.get(blob_key)) is not None:
            await claim.wait()
        await self._write(
            "INSERT OR REPLACE INTO pending (blob_key, since) VALUES (?, ?)", (blob_key, time.time())
        )

    async def complete(self, unit: Unit) -> str | None:
        """Make unit visible; returns a replaced blob key that no row references any more."""
        k = unit.key
        try:
            old = await self._execute(
                "SELECT blob_key FROM units WHERE channel=? AND subdir=? AND filename=?",
                (k.channel, k.subdir, k.filename),
            )
            await self._execute(
                """INSERT OR REPLACE INTO units (channel, subdir, filename, kind, upstream_url,
                   state, blob_key, sha256, size, headers, etag, last_modified, fetched_at,
                   validated_at, accessed_at, source_blob, hits)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,
                           COALESCE((SELECT hits FROM units
                                     WHERE channel=? AND subdir=? AND filename=?), 0))""",
                (
                    k.channel,
                    k.subdir,
                    k.filename,
                    k.kind.value,
                    unit.upstream_url,
                    unit.state,
                    unit.blob_key,
                    unit.sha256,
                    unit.size,
                    json.dumps(unit.headers),
                    unit.etag,
                    unit.last_modified,
                    unit.fetched_at,
                    unit.validated_at,
                    time.time(),
                    unit.source,
                    k.channel,
                    k.subdir,
                    k.filename,
                ),
            )
            await self._execute("DELETE FROM pending WHERE blob_key=?", (unit.blob_key,))
            orphan = None
            if old and old[0]["blob_key"] != unit.blob_key:
                orphan = old[0]["blob_key"]
                if await self._execute("SELECT 1 FROM units WHERE blob_key=? LIMIT 1", (orphan,)):
                    orphan = None
            await self._db.commit()
        except BaseException:
            await self._db.rollback()
            raise
        self._rows[k] = unit
        if self.on_complete is not None:
            self.on_complete(unit)
        return orphan

    async def abandon_put(self, blob_key: str) -> bool:
        """Forget a pending put; True when no row uses the blob, so it may be deleted."""
        await self._write("DELETE FROM pending WHERE blob_key=?", (blob_key,))
        return not await self._execute("SELECT 1 FROM units WHERE blob_key=? LIMIT 1", (blob_key,))

    async def revalidated(self, unit: Unit, headers: dict[str, str], now: float) -> Unit | None:
        """Upstream said 304: the cached unit is fresh again, with any refreshed validators.

        None when the row no longer holds unit's blob (replaced or removed meanwhile).
        """
        client_side = headers
        if unit.source is not None:
            # Our own bytes (derived or rewritten): upstream's validators describe other bytes.
            client_side = {k: v for k, v in headers.items() if k not in _REPRESENTATION_HEADERS}
        merged = {**unit.headers, **client_side}
        fresh = replace(
            unit,
            headers=merged,
            etag=headers.get("ETag", unit.etag),
            last_modified=headers.get("Last-Modified", unit.last_modified),
            validated_at=now,
        )
        k = unit.key
        async with self._db.execute(
            """UPDATE units SET validated_at=?, headers=?, etag=?, last_modified=?
               WHERE channel=? AND subdir=? AND filename=? AND blob_key=?""",
            (
                now,
                json.dumps(merged),
                fresh.etag,
                fresh.last_modified,
                k.channel,
                k.subdir,
                k.filename,
                unit.blob_key,
            ),
        ) as cur:
            changed = cur.rowcount
        await self._db.commit()
        if changed != 1:
            self._rows.pop(k, None)  # let the next look-up read what the row now says
            return None
        self._rows[k] = fresh
        return fresh

    async def remove(self, key: UnitKey) -> str | None:
        """Drop a unit's row; returns its blob key when no other row references it."""
        self._rows.pop(key, None)
        rows = await self._write(
            "DELETE FROM units WHERE channel=? AND subdir=? AND filename=? RETURNING blob_key",
            (key.channel, key.subdir, key.filename),
        )
        if not rows:
            return None
        blob = str(rows[0]["blob_key"])
        used = await self._execute("SELECT 1 FROM units WHERE blob_key=? LIMIT 1", (blob,))
        return None if used else blob

    async def expire(self, channel: str, subdir: str, filenames: Iterable[str]) -> None:
        """Make cached units due for revalidation now (a sibling variant changed upstream)."""
        names = list(filenames)
        for key in [k for k in self._rows if (k.channel, k.subdir) == (channel, subdir)]:
            if key.filename in names:
                del self._rows[key]
        await self._db.executemany(
            "UPDATE units SET validated_at=0 WHERE channel=? AND subdir=? AND filename=?",
            [(channel, subdir, name) for name in names],
        )
        await self._db.commit()

    async def set_shard_base(self, channel: str, subdir: str, base_url: str | None) -> None:
        """Remember (or forget) the absolute shards_base_url an upstream index names."""
        if await self.shard_base(channel, subdir) == base_url:
            return  # the usual case (no mapping, none wanted): no write, no lock to wait for
        if base_url is None:
            await self._execute("DELETE FROM shard_bases WHERE channel=? AND subdir=?", (channel, subdir))
        else:
            await self._execute(
                "INSERT OR REPLACE INTO shard_bases VALUES (?, ?, ?)", (channel, subdir, base_url)
            )
        await self._db.commit()

    async def shard_base(self, channel: str, subdir: str) -> str | None:
        """The upstream base URL of a subdir's shards, when its index names an absolute one."""
        rows = await self._execute(
            "SELECT base_url FROM shard_bases WHERE channel=? AND subdir=?", (channel, subdir)
        )
        return str(rows[0]["base_url"]) if rows else None

    async def set_package_base(self, channel: str, subdir: str, base_url: str | None) -> None:
        """Remember (or forget) the absolute CEP-15 info.base_url a subdir's repodata names."""
        if await self.package_base(channel, subdir) == base_url:
            return  # the usual case (no mapping, none wanted): no write, no lock to wait for
        if base_url is None:
            await self._write("DELETE FROM package_bases WHERE channel=? AND subdir=?", (channel, subdir))
        else:
            await self._write(
                "INSERT OR REPLACE INTO package_bases VALUES (?, ?, ?)", (channel, subdir, base_url)
            )

    async def package_base(self, channel: str, subdir: str) -> str | None:
        """The upstream base URL of a subdir's packages, when its repodata names a foreign one."""
        rows = await self._execute(
            "SELECT base_url FROM package_bases WHERE channel=? AND subdir=?", (channel, subdir)
        )
        return str(rows[0]["base_url"]) if rows else None

    def touch(self, key: UnitKey, now: float) -> None:
        """Count a hit; written in batches by flush_touches, not per request."""
        _, hits = self._touched.get(key, (now, 0))
        self._touched[key] = (now, hits + 1)

    async def flush_touches(self) -> None:
        """Write buffered access times and hit counts."""
        if not self._touched:
            return
        batch, self._touched = self._touched, {}
        await self._db.executemany(
            "UPDATE units SET accessed_at=?, hits=hits+? WHERE channel=? AND subdir=? AND filename=?",
            [(t, n, k.channel, k.subdir, k.filename) for k, (t, n) in batch.items()],
        )
        await self._db.commit()

    async def expected(self, channel: str, subdir: str, filename: str) -> tuple[str, int | None] | None:
        """The sha256 and size the channel's own metadata gives for a package, if learned."""
        rows = await self._execute(
            "SELECT sha256, size FROM digests WHERE channel=? AND subdir=? AND filename=?",
            (channel, subdir, filename),
        )
        return (rows[0]["sha256"], rows[0]["size"]) if rows else None

    async def pending_orphans(self) -> list[str]:
        """Blobs whose put never committed (crash mid-persist) and that no row uses; clears them."""
        rows = await self._execute(
            "SELECT blob_key FROM pending WHERE blob_key NOT IN (SELECT blob_key FROM units)"
        )
        await self._execute("DELETE FROM pending")
        await self._db.commit()
        return [r["blob_key"] for r in rows]

    async def all_units(self) -> list[Unit]:
        """Every complete unit (for verification and tests)."""
        return [_unit(r) for r in await self._execute("SELECT * FROM units")]

    async def referenced_blobs(self) -> set[str]:
        """Every blob key a row references or a put in progress claims."""
        rows = await self._execute("SELECT blob_key FROM units UNION SELECT blob_key FROM pending")
        return {r["blob_key"] for r in rows}

    # -- eviction ------------------------------------------------------------------------------

    async def stored_size(self) -> int:
        """Bytes in the store: each distinct blob once, however many rows share it."""
        rows = await self._execute(
            """SELECT COALESCE(SUM(size), 0) AS total
               FROM (SELECT MAX(size) AS size FROM units GROUP BY blob_key)"""
        )
        return int(rows[0]["total"])

    async def eviction_candidates(self, limit: int, offset: int = 0) -> list[Candidate]:
        """Units in eviction order: least recently accessed first, then fewest hits."""
        rows = await self._execute(
            """SELECT channel, subdir, filename, kind, blob_key, size, accessed_at FROM units
               ORDER BY accessed_at, hits LIMIT ? OFFSET ?""",
            (limit, offset),
        )
        return [
            Candidate(
                UnitKey(r["channel"], r["subdir"], r["filename"], Kind(r["kind"])),
                r["blob_key"],
                r["size"],
                r["accessed_at"],
            )
            for r in rows
        ]

    async def evict(self, key: UnitKey, blob_key: str, accessed_at: float) -> tuple[bool, str | None]:
        """Drop key's row unless used or replaced since it was chosen; (removed, blob to delete).

        A returned blob is marked pending (swept at the next start should the process die before
        deleting it) and claimed: puts of it wait until blob_deleted() is called.
        """
        if key in self._touched or blob_key in self._claims:
            return False, None
        self._claims[blob_key] = asyncio.Event()  # before any await: orders us against begin_put
        orphan = False
        try:
            self._rows.pop(key, None)
            removed = await self._execute(
                """DELETE FROM units WHERE channel=? AND subdir=? AND filename=? AND blob_key=?
                   AND accessed_at<=? RETURNING blob_key""",
                (key.channel, key.subdir, key.filename, blob_key, accessed_at),
            )
            orphan = bool(removed) and not await self._execute(
                """SELECT 1 FROM units WHERE blob_key=?
                   UNION ALL SELECT 1 FROM pending WHERE blob_key=? LIMIT 1""",
                (blob_key, blob_key),
            )
            if orphan:
                await self._execute(
                    "INSERT INTO pending (blob_key, since) VALUES (?, ?)", (blob_key, time.time())
                )
            await self._db.commit()
        except BaseException:
            orphan = False
            await asyncio.shield(self._db.rollback())
            raise
        finally:
            if not orphan:
                self._claims.pop(blob_key).set()
        return bool(removed), blob_key if orphan else None

    async def blob_deleted(self, blob_key: str, deleted: bool = True) -> None:
        """The evictor is done with blob_key: clear its pending mark if the blob is gone."""
        try:
            if deleted:
                await self._execute("DELETE FROM pending WHERE blob_key=?", (blob_key,))
                await self._db.commit()
        finally:
            if (claim := self._claims.pop(blob_key, None)) is not None:
                claim.set()


@dataclass(frozen=True, slots=True)
class Candidate:
    """A unit the evictor may remove, with what it needs to decide and to account."""

    key: UnitKey
    blob_key: str
    size: int
    accessed_at: float
