"""Where a package's expected sha256/size comes from: the channel's own metadata, never a client.

Digests are learned as repodata and shards pass through the proxy. A package asked for without
its metadata (a lockfile install) is looked up on demand: the subdir's shard index and the one
shard naming the package, else repodata.json(.zst) - fetched through the proxy, so cached too.
"""

from __future__ import annotations

import logging
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.cpu import CpuPool
from condaproxy.cache.download import Fetcher
from condaproxy.cache.unit import Unit
from condaproxy.conda import paths, shards
from condaproxy.conda.paths import SHARD_INDEX_NAME, Kind, UnitKey
from condaproxy.config.model import ChannelConfig
from condaproxy.errors import RefusedDocument
from condaproxy.store.blobstore import BlobStore, local_copy

log = logging.getLogger(__name__)

Expected = tuple[str, int | None]


class DigestResolver:
    """Answers "what sha256 and size does the channel say this package has?"."""

    def __init__(
        self, catalog: Catalog, store: BlobStore, fetcher: Fetcher, temp_dir: Path, cpu: CpuPool
    ) -> None:
        self._catalog = catalog
        self._store = store
        self._fetcher = fetcher
        self._temp_dir = temp_dir
        self._cpu = cpu

    async def __call__(self, key: UnitKey, channel: ChannelConfig) -> Expected | None:
        """The expected digest of a package, learning it from channel metadata if need be."""
        known = await self._catalog.expected(key.channel, key.subdir, key.filename)
        if known is not None:
            return known
        found_index = await self._from_shards(key, channel)
        if not found_index:
            for name in ("repodata.json.zst", "repodata.json"):
                meta_key = UnitKey(key.channel, key.subdir, name, Kind.REPODATA)
                if await self._learned(key, meta_key, channel):
                    break
        return await self._catalog.expected(key.channel, key.subdir, key.filename)

    async def _learned(self, key: UnitKey, meta_key: UnitKey, channel: ChannelConfig) -> bool:
        """Ensure a metadata unit is cached and learned from; False when upstream lacks it."""
        unit = await self._fetcher.ensure(meta_key, channel)
        if unit is None:
            return False
        if await self._catalog.expected(key.channel, key.subdir, key.filename) is None:
            # Cached earlier but never learned from (say, a crash right after persisting).
            async with self.blob_file(unit) as path:
                await self._fetcher.learn_from(unit, path)
        return True

    async def _from_shards(self, key: UnitKey, channel: ChannelConfig) -> bool:
        """Fetch the shard that lists the package; False when the subdir has no shard index."""
        index_key = UnitKey(key.channel, key.subdir, SHARD_INDEX_NAME, Kind.SHARD_INDEX)
        index = await self._fetcher.ensure(index_key, channel)
        if index is None:
            return False
        name = paths.package_name(key.filename)
        refusals = self._fetcher.refusals
        if await refusals.known(index) is not None:
            return False  # its index was refused before: repodata may still say
        try:
            async with self.blob_file(index) as path:
                base, by_name = await self._cpu.run(shards.read_shard_index, path, {name})
        except RefusedDocument as exc:
            await refusals.record(index.sha256, index_key, exc)
            return False
        except Exception as exc:
            log.warning("unreadable shard index %s: %s", index_key, exc)
            return False
        digest = by_name.get(name)
        if digest is None:
            return True  # the channel does not list this package
        if base.rstrip("/") not in ("./shards", "shards"):
            return False  # absolute shard locations: fall back to repodata
        shard_key = UnitKey(key.channel, key.subdir, f"shards/{digest}.msgpack.zst", Kind.SHARD)
        await self._learned(key, shard_key, channel)
        return True

    def blob_file(self, unit: Unit) -> AbstractAsyncContextManager[Path]:
        """A local file with the unit's bytes (the blob itself, or a temporary copy)."""
        return local_copy(self._store, unit.blob_key, unit.size, self._temp_dir)
