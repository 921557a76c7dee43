"""The download task: where a unit comes from, and what happens once its bytes are in.

One task per unit, started through the lock table and owned by it, never by a request. It
finds the unit (alternate source, derivation, upstream and its mirrors, a base the metadata
named), has the body received (transfer.py), then persists and learns from it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from cachetools import TTLCache

from condaproxy.cache import altsource, learning
from condaproxy.cache.adopt import Adopter
from condaproxy.cache.backlog import Deferred
from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.cpu import CpuPool
from condaproxy.cache.derive import Deriver, derivation_sources
from condaproxy.cache.freshness import Verdict, verdict
from condaproxy.cache.inflight import Download, Head, InflightTable
from condaproxy.cache.integrity import ExpectedLookup
from condaproxy.cache.persist import PersistQueue
from condaproxy.cache.refusals import Refusals
from condaproxy.cache.transfer import Receiver
from condaproxy.cache.unit import Unit
from condaproxy.conda import variants
from condaproxy.conda.paths import SHARD_INDEX_NAME, Kind, UnitKey
from condaproxy.config.model import ChannelConfig, Config
from condaproxy.errors import (
    CondaproxyError,
    IntegrityError,
    Overloaded,
    RefusedDocument,
    UpstreamError,
    UpstreamNotFound,
    UpstreamUnavailable,
)
from condaproxy.metrics import Metrics
from condaproxy.upstream.client import Upstream, Validators
from condaproxy.upstream.headers import passthrough_headers
from condaproxy.upstream.mirrors import elsewhere

log = logging.getLogger(__name__)

# Fetched through the upstream pool package downloads never occupy: every solve waits on these.
METADATA_KINDS = frozenset({Kind.REPODATA, Kind.SHARD_INDEX, Kind.SHARD})


class Fetcher:
    """Starts and runs downloads; the only code that talks to upstreams for units."""

    def __init__(
        self,
        *,
        config: Config,
        catalog: Catalog,
        upstream: Upstream,
        persist: PersistQueue,
        inflight: InflightTable,
        metrics: Metrics,
        cpu: CpuPool,
        refusals: Refusals,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.upstream = upstream
        self.persist = persist
        self.inflight = inflight
        self.metrics = metrics
        self.cpu = cpu
        self.refusals = refusals
        self.expected: ExpectedLookup | None = None  # set by the app (expected.DigestResolver)
        self.deriver: Deriver | None = None  # set by the app
        # Set by the app: makes policy and view documents (False: not one of those names).
        self.filtered: Callable[[Download, ChannelConfig, Unit | None], Awaitable[bool]] | None = None
        # Told of every fetch started (with whether a cached copy existed) and every failure.
        self.on_start: Callable[[UnitKey, bool], None] | None = None
        self.on_failure: Callable[[UnitKey, CondaproxyError], None] | None = None
        self.adopter: Adopter | None = None  # set by the app when the store is shared
        self._receiver = Receiver(catalog, metrics, self._failed, cpu, refusals)
        # Upstream 404s are remembered briefly, never for long (the file may appear soon).
        self.not_found: TTLCache[UnitKey, UpstreamNotFound] = TTLCache(
            maxsize=65536, ttl=max(config.cache.negative_ttl, 0.001)
        )
        # A URL that served bytes not matching the channel's metadata (or a document refused
        # unread) is not retried at once.
        self.cooldown: TTLCache[UnitKey, IntegrityError | RefusedDocument] = TTLCache(
            maxsize=4096, ttl=max(config.cache.integrity_cooldown, 0.001)
        )

    def start(
        self,
        key: UnitKey,
        channel: ChannelConfig,
        cached: Unit | None,
        *,
        derive: bool = True,
        client: str | None = None,
        adopt: bool = True,
    ) -> Download:
        """Start the one download of key (the caller checked none is in flight).

        derive=False: never make a missing variant from a sibling (used for derivation sources).
        client: the address of the client asking, whose derivations are bounded.
        adopt=False: never take it from the shared store (which just failed to serve it).
        """
        derivable = derive and bool(derivation_sources(key))
        if (err := self.not_found.get(key)) is not None and cached is None and not derivable:
            raise err
        if (bad := self.cooldown.get(key)) is not None:
            raise bad
        self.metrics.upstream_fetches.labels(key.kind.value).inc()
        if self.on_start is not None:
            self.on_start(key, cached is not None)
        return self.inflight.start(key, lambda dl: self._run(dl, channel, cached, derivable, client, adopt))

    async def probe(self, key: UnitKey, channel: ChannelConfig) -> Head:
        """What a GET of a package or shard would start with, without downloading it.

        The channel's metadata when it gives the size (no upstream request at all), else an
        upstream HEAD. Raises what the GET would meet: a remembered 404, an integrity cooldown.
        """
        if (err := self.not_found.get(key)) is not None:
            raise err
        if (bad := self.cooldown.get(key)) is not None:
            raise bad
        if key.kind is Kind.PACKAGE:
            known = await self.catalog.expected(key.channel, key.subdir, key.filename)
            if known is not None and known[1] is not None:
                return Head({}, known[1])
        try:
            resp, _, _ = await self._open(channel, key, await self._url(channel, key), None, method="HEAD")
        except UpstreamNotFound as exc:
            self.not_found[key] = exc
            raise
        try:
            return Head(passthrough_headers(resp.headers), resp.content_length)
        finally:
            resp.release()

    async def ensure(self, key: UnitKey, channel: ChannelConfig, *, derive: bool = True) -> Unit | None:
        """The unit, complete in the store and fresh, fetching it if need be; None if unavailable."""
        unit, _ = await self.obtain(key, channel, derive=derive)
        return unit

    async def obtain(
        self, key: UnitKey, channel: ChannelConfig, *, derive: bool = True
    ) -> tuple[Unit | None, CondaproxyError | None]:
        """(the unit as the catalog has it, why fetching it failed): ensure() with the reason.

        A download in flight is waited for to its very end (persisted and learned from),
        even when the catalog already shows its row. A failed fetch may leave a stale unit.
        """
        dl = self.inflight.get(key)
        if dl is None:
            unit = await self.catalog.get(key)
            if verdict(unit, time.time(), self.config) is Verdict.HIT:
                return unit, None
            dl = self.inflight.get(key)
            if dl is None:
                try:
                    dl = self.start(key, channel, unit, derive=derive)
                except CondaproxyError as exc:
                    return unit, exc
        assert dl.task is not None
        # Shielded: a caller giving up must not cancel a download others may share.
        await asyncio.shield(dl.task)
        unit = await self.catalog.get(key)
        if dl.error is None and unit is None:
            return None, UpstreamUnavailable(f"{key.filename} vanished from the cache")
        return unit, dl.error

    async def learn_from(self, unit: Unit, path: Path) -> None:
        """Record the package digests that a repodata file or shard at path (unit's bytes) states."""
        await self._learn(unit, path)

    async def _run(
        self,
        dl: Download,
        channel: ChannelConfig,
        cached: Unit | None,
        derive: bool,
        client: str | None,
        adopt: bool = True,
    ) -> None:
        key = dl.key
        if key.kind is Kind.PACKAGE and await altsource.serve(dl, channel, self.expected, self.persist):
            return  # a verified copy from the channel's alternate source: no upstream fetch
        if variants.is_internal(key.filename):
            # A content-coded representation exists only here: always derived, never fetched.
            if self.filtered is not None and await self.filtered(dl, channel, cached):
                return  # a policy or view document
            await self._derive(dl, channel, cached, UpstreamNotFound("no such representation"), client)
            return
        url = await self._url(channel, key)
        if (
            adopt
            and cached is None
            and self.adopter is not None
            and await self.adopter.adopt(dl, channel, url)
        ):
            return  # another node stored it in the shared bucket: no upstream fetch
        validators = Validators(cached.etag, cached.last_modified) if cached else None
        try:
            if (missing := self.not_found.get(key)) is not None:
                raise missing  # known missing upstream: go straight to deriving it
            # url: redacted, as served; foreign: from an origin the channel's metadata named
            resp, url, foreign = await self._open(channel, key, url, validators)
        except UpstreamNotFound as exc:
            if derive:
                await self._derive(dl, channel, cached, exc, client)
            else:
                self._failed(dl, exc)
            return
        except UpstreamError as exc:
            self._failed(dl, exc)
            return
        try:
            if resp.status == 304 and cached is not None:
                headers = passthrough_headers(resp.headers)
                if await self.catalog.revalidated(cached, headers, time.time()) is not None:
                    dl.not_modified()
                    return
                # The cached copy went away meanwhile (evicted, replaced): fetch it whole.
                resp.release()
                resp, url, _ = await self._open(channel, key, url, None)  # the same place as before
            if resp.status == 304:
                self._failed(dl, UpstreamUnavailable("upstream answered 304 to an unconditional GET"))
                return
            unit = await self._receiver.receive(dl, resp, channel, url, self.expected, whole=foreign)
            if unit is not None:
                await self._keep(unit, dl, cached)
        except CondaproxyError as exc:
            self._failed(dl, exc)
        finally:
            resp.release()

    async def _keep(self, unit: Unit, dl: Download, cached: Unit | None) -> None:
        """Keep a verified download's variant group in step, persist it and learn from it."""
        key = unit.key
        if key.kind is Kind.REPODATA and (cached is None or cached.blob_key != unit.blob_key):
            # New content, and its clients have it already: from now on, cached siblings (.zst
            # beside .json) must not be served as fresh, not only once this one is stored.
            await self.catalog.expire(key.channel, key.subdir, variants.siblings(key.filename))
        try:
            await self.persist.persist(unit, dl.temp_path)
        except Deferred:
            pass  # the backlog stores it once the store is back; learn from the bytes now
        except Exception:
            return  # counted and logged by the persist queue; the client already has its bytes
        if key.kind in (Kind.REPODATA, Kind.SHARD):
            await self._learn(unit, dl.temp_path)

    async def _open(
        self,
        channel: ChannelConfig,
        key: UnitKey,
        url: str,
        validators: Validators | None,
        *,
        method: str = "GET",
    ) -> tuple[aiohttp.ClientResponse, str, bool]:
        """upstream.open(url); a package missing there is looked for where its metadata says.

        Also says whether the bytes come from another origin the channel's metadata named.
        """
        metadata = key.kind in METADATA_KINDS
        try:
            resp, served = await self.upstream.open(
                channel, url, validators, method=method, metadata=metadata
            )
            return resp, served, elsewhere(channel, url)
        except UpstreamNotFound:
            if key.kind is Kind.SHARD:
                # A client may hold an index the proxy no longer caches, and so no longer knows the
                # host it names (learned bases go with a subdir's metadata): reading it records it.
                index = UnitKey(key.channel, key.subdir, SHARD_INDEX_NAME, Kind.SHARD_INDEX)
                await self.ensure(index, channel)
            elif key.kind is not Kind.PACKAGE or self.expected is None:
                raise
            else:
                # On a cold cache (a lockfile install) the subdir's repodata may not be read yet,
                # and it may name another base for packages (CEP-15): reading it records that base.
                await self.expected(key, channel)
            moved = await self._url(channel, key)
            if moved == url:
                raise
            resp, served = await self.upstream.open(
                channel, moved, validators, method=method, metadata=metadata
            )
            return resp, served, elsewhere(channel, moved)

    async def _url(self, channel: ChannelConfig, key: UnitKey) -> str:
        """Where a unit lives: its path on the channel's mirrors, or a URL its metadata named."""
        if key.kind is Kind.PACKAGE and (base := await self.catalog.package_base(key.channel, key.subdir)):
            return base + key.filename  # CEP-15 info.base_url
        if key.kind is Kind.SHARD:
            base = await self.catalog.shard_base(key.channel, key.subdir)
            if base is not None:
                return base + key.filename.removeprefix("shards/")
        return key.path

    async def _derive(
        self,
        dl: Download,
        channel: ChannelConfig,
        cached: Unit | None,
        missing: UpstreamNotFound,
        client: str | None,
    ) -> None:
        """Make a variant upstream lacks from a sibling it has; else fail with missing, or 5xx.

        404 only when every source is missing upstream too: a source that failed otherwise
        (5xx, timeout) makes it a 502/504, which clients do not remember for days.
        """
        try:
            failure = (
                await self.deriver.derive(dl, channel, cached, client)
                if self.deriver is not None
                else missing
            )
        except Overloaded as exc:  # too much CPU work already: 503, try again shortly (counted)
            log.warning("not deriving %s now: %s", dl.key, exc)
            dl.fail(exc)
            return
        if isinstance(failure, UpstreamNotFound):
            self._failed(dl, missing)
        elif failure is not None:
            if failure.status < 500:  # a source's 401/403...: any 4xx here is remembered for days
                failure = UpstreamUnavailable(f"cannot make {dl.key.filename}: {failure}")
            self._failed(dl, failure)

    def _failed(self, dl: Download, exc: CondaproxyError) -> None:
        if isinstance(exc, UpstreamNotFound):
            self.not_found[dl.key] = exc
        elif isinstance(exc, IntegrityError):
            self.cooldown[dl.key] = exc
            self.metrics.integrity_failures.inc()
        elif isinstance(exc, RefusedDocument):
            self.cooldown[dl.key] = exc
        self.metrics.upstream_failures.labels(type(exc).__name__).inc()
        log.warning("fetch of %s failed: %s", dl.key, exc)
        if self.on_failure is not None:
            self.on_failure(dl.key, exc)
        dl.fail(exc)

    async def _learn(self, unit: Unit, path: Path) -> None:
        key = unit.key
        if (reason := await self.refusals.known(unit)) is not None:
            log.info("not learning from %s: its document was refused before (%s)", key, reason)
            return
        try:
            count = await self.cpu.run(
                learning.learn,
                self.catalog.path,
                key.channel,
                key.subdir,
                key.filename,
                path,
                self.catalog.clock(),
            )
        except RefusedDocument as exc:  # past a bound: refused once, never read again
            await self.refusals.record(unit.sha256, key, exc)
            return
        except Exception as exc:  # a malformed file must not take the proxy down
            log.warning("could not learn digests from %s: %s", key, exc)
            return
        log.debug("learned %d digests from %s", count, key)
