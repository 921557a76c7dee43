"""Unit rows: which units are complete in the blob store, and the pending puts behind them.

A row exists only for a unit whose blob is durably stored; each put of a blob records its own
pending mark, so that a crash between "blob written" and "row committed" is swept at the next
start, and so that no put's end clears the mark another put of the same bytes still relies on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

from condaproxy.cache.catalog.db import CatalogDB
from condaproxy.cache.unit import COMPLETE, REPRESENTATION_HEADERS, Unit, unit_from_row
from condaproxy.conda.paths import UnitKey


@dataclass(frozen=True, slots=True)
class Put:
    """One put of a blob in progress: its own pending mark."""

    blob_key: str
    mark: int


class UnitRows(CatalogDB):
    """Reading and changing unit rows and pending puts; keeps the hot-row cache coherent."""

    async def get(self, key: UnitKey) -> Unit | None:
        """The complete unit for key, or None."""
        unit = self._rows.get(key)
        if unit is not None:
            return unit
        generation = self._generation
        rows = await self._read(
            "SELECT * FROM units WHERE channel=? AND subdir=? AND filename=? AND state=?",
            (key.channel, key.subdir, key.filename, COMPLETE),
        )
        if not rows:
            return None
        unit = unit_from_row(rows[0])
        self._cache(key, unit, generation)
        return unit

    async def begin_put(self, blob_key: str) -> Put:
        """Record the intent to put a blob, before it is written into the store."""
        while True:
            if (claim := self._claims.get(blob_key)) is not None:
                await claim.wait()
                continue
            async with self.transaction() as tx:
                # Checked again under the write lock: a removal may have claimed it meanwhile.
                if blob_key not in self._claims:
                    rows = await tx.execute(
                        "INSERT INTO pending (blob_key, since) VALUES (?, ?) RETURNING put",
                        (blob_key, time.time()),
                    )
                    return Put(blob_key, int(rows[0]["put"]))

    async def complete(self, unit: Unit, put: Put | None = None) -> str | None:
        """Make unit visible and end its put; returns a replaced blob that no row uses any more.

        A returned blob is claimed and marked pending: the caller deletes it, then calls
        blob_deleted().
        """
        k = unit.key
        orphan: str | None = None
        try:
            async with self.transaction() as tx:
                old = await tx.execute(
                    "SELECT blob_key FROM units WHERE channel=? AND subdir=? AND filename=?",
                    (k.channel, k.subdir, k.filename),
                )
                await tx.execute(
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
                if put is not None:
                    await tx.execute("DELETE FROM pending WHERE put=?", (put.mark,))
                replaced = str(old[0]["blob_key"]) if old else None
                if replaced is not None and replaced != unit.blob_key and self._claim_or_leave(replaced):
                    orphan = replaced
                    if not await self._mark_orphan(tx, replaced):
                        self._release(replaced)
                        orphan = None
        except BaseException:
            self._rows.pop(k, None)
            if orphan is not None:
                self._release(orphan)
            raise
        self._rows[k] = unit
        if self.on_complete is not None:
            self.on_complete(unit)
        return orphan

    async def abandon_put(self, put: Put) -> bool:
        """Forget a put that will not complete; True when its blob must now be deleted.

        That blob is claimed and marked pending: the caller deletes it, then calls blob_deleted().
        """
        held = False
        try:
            async with self.transaction() as tx:
                await tx.execute("DELETE FROM pending WHERE put=?", (put.mark,))
                held = self._claim_or_leave(put.blob_key)
                if held and not await self._mark_orphan(tx, put.blob_key):
                    self._release(put.blob_key)
                    held = False
        except BaseException:
            if held:
                self._release(put.blob_key)
            raise
        return held

    async def revalidated(self, unit: Unit, headers: dict[str, str], now: float) -> Unit | None:
        """Upstream said 304: the cached unit is fresh again, with any refreshed validators.

        None when the row no longer holds unit's blob (replaced or removed meanwhile), or was
        expired since unit was read: a 304 to a request sent before a sibling changed is stale.
        """
        client_side = headers
        if unit.source is not None:
            # Our own bytes (derived or rewritten): upstream's validators describe other bytes.
            client_side = {k: v for k, v in headers.items() if k not in REPRESENTATION_HEADERS}
        merged = {**unit.headers, **client_side}
        fresh = replace(
            unit,
            headers=merged,
            etag=headers.get("ETag", unit.etag),
            last_modified=headers.get("Last-Modified", unit.last_modified),
            validated_at=now,
        )
        k = unit.key
        try:
            async with self.transaction() as tx:
                changed = await tx.execute(
                    """UPDATE units SET validated_at=?, headers=?, etag=?, last_modified=?
                       WHERE channel=? AND subdir=? AND filename=? AND blob_key=? AND validated_at=?
                       RETURNING 1""",
                    (
                        now,
                        json.dumps(merged),
                        fresh.etag,
                        fresh.last_modified,
                        k.channel,
                        k.subdir,
                        k.filename,
                        unit.blob_key,
                        unit.validated_at,
                    ),
                )
        except BaseException:
            self._rows.pop(k, None)
            raise
        if len(changed) != 1:
            self._rows.pop(k, None)  # let the next look-up read what the row now says
            return None
        self._rows[k] = fresh
        return fresh

    async def expire(self, channel: str, subdir: str, filenames: Iterable[str]) -> None:
        """Make cached units due for revalidation now (a sibling variant changed upstream)."""
        names = list(filenames)
        try:
            async with self.transaction() as tx:
                # Long past, and a new value at each expiry, so that revalidated() can tell that a
                # row was expired after it was read (a 304 answering an older request must not
                # refresh it).
                await tx.executemany(
                    """UPDATE units SET validated_at=MIN(validated_at, 0) - 1
                       WHERE channel=? AND subdir=? AND filename=?""",
                    [(channel, subdir, name) for name in names],
                )
        finally:
            for key in [k for k in self._rows if (k.channel, k.subdir) == (channel, subdir)]:
                if key.filename in names:
                    del self._rows[key]

    def touch(self, key: UnitKey, now: float) -> None:
        """Count a hit; written in batches by flush_touches, not per request."""
        _, hits = self._touched.get(key, (now, 0))
        self._touched[key] = (now, hits + 1)

    async def flush_touches(self) -> None:
        """Write buffered access times and hit counts."""
        if not self._touched:
            return
        batch, self._touched = self._touched, {}
        async with self.transaction() as tx:
            await tx.executemany(
                "UPDATE units SET accessed_at=?, hits=hits+? WHERE channel=? AND subdir=? AND filename=?",
                [(t, n, k.channel, k.subdir, k.filename) for k, (t, n) in batch.items()],
            )

    async def pending_orphans(self) -> list[str]:
        """Blobs whose put never committed (crash mid-persist) and that no row uses; clears them."""
        async with self.transaction() as tx:
            rows = await tx.execute(
                """SELECT DISTINCT blob_key FROM pending
                   WHERE blob_key NOT IN (SELECT blob_key FROM units) ORDER BY blob_key"""
            )
            await tx.execute("DELETE FROM pending")
        return [r["blob_key"] for r in rows]

    async def all_units(self) -> list[Unit]:
        """Every complete unit, all at once (for tests; the scrub pages through blob_page())."""
        return [unit_from_row(r) for r in await self._read("SELECT * FROM units")]

    async def blob_page(self, after: str, limit: int) -> list[tuple[str, set[int]]]:
        """The next limit blobs after the key `after`, in key order, each with the sizes its rows give."""
        rows = await self._read(
            """SELECT blob_key, group_concat(DISTINCT size) AS sizes FROM units
               WHERE blob_key > ? GROUP BY blob_key ORDER BY blob_key LIMIT ?""",
            (after, limit),
        )
        return [(r["blob_key"], {int(s) for s in str(r["sizes"]).split(",")}) for r in rows]

    async def referenced_blobs(self) -> set[str]:
        """Every blob key a row references or a put in progress claims."""
        rows = await self._read("SELECT blob_key FROM units UNION SELECT blob_key FROM pending")
        return {r["blob_key"] for r in rows}
