"""Eviction queries: the store's size, candidates in LRU order, and the claim-before-await delete."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from condaproxy.cache.catalog.db import CatalogDB
from condaproxy.conda.paths import Kind, UnitKey


@dataclass(frozen=True, slots=True)
class Candidate:
    """A unit the evictor may remove, with what it needs to decide and to account."""

    key: UnitKey
    blob_key: str
    size: int
    accessed_at: float


class EvictionRows(CatalogDB):
    """What the evictor asks of the catalog, and the rows it drops."""

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
