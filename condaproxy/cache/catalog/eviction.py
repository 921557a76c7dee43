"""Eviction queries and the one way rows are dropped: claim the blob before any await, delete the
rows, mark the blob pending if nothing uses it any more; the caller deletes it, then blob_deleted().
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from condaproxy.cache.catalog.db import CatalogDB
from condaproxy.conda.paths import Kind, UnitKey


@dataclass(frozen=True, slots=True)
class Candidate:
    """A unit the evictor may remove, with what it needs to decide and to account."""

    key: UnitKey
    blob_key: str
    size: int
    accessed_at: float


@dataclass(frozen=True, slots=True)
class Dropped:
    """What one removal did."""

    keys: tuple[UnitKey, ...] = ()  # the rows removed
    # A blob no row uses any more: claimed and marked pending; delete it, then blob_deleted().
    orphan: str | None = None

    @property
    def removed(self) -> bool:
        """Whether any row went."""
        return bool(self.keys)


class EvictionRows(CatalogDB):
    """What the evictor, the scrub and a reader finding its blob gone ask of the catalog."""

    async def stored_size(self) -> int:
        """Bytes in the store: each distinct blob once, however many rows share it."""
        rows = await self._read(
            """SELECT COALESCE(SUM(size), 0) AS total
               FROM (SELECT MAX(size) AS size FROM units GROUP BY blob_key)"""
        )
        return int(rows[0]["total"])

    async def eviction_candidates(self, limit: int, offset: int = 0) -> list[Candidate]:
        """Units in eviction order: least recently accessed first, then fewest hits."""
        rows = await self._read(
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

    async def evict(self, key: UnitKey, blob_key: str, accessed_at: float) -> Dropped:
        """Drop key's row unless used or replaced since it was chosen (accessed_at, blob_key)."""
        if key in self._touched:
            return Dropped()
        return await self._drop(
            "channel=? AND subdir=? AND filename=? AND blob_key=? AND accessed_at<=?",
            (key.channel, key.subdir, key.filename, blob_key, accessed_at),
            blob_key,
            (key,),
        )

    async def remove(self, key: UnitKey, blob_key: str) -> Dropped:
        """Drop key's row if it still holds blob_key, however recently used; a newer version stays."""
        return await self._drop(
            "channel=? AND subdir=? AND filename=? AND blob_key=?",
            (key.channel, key.subdir, key.filename, blob_key),
            blob_key,
            (key,),
        )

    async def purge_blob(self, blob_key: str) -> Dropped:
        """Drop every row holding blob_key (the scrub found it damaged)."""
        return await self._drop("blob_key=?", (blob_key,), blob_key, None)

    async def _drop(
        self, where: str, params: tuple[Any, ...], blob_key: str, keys: Iterable[UnitKey] | None
    ) -> Dropped:
        # Claimed before any await: a put of these bytes that begins later waits for the delete.
        if not self._claim(blob_key):
            return Dropped()  # another removal of this blob is under way
        removed: list[UnitKey] = []
        orphan = False
        try:
            async with self.transaction() as tx:
                rows = await tx.execute(
                    f"DELETE FROM units WHERE {where} RETURNING channel, subdir, filename, kind", params
                )
                removed = [UnitKey(r["channel"], r["subdir"], r["filename"], Kind(r["kind"])) for r in rows]
                # Also when no row went, if a put that replaced the row left the blob to us.
                if removed or blob_key in self._left:
                    orphan = await self._mark_orphan(tx, blob_key)
        except BaseException:
            orphan = False
            raise
        finally:
            stale = keys if keys is not None else [k for k, u in self._rows.items() if u.blob_key == blob_key]
            for key in list(stale):
                self._rows.pop(key, None)
            if not orphan:
                self._release(blob_key)
        return Dropped(tuple(removed), blob_key if orphan else None)

    async def blob_deleted(self, blob_key: str, deleted: bool = True) -> None:
        """The deleter of a claimed blob is done: clear its pending mark if the blob is gone."""
        try:
            if deleted:
                async with self.transaction() as tx:
                    await tx.execute("DELETE FROM pending WHERE blob_key=?", (blob_key,))
        finally:
            self._release(blob_key)
