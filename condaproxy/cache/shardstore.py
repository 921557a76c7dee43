"""Shards the proxy makes itself (filtered by a policy, or built from repodata), stored as units.

A made shard is named by its own sha256, like any CEP-16 shard, and stored before any index
that points at it is: a client holding that index finds every shard it names.
"""

from __future__ import annotations

import time
from pathlib import Path

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.persist import PersistQueue
from condaproxy.cache.unit import Unit
from condaproxy.conda.paths import Kind, UnitKey

SHARD_HEADERS = {"Content-Type": "application/octet-stream"}


def shard_key(channel: str, subdir: str, sha256: str) -> UnitKey:
    """The unit of the shard of this digest."""
    return UnitKey(channel, subdir, f"shards/{sha256}.msgpack.zst", Kind.SHARD)


async def keep_shard(
    catalog: Catalog,
    persist: PersistQueue,
    key: UnitKey,
    path: Path,
    size: int,
    upstream_url: str,
    source: str,
) -> None:
    """Store a made shard (the file at path, its sha256 in key) unless the store has it already."""
    if await catalog.get(key) is not None:
        return  # same bytes, same name: an unchanged package keeps its shard
    sha = key.filename.removeprefix("shards/").removesuffix(".msgpack.zst")
    wall = time.time()
    unit = Unit(key, upstream_url, sha, sha, size, dict(SHARD_HEADERS), None, None, wall, wall, source=source)
    await persist.persist(unit, path)
