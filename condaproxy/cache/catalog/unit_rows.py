"""Unit rows: which units are complete in the blob store, and the pending puts behind them.

A row exists only for a unit whose blob is durably stored; the `pending` table records a
blob being put so that a crash between "blob written" and "row committed" is swept at the
next start.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import replace

from condaproxy.cache.catalog.db import CatalogDB
from condaproxy.cache.unit import COMPLETE, REPRESENTATION_HEADERS, Unit, unit_from_row
from condaproxy.conda.paths import UnitKey


class UnitRows(CatalogDB):
    """Reading and changing unit rows and pending puts; keeps the hot-row cache coherent."""

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
        unit = unit_from_row(rows[0])
        self._rows[key] = unit
        return unit

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
            await self._completing(unit)
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
        return [unit_from_row(r) for r in await self._execute("SELECT * FROM units")]

    async def referenced_blobs(self) -> set[str]:
        """Every blob key a row references or a put in progress claims."""
        rows = await self._execute("SELECT blob_key FROM units UNION SELECT blob_key FROM pending")
        return {r["blob_key"] for r in rows}
