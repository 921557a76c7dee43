"""What the proxy learned from channel metadata: package digests and foreign shard/package bases."""

from __future__ import annotations

from condaproxy.cache.catalog.db import CatalogDB


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
