"""CEP-16 shards built from repodata for a channel whose upstream has none.

Run as the derivation of `repodata_shards.msgpack.zst` (derive.py): once per revision of
the repodata however many clients ask, off the event loop, in bounded memory
(conda/building.py). Each shard is stored under its own sha256 before the index is
published; a package whose records did not change keeps its shard, already stored.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.cpu import CpuPool
from condaproxy.cache.inflight import Download
from condaproxy.cache.persist import PersistQueue
from condaproxy.cache.shardstore import keep_shard, shard_key
from condaproxy.cache.unit import Unit
from condaproxy.conda.building import Built, build_shards
from condaproxy.conda.decoding import open_decoded

log = logging.getLogger(__name__)

# The repodata a shard index is built from, best first (cheapest to decode).
SHARD_SOURCES = ("repodata.json.zst", "repodata.json", "repodata.json.bz2")


def _build(src: Path, src_name: str, work: Path, index: Path, subdir: str) -> list[Built]:
    work.mkdir(parents=True, exist_ok=True)
    with open_decoded(src, src_name) as reader:
        data, shards = build_shards(reader, work, subdir)
    index.write_bytes(data)
    return shards


class ShardBuilder:
    """Builds a subdir's shard index into a download's temp file, storing its shards first."""

    def __init__(self, catalog: Catalog, persist: PersistQueue, cpu: CpuPool) -> None:
        self._catalog = catalog
        self._persist = persist
        self._cpu = cpu

    async def build(self, dl: Download, source: Unit, path: Path) -> None:
        """Write the index built from source (its blob at path) to dl.temp_path; shards stored."""
        key = dl.key
        work = dl.temp_path.with_name(f"{dl.temp_path.name}.shards")
        loop = asyncio.get_running_loop()
        try:
            shards = await self._cpu.run(
                _build, path, source.key.filename, work, dl.temp_path, key.subdir, refuse=True
            )
            for shard in shards:
                await keep_shard(
                    self._catalog,
                    self._persist,
                    shard_key(key.channel, key.subdir, shard.sha256),
                    shard.path,
                    shard.size,
                    source.upstream_url,
                    source.blob_key,
                )
            log.info("built %d shards of %s from %s", len(shards), key, source.key.filename)
        finally:
            await asyncio.shield(loop.run_in_executor(None, lambda: shutil.rmtree(work, ignore_errors=True)))
