"""Derived units: a repodata variant upstream lacks, made from one it has, kept in step.

Also the CEP-16 shard index (and its shards) of a channel whose upstream has none, built
from its repodata (built.py).

A derivation runs as the body of an ordinary download (same lock table entry, same readers,
same persist step), so it happens once however many clients ask. A derived unit records the
blob it was made from; when that source changes, the derived unit is made again.

Deriving costs CPU for seconds (bz2 at level 9 of conda-forge's repodata: half a minute), so
each client may have only a few derivations running, and a derivation that finds the CPU pool's
queue full is refused (Overloaded: 503) rather than queued. Transcoding streams: its cost is
linear in the decoded size, which is bounded (conda.decoding), however the document nests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from condaproxy.cache.built import SHARD_SOURCES, ShardBuilder
from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.cpu import CpuPool
from condaproxy.cache.inflight import Download, Head
from condaproxy.cache.persist import PersistQueue
from condaproxy.cache.shardstore import SHARD_HEADERS
from condaproxy.cache.unit import Unit
from condaproxy.conda import variants
from condaproxy.conda.paths import SHARD_INDEX_NAME, Kind, UnitKey
from condaproxy.config.model import ChannelConfig
from condaproxy.errors import CondaproxyError, Overloaded, UpstreamNotFound
from condaproxy.metrics import Metrics
from condaproxy.store.files import hash_file

log = logging.getLogger(__name__)

BlobFile = Callable[[Unit], AbstractAsyncContextManager[Path]]
# (the unit complete and fresh, fetched if need be but never itself derived; why fetching failed).
Obtain = Callable[[UnitKey, ChannelConfig], Awaitable[tuple[Unit | None, CondaproxyError | None]]]


def _derived(unit: Unit) -> bool:
    """A unit derived from a sibling, which is never itself a source (it may outlive its own).

    A copy rewritten from upstream's bytes (a CEP-15 base_url made "") records a source too,
    but keeps the upstream's validators: it is the upstream document, and a sound source. (One
    from an upstream sending neither ETag nor Last-Modified looks derived, and is passed over.)
    """
    return unit.source is not None and unit.etag is None and unit.last_modified is None


def derivation_sources(key: UnitKey) -> list[str]:
    """What key may be made from, best first: a sibling variant, or for a shard index the repodata."""
    if key.kind is Kind.SHARD_INDEX:
        return list(SHARD_SOURCES)
    return variants.sources(key.filename)


def content_type(filename: str) -> str:
    """The Content-Type of a made unit."""
    return SHARD_HEADERS["Content-Type"] if filename == SHARD_INDEX_NAME else variants.content_type(filename)


class Deriver:
    """Makes a missing variant from the best sibling upstream has."""

    def __init__(
        self,
        obtain: Obtain,
        catalog: Catalog,
        persist: PersistQueue,
        blob_file: BlobFile,
        *,
        cpu: CpuPool,
        per_client: int,
        metrics: Metrics,
    ) -> None:
        self._obtain = obtain
        self._catalog = catalog
        self._persist = persist
        self._blob_file = blob_file
        self._cpu = cpu
        self._per_client = per_client
        self._metrics = metrics
        self._built = ShardBuilder(catalog, persist, cpu)
        self.deriving: set[UnitKey] = set()
        self._by_client: Counter[str] = Counter()  # derivations running, by the address that asked

    async def derive(
        self, dl: Download, channel: ChannelConfig, cached: Unit | None, client: str | None = None
    ) -> CondaproxyError | None:
        """Fill dl from a sibling variant; else why not (UpstreamNotFound: no sibling upstream).

        Overloaded when client already has per_client derivations running, or the CPU pool is full.
        """
        if client is not None and self._by_client[client] >= self._per_client:
            self._metrics.overloaded.labels("client").inc()
            raise Overloaded(f"{self._per_client} derivations from this client are running already")
        self.deriving.add(dl.key)
        if client is not None:
            self._by_client[client] += 1
        try:
            return await self._derive(dl, channel, cached)
        finally:
            self.deriving.discard(dl.key)
            if client is not None:
                self._by_client[client] -= 1
                if not self._by_client[client]:
                    del self._by_client[client]

    async def _derive(
        self, dl: Download, channel: ChannelConfig, cached: Unit | None
    ) -> CondaproxyError | None:
        key = dl.key
        trouble: CondaproxyError | None = None  # the first source that failed other than by a 404
        for name in derivation_sources(key):
            src_key = UnitKey(key.channel, key.subdir, name, Kind.REPODATA)
            if src_key in self.deriving:
                continue  # never wait on another derivation: two missing variants would deadlock
            source, error = await self._obtain(src_key, channel)
            if source is None or _derived(source):
                # Nothing to derive from. Only a 404 says the source is missing upstream; after
                # any other failure (5xx, timeout) that is unknown, so the answer is no 404.
                if error is not None and not isinstance(error, UpstreamNotFound):
                    trouble = trouble or error
                continue
            now = time.time()
            # Still made from the current source: as good as a 304.
            in_step = cached is not None and cached.source == source.blob_key
            if in_step and cached and await self._catalog.revalidated(cached, {}, now) is not None:
                dl.not_modified()
                return None
            loop = asyncio.get_running_loop()
            try:
                async with self._blob_file(source) as path:
                    if key.kind is Kind.SHARD_INDEX:
                        await self._built.build(dl, source, path)
                    else:
                        await self._cpu.run(
                            variants.transcode, path, name, dl.temp_path, key.filename, refuse=True
                        )
                size, sha = await self._cpu.run(hash_file, dl.temp_path)
            except Overloaded:
                self._metrics.overloaded.labels("pool").inc()
                raise
            except Exception as exc:  # an undecodable (or bomb) source: try the next, never crash
                log.warning("cannot derive %s from %s: %s", key, name, exc)
                await loop.run_in_executor(None, lambda: dl.temp_path.unlink(missing_ok=True))
                continue
            headers = {"Content-Type": content_type(key.filename), "ETag": f'"{sha[:32]}"'}
            if "Last-Modified" in source.headers:
                headers["Last-Modified"] = source.headers["Last-Modified"]
            dl.start_body(Head(headers, size))
            dl.finish(size, sha)
            unit = Unit(
                key,
                source.upstream_url,
                sha,
                sha,
                size,
                headers,
                None,
                None,
                now,
                now,
                source=source.blob_key,
            )
            log.info("derived %s from %s", key, name)
            # A failed persist is counted and logged by the queue; readers already have the bytes.
            with contextlib.suppress(Exception):
                await self._persist.persist(unit, dl.temp_path)
            return None
        return trouble or UpstreamNotFound(f"no variant of {key.filename} upstream")
