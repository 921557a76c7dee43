"""Read-mostly questions for the status page and the admin commands: what is cached per channel,
the age of each channel's metadata, and marking metadata stale on request."""

from __future__ import annotations

from dataclasses import dataclass

from condaproxy.cache.catalog.db import CatalogDB
from condaproxy.conda.paths import Kind

_MUTABLE = tuple(k.value for k in Kind if not k.immutable)


@dataclass(frozen=True, slots=True)
class ChannelSummary:
    """One channel's rows: how many, their bytes (shared blobs counted per row) and hits."""

    channel: str
    units: int
    bytes: int
    hits: int


@dataclass(frozen=True, slots=True)
class MetadataRow:
    """A cached repodata variant, shard index or other file that changes upstream."""

    channel: str
    subdir: str
    filename: str
    kind: str
    size: int
    etag: str | None
    fetched_at: float
    validated_at: float


class SummaryRows(CatalogDB):
    """Summaries over unit rows, and invalidation by channel or subdir."""

    async def channel_summaries(self) -> list[ChannelSummary]:
        """Units, bytes and hits per channel, in name order."""
        rows = await self._read(
            """SELECT channel, COUNT(*) AS units, COALESCE(SUM(size), 0) AS bytes,
                      COALESCE(SUM(hits), 0) AS hits
               FROM units GROUP BY channel ORDER BY channel"""
        )
        return [ChannelSummary(r["channel"], r["units"], r["bytes"], r["hits"]) for r in rows]

    async def metadata_rows(self, limit: int = 2000) -> list[MetadataRow]:
        """Cached files that change upstream (repodata variants, shard indexes...), by channel and subdir."""
        marks = ",".join("?" * len(_MUTABLE))
        rows = await self._read(
            f"""SELECT channel, subdir, filename, kind, size, etag, fetched_at, validated_at
                FROM units WHERE kind IN ({marks}) ORDER BY channel, subdir, filename LIMIT ?""",
            (*_MUTABLE, limit),
        )
        return [
            MetadataRow(
                r["channel"],
                r["subdir"],
                r["filename"],
                r["kind"],
                r["size"],
                r["etag"],
                r["fetched_at"],
                r["validated_at"],
            )
            for r in rows
        ]

    async def ping(self) -> None:
        """A trivial query: raises if the catalog does not answer."""
        await self._read("SELECT 1")

    async def unit_count(self) -> int:
        """Complete units in the catalog."""
        rows = await self._read("SELECT COUNT(*) AS n FROM units")
        return int(rows[0]["n"])

    async def invalidate(self, channel: str, subdir: str | None = None) -> int:
        """Make a channel's (or one subdir's) repodata and other mutable files due for revalidation now.

        Returns how many rows were marked. Packages and shards never change, so they are untouched.
        """
        marks = ",".join("?" * len(_MUTABLE))
        where = "channel=?" + (" AND subdir=?" if subdir is not None else "")
        params = (channel, *(() if subdir is None else (subdir,)), *_MUTABLE)
        try:
            async with self.transaction() as tx:
                rows = await tx.execute(
                    f"UPDATE units SET validated_at=0 WHERE {where} AND kind IN ({marks}) RETURNING filename",
                    params,
                )
        finally:
            # After the write: a look-up racing it must not leave the old row cached.
            for key in [k for k in self._rows if k.channel == channel and subdir in (None, k.subdir)]:
                if not key.kind.immutable:
                    del self._rows[key]
        return len(rows)
