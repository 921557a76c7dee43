"""Adoption: on a shared store, a unit another node already stored is taken over, not fetched again.

Each node keeps its own catalog, a local index of what the shared bucket holds. On a local miss
for a package or shard whose sha256 is known (from the channel's repodata or shards, or from
the shard's own name), the node first asks the bucket for the object; when it is there with
the right size, it is complete (objects exist only whole and verified: DESIGN rule 9), so the
node records a row for it and serves it. Only when it is absent does the node go upstream.
Repodata and the shard index are never adopted: they change, and each node revalidates them.
"""

from __future__ import annotations

import logging
import time

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.inflight import Download
from condaproxy.cache.integrity import Expected, ExpectedLookup
from condaproxy.cache.unit import Unit
from condaproxy.conda.paths import Kind, UnitKey
from condaproxy.config.model import ChannelConfig
from condaproxy.errors import CondaproxyError, StoreError
from condaproxy.metrics import Metrics
from condaproxy.store.blobstore import BlobStore

log = logging.getLogger(__name__)


def shard_digest(key: UnitKey) -> str | None:
    """The sha256 a shard's name states (CEP-16: shards/<sha256>.msgpack.zst)."""
    if key.kind is not Kind.SHARD:
        return None
    return key.filename.removeprefix("shards/").removesuffix(".msgpack.zst")


class Adopter:
    """Finds units in the shared store before the upstream is asked; wired by the app."""

    def __init__(
        self, catalog: Catalog, store: BlobStore, metrics: Metrics, expected: ExpectedLookup | None
    ) -> None:
        self._catalog = catalog
        self._store = store
        self._metrics = metrics
        self._expected = expected

    async def _wanted(self, key: UnitKey, channel: ChannelConfig) -> Expected | None:
        if (digest := shard_digest(key)) is not None:
            return digest, None
        known = await self._catalog.expected(key.channel, key.subdir, key.filename)
        if known is not None or self._expected is None:
            return known
        try:
            # A node that has not read this subdir's metadata yet learns it (fetched or adopted).
            return await self._expected(key, channel)
        except CondaproxyError as exc:
            log.info("%s: no digest to look for in the shared store (%s)", key, exc)
            return None

    async def adopt(self, dl: Download, channel: ChannelConfig, url: str) -> bool:
        """Make dl's unit complete from the shared store if it is there; False to go upstream."""
        key = dl.key
        if not self._store.shared or key.kind not in (Kind.PACKAGE, Kind.SHARD):
            return False
        wanted = await self._wanted(key, channel)
        if wanted is None:
            return False
        sha, size = wanted
        try:
            stored = await self._store.size(sha)
        except StoreError as exc:
            self._metrics.store_read_failures.inc()
            log.warning("%s: shared store not reachable (%s); fetching upstream", key, exc)
            return False
        if stored is None:
            return False
        if size is not None and stored != size:
            log.warning(
                "%s: the shared store holds %d bytes, the channel says %d; fetching upstream",
                key,
                stored,
                size,
            )
            return False
        now = time.time()
        etag = f'"{sha}"'
        headers = {"Content-Type": "application/octet-stream", "ETag": etag}
        unit = Unit(key, url, sha, sha, stored, headers, etag, None, now, now)
        await self._catalog.complete(unit)
        self._metrics.adopted.labels(key.kind.value).inc()
        log.info("%s: adopted from the shared store", key)
        dl.adopted = True
        dl.not_modified()  # readers serve the row just made, from the store
        return True
