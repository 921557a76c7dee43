"""What the proxy learned from channel metadata: package digests and foreign shard/package bases.

Digests are kept only while some metadata of their subdir is cached (db.HAS_METADATA): they go
in the same transaction as the subdir's last repodata, shard index or shard, so that max_size
bounds them as it bounds the units they came from. A base mapping (one row per subdir) is
recorded before the document naming it is stored, as its readers need it at once; dropped by
an eviction in between, it would be gone for good while that document is served. So bases of
subdirs without metadata go at the next start instead, with no download in flight.
"""

from __future__ import annotations

from collections.abc import Iterable

from condaproxy.cache.catalog.db import HAS_METADATA, LEARNED_TABLES, METADATA_KINDS, CatalogDB, Tx


async def forget_subdirs(tx: Tx, subdirs: Iterable[tuple[str, str]]) -> bool:
    """Inside a transaction that removed metadata units: drop the digests learned for each subdir
    now left without any; True if some went."""
    forgot = False
    for channel, subdir in set(subdirs):
        if not await tx.execute(HAS_METADATA, (channel, subdir)):
            deleted = await tx.count("DELETE FROM digests WHERE channel=? AND subdir=?", (channel, subdir))
            forgot |= bool(deleted)
            # The ledger too: read again later, the subdir's records then count as already there.
            for table in ("ledger", "ledger_subdirs"):
                forgot |= bool(
                    await tx.count(f"DELETE FROM {table} WHERE channel=? AND subdir=?", (channel, subdir))
                )
    return forgot


class LearnedRows(CatalogDB):
    """Digests learned from repodata and shards, and the upstream bases an index or repodata names."""

    async def expected(self, channel: str, subdir: str, filename: str) -> tuple[str, int | None] | None:
        """The sha256 and size the channel's own metadata gives for a package, if learned."""
        rows = await self._read(
            "SELECT sha256, size FROM digests WHERE channel=? AND subdir=? AND filename=?",
            (channel, subdir, filename),
        )
        return (rows[0]["sha256"], rows[0]["size"]) if rows else None

    async def set_shard_base(self, channel: str, subdir: str, base_url: str | None) -> None:
        """Remember (or forget) the absolute shards_base_url an upstream index names."""
        await self._set_base("shard_bases", channel, subdir, base_url)

    async def shard_base(self, channel: str, subdir: str) -> str | None:
        """The upstream base URL of a subdir's shards, when its index names an absolute one."""
        return await self._base("shard_bases", channel, subdir)

    async def set_package_base(self, channel: str, subdir: str, base_url: str | None) -> None:
        """Remember (or forget) the absolute CEP-15 info.base_url a subdir's repodata names."""
        await self._set_base("package_bases", channel, subdir, base_url)

    async def package_base(self, channel: str, subdir: str) -> str | None:
        """The upstream base URL of a subdir's packages, when its repodata names a foreign one."""
        return await self._base("package_bases", channel, subdir)

    async def learned_private(self) -> set[str]:
        """Channels learned to be private (their upstream refused us without a client's token)."""
        return {row["channel"] for row in await self._read("SELECT channel FROM private_channels", ())}

    async def set_learned_private(self, channel: str, since: float) -> None:
        """Remember that a channel is private, across restarts."""
        async with self.transaction() as tx:
            await tx.execute(
                "INSERT OR IGNORE INTO private_channels (channel, since) VALUES (?, ?)", (channel, since)
            )

    async def forget_unowned(self) -> bool:
        """Drop digests and bases learned for subdirs with no metadata cached; True if some went.

        Run at start: bases stay through a run, and an older catalog kept everything it learned.
        """
        kinds = ", ".join(repr(k) for k in METADATA_KINDS)
        forgot = False
        async with self.transaction() as tx:
            for table in (*LEARNED_TABLES, "ledger", "ledger_subdirs"):
                forgot |= bool(
                    await tx.count(
                        f"""DELETE FROM {table} WHERE (channel, subdir) IN (
                               SELECT DISTINCT channel, subdir FROM {table}
                               EXCEPT SELECT channel, subdir FROM units WHERE kind IN ({kinds})
                               AND filename NOT LIKE '%@rev-%')"""
                    )
                )
        return forgot

    async def _set_base(self, table: str, channel: str, subdir: str, base_url: str | None) -> None:
        if await self._base(table, channel, subdir) == base_url:
            return  # the usual case (no mapping, none wanted): no write, no lock to wait for
        async with self.transaction() as tx:
            if base_url is None:
                await tx.execute(f"DELETE FROM {table} WHERE channel=? AND subdir=?", (channel, subdir))
            else:
                row = (channel, subdir, base_url)
                await tx.execute(f"INSERT OR REPLACE INTO {table} VALUES (?, ?, ?)", row)

    async def _base(self, table: str, channel: str, subdir: str) -> str | None:
        where = (channel, subdir)
        rows = await self._read(f"SELECT base_url FROM {table} WHERE channel=? AND subdir=?", where)
        return str(rows[0]["base_url"]) if rows else None
