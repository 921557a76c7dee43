"""Eviction queries and the one way rows are dropped: claim the blob before any await, delete the
rows, mark the blob pending if nothing uses it any more; the caller deletes it, then blob_deleted().
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from condaproxy.cache.catalog.db import BUSY_TIMEOUT_MS, METADATA_KINDS, CatalogDB
from condaproxy.cache.catalog.learned import forget_subdirs
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
    forgot: bool = False  # a subdir's learned digests went with its last metadata unit

    @property
    def removed(self) -> bool:
        """Whether any row went."""
        return bool(self.keys)


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


class EvictionRows(CatalogDB):
    """What the evictor, the scrub and a reader finding its blob gone ask of the catalog."""

    async def stored_size(self) -> int:
        """Bytes in the store: each distinct blob once, however many rows share it."""
        rows = await self._read(
            """SELECT COALESCE(SUM(size), 0) AS total
               FROM (SELECT MAX(size) AS size FROM units GROUP BY blob_key)"""
        )
        return int(rows[0]["total"])

    async def catalog_size(self) -> int:
        """Bytes of the catalog itself on disk: its pages and its WAL."""
        rows = await self._read("SELECT page_count * page_size AS n FROM pragma_page_count, pragma_page_size")
        wal_path = self.path.with_name(self.path.name + "-wal")
        wal = await asyncio.get_running_loop().run_in_executor(None, _file_size, wal_path)
        return int(rows[0]["n"]) + wal

    async def reclaim(self) -> int:
        """Give pages freed by deletions back to the file system, and cut the WAL back if no one
        is using it; returns catalog_size()."""
        async with self._lock:
            # executescript runs each pragma to its end (Python's sqlite3 would step the vacuum
            # once: one page) and all in one call, so the busy timeout is always restored. The
            # checkpoint never waits: a learner or reader in the WAL leaves it for the next time.
            await self._db.executescript(
                "PRAGMA incremental_vacuum; PRAGMA busy_timeout=0; PRAGMA wal_checkpoint(TRUNCATE);"
                f" PRAGMA busy_timeout={BUSY_TIMEOUT_MS};"
            )
        return await self.catalog_size()

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
        forgot = orphan = False
        try:
            async with self.transaction() as tx:
                rows = await tx.execute(
                    f"DELETE FROM units WHERE {where} RETURNING channel, subdir, filename, kind", params
                )
                removed = [UnitKey(r["channel"], r["subdir"], r["filename"], Kind(r["kind"])) for r in rows]
                metadata = [(k.channel, k.subdir) for k in removed if k.kind.value in METADATA_KINDS]
                forgot = bool(metadata) and await forget_subdirs(tx, metadata)
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
        return Dropped(tuple(removed), blob_key if orphan else None, forgot)

    async def blob_deleted(self, blob_key: str, deleted: bool = True) -> None:
        """The deleter of a claimed blob is done: clear its pending mark if the blob is gone."""
        try:
            if deleted:
                if self.on_blob_deleted is not None:
                    self.on_blob_deleted(blob_key)
                async with self.transaction() as tx:
                    await tx.execute("DELETE FROM pending WHERE blob_key=?", (blob_key,))
        finally:
            self._release(blob_key)
