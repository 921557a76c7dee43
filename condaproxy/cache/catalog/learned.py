"""What the proxy learned from channel metadata: package digests and foreign shard/package bases."""

from __future__ import annotations

from condaproxy.cache.catalog.db import CatalogDB


class LearnedRows(CatalogDB):
    """Digests learned from repodata and shards, and the upstream bases an index or repodata names."""

    async def expected(self, channel: str, subdir: str, filename: str) -> tuple[str, int | None] | None:
        """The sha256 and size the channel's own metadata gives for a package, if learned."""
        rows = await self._execute(
            "SELECT sha256, size FROM digests WHERE channel=? AND subdir=? AND filename=?",
            (channel, subdir, filename),
        )
        return (rows[0]["sha256"], rows[0]["size"]) if rows else None

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
