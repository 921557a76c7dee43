"""Revision history: every distinct repodata and shard index the proxy served, and when each was current.

A revision is a row (channel, subdir, filename, first_at, last_at, blob) and the blob itself, kept
by a unit row of its own under an internal name (`repodata.json@rev-<sha256>`) so that the store's
reference counting, eviction (it counts in max_size) and sweeps treat it like any other file. Both
are written in the very transaction that makes a new document visible.
"""

from __future__ import annotations

import json

from condaproxy.cache.catalog.db import CatalogDB, Tx
from condaproxy.cache.unit import Unit
from condaproxy.conda.derived import TRACKED, rev_name
from condaproxy.conda.paths import UnitKey, kind_of


class RevisionRows(CatalogDB):
    """Recording revisions as documents change, and finding the one current at a moment."""

    async def _completing(self, tx: Tx, unit: Unit) -> None:
        k = unit.key
        if k.filename not in TRACKED:
            return
        now = self.clock()
        latest = await tx.execute(
            """SELECT first_at, blob_key FROM revisions WHERE channel=? AND subdir=? AND filename=?
               ORDER BY first_at DESC LIMIT 1""",
            (k.channel, k.subdir, k.filename),
        )
        if latest and latest[0]["blob_key"] == unit.blob_key:
            await tx.execute(
                "UPDATE revisions SET last_at=? WHERE channel=? AND subdir=? AND filename=? AND first_at=?",
                (now, k.channel, k.subdir, k.filename, latest[0]["first_at"]),
            )
            return
        if latest and now <= latest[0]["first_at"]:
            now = latest[0]["first_at"] + 0.001  # a clock that stood still: keep the order
        if latest:
            await tx.execute(
                "UPDATE revisions SET last_at=? WHERE channel=? AND subdir=? AND filename=? AND first_at=?",
                (now, k.channel, k.subdir, k.filename, latest[0]["first_at"]),
            )
        await tx.execute(
            "INSERT INTO revisions VALUES (?, ?, ?, ?, ?, ?)",
            (k.channel, k.subdir, k.filename, now, now, unit.blob_key),
        )
        # The blob is kept by a row of its own, so the next document does not orphan it.
        await tx.execute(
            """INSERT OR IGNORE INTO units (channel, subdir, filename, kind, upstream_url, state,
               blob_key, sha256, size, headers, etag, last_modified, fetched_at, validated_at,
               accessed_at, source_blob, hits)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?, ?, NULL, 0)""",
            (
                k.channel,
                k.subdir,
                rev_name(k.filename, unit.blob_key),
                k.kind.value,
                unit.upstream_url,
                unit.state,
                unit.blob_key,
                unit.sha256,
                unit.size,
                json.dumps(unit.headers),
                unit.fetched_at,
                unit.validated_at,
                unit.fetched_at,
            ),
        )

    async def revision_at(self, key: UnitKey, moment: float) -> UnitKey | None:
        """The unit of the revision of key current at moment, or None if none known then is kept."""
        rows = await self._read(
            """SELECT blob_key FROM revisions WHERE channel=? AND subdir=? AND filename=? AND first_at<=?
               ORDER BY first_at DESC LIMIT 1""",
            (key.channel, key.subdir, key.filename, moment),
        )
        if not rows:
            return None
        return UnitKey(key.channel, key.subdir, rev_name(key.filename, rows[0]["blob_key"]), key.kind)

    async def prune_revisions(self, before: float) -> list[UnitKey]:
        """Forget revisions superseded before `before`; returns their unit keys no revision still needs."""
        async with self.transaction() as tx:
            rows = await tx.execute(
                "DELETE FROM revisions WHERE last_at<? AND EXISTS (SELECT 1 FROM revisions AS r2 "
                "WHERE r2.channel=revisions.channel AND r2.subdir=revisions.subdir "
                "AND r2.filename=revisions.filename AND r2.first_at>revisions.first_at) "
                "RETURNING channel, subdir, filename, blob_key",
                (before,),
            )
        gone = []
        for r in rows:
            still = await self._read(
                "SELECT 1 FROM revisions WHERE channel=? AND subdir=? AND filename=? AND blob_key=? LIMIT 1",
                (r["channel"], r["subdir"], r["filename"], r["blob_key"]),
            )
            if not still:
                gone.append(
                    UnitKey(
                        r["channel"],
                        r["subdir"],
                        rev_name(r["filename"], r["blob_key"]),
                        kind_of(r["filename"]),
                    )
                )
        return gone
