"""The download task: upstream -> temp file + sha256 as bytes arrive -> verify -> persist.

One task per unit, started through the lock table and owned by it, never by a request. The
task publishes progress to the Download that every response streams from, holds back the
final byte until the body is verified, and only then lets readers end cleanly.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
from cachetools import TTLCache

from condaproxy import altsource, baseurl, repodata, shards, variants
from condaproxy.catalog import Catalog, Unit
from condaproxy.config import ChannelConfig, Config
from condaproxy.derive import Deriver, hash_file
from condaproxy.errors import (
    CacheDiskError,
    CondaproxyError,
    IntegrityError,
    TruncatedError,
    UpstreamError,
    UpstreamNotFound,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from condaproxy.freshness import Verdict, verdict
from condaproxy.inflight import Download, Head, InflightTable
from condaproxy.metrics import Metrics
from condaproxy.paths import Kind, UnitKey
from condaproxy.persist import PersistQueue
from condaproxy.store import write_all
from condaproxy.upstream import Upstream, Validators, passthrough_headers

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20
ExpectedLookup = Callable[[UnitKey, ChannelConfig], Awaitable[tuple[str, int | None] | None]]


def _write_and_hash(fd: int, chunk: bytes, hasher: hashlib._Hash) -> None:
    # One executor hop per chunk: both the write and the hash release the GIL.
    write_all(fd, chunk)
    hasher.update(chunk)


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
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.upstream = upstream
        self.persist = persist
        self.inflight = inflight
        self.metrics = metrics
        self.expected: ExpectedLookup | None = None  # set by the app (digests.DigestResolver)
        self.deriver: Deriver | None = None  # set by the app
        self.deriving: set[UnitKey] = set()
        # Upstream 404s are remembered briefly, never for long (the file may appear soon).
        self.not_found: TTLCache[UnitKey, UpstreamNotFound] = TTLCache(
            maxsize=65536, ttl=max(config.cache.negative_ttl, 0.001)
        )
        # A URL that served bytes not matching the channel's metadata is not retried at once.
        self.cooldown: TTLCache[UnitKey, IntegrityError] = TTLCache(
            maxsize=4096, ttl=max(config.cache.integrity_cooldown, 0.001)
        )

    def start(
        self, key: UnitKey, channel: ChannelConfig, cached: Unit | None, *, derive: bool = True
    ) -> Download:
        """Start the one download of key (the caller checked none is in flight).

        derive=False: never make a missing variant from a sibling (used for derivation sources).
        """
        derivable = derive and bool(variants.sources(key.filename))
        if (err := self.not_found.get(key)) is not None and cached is None and not derivable:
            raise err
        if (bad := self.cooldown.get(key)) is not None:
            raise bad
        self.metrics.upstream_fetches.labels(key.kind.value).inc()
        return self.inflight.start(key, lambda dl: self._run(dl, channel, cached, derivable))

    async def ensure(self, key: UnitKey, channel: ChannelConfig, *, derive: bool = True) -> Unit | None:
        """The unit, complete in the store and fresh, fetching it if need be; None if unavailable.

        A download in flight is waited for to its very end (persisted and learned from),
        even when the catalog already shows its row.
        """
        dl = self.inflight.get(key)
        if dl is None:
            unit = await self.catalog.get(key)
            if verdict(unit, time.time(), self.config) is Verdict.HIT:
                return unit
            dl = self.inflight.get(key)
            if dl is None:
                try:
                    dl = self.start(key, channel, unit, derive=derive)
                except CondaproxyError:
                    return unit
        assert dl.task is not None
        # Shielded: a caller giving up must not cancel a download others may share.
        await asyncio.shield(dl.task)
        return await self.catalog.get(key)

    async def learn_from(self, key: UnitKey, path: Path) -> None:
        """Record the package digests that a repodata file or shard at path states."""
        await self._learn(key, path)

    async def _run(self, dl: Download, channel: ChannelConfig, cached: Unit | None, derive: bool) -> None:
        key = dl.key
        if key.kind is Kind.PACKAGE and await altsource.serve(dl, channel, self.expected, self.persist):
            return  # a verified copy from the channel's alternate source: no upstream fetch
        if variants.is_internal(key.filename):
            # A content-coded representation exists only here: always derived, never fetched.
            await self._derive(dl, channel, cached, UpstreamNotFound("no such representation"))
            return
        url = await self._url(channel, key)
        validators = Validators(cached.etag, cached.last_modified) if cached else None
        try:
            if (missing := self.not_found.get(key)) is not None:
                raise missing  # known missing upstream: go straight to deriving it
            resp, url = await self._open(channel, key, url, validators)  # url: redacted, as served
        except UpstreamNotFound as exc:
            if derive:
                await self._derive(dl, channel, cached, exc)
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
                resp, url = await self._open(channel, key, url, None)
            if resp.status == 304:
                self._failed(dl, UpstreamUnavailable("upstream answered 304 to an unconditional GET"))
                return
            await self._stream(dl, resp, channel, url, cached)
        except CondaproxyError as exc:
            self._failed(dl, exc)
        finally:
            resp.release()

    async def _open(
        self, channel: ChannelConfig, key: UnitKey, url: str, validators: Validators | None
    ) -> tuple[aiohttp.ClientResponse, str]:
        """upstream.open(url); a package missing there is looked for where its metadata says."""
        try:
            return await self.upstream.open(channel, url, validators)
        except UpstreamNotFound:
            if key.kind is not Kind.PACKAGE or self.expected is None:
                raise
            # On a cold cache (a lockfile install) the subdir's repodata may not be read yet, and
            # it may name another base for packages (CEP-15): reading it records that base.
            await self.expected(key, channel)
            moved = await self._url(channel, key)
            if moved == url:
                raise
            return await self.upstream.open(channel, moved, validators)

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
        self, dl: Download, channel: ChannelConfig, cached: Unit | None, missing: UpstreamNotFound
    ) -> None:
        """Make a variant upstream lacks from a sibling it has; else fail with missing."""
        if self.deriver is not None:
            self.deriving.add(dl.key)
            try:
                if await self.deriver.derive(dl, channel, cached):
                    return
            finally:
                self.deriving.discard(dl.key)
        self._failed(dl, missing)

    def _failed(self, dl: Download, exc: CondaproxyError) -> None:
        if isinstance(exc, UpstreamNotFound):
            self.not_found[dl.key] = exc
        elif isinstance(exc, IntegrityError):
            self.cooldown[dl.key] = exc
            self.metrics.integrity_failures.inc()
        self.metrics.upstream_failures.labels(type(exc).__name__).inc()
        log.warning("fetch of %s failed: %s", dl.key, exc)
        dl.fail(exc)

    async def _stream(
        self,
        dl: Download,
        resp: aiohttp.ClientResponse,
        channel: ChannelConfig,
        url: str,
        cached: Unit | None,
    ) -> None:
        key = dl.key
        # A shard index may need rewriting before clients see it: small, so fetched whole first.
        buffered = key.kind is Kind.SHARD_INDEX
        body_path = dl.temp_path.with_name(dl.temp_path.name + ".raw") if buffered else dl.temp_path
        length = resp.content_length
        headers = passthrough_headers(resp.headers)
        head = Head(headers, length)
        # Repodata is held back until its head shows whether it names a foreign base (CEP-15).
        hold = baseurl.Holdback.of(key, channel, headers, self.catalog)
        buffered = buffered or hold is not None
        lookup: asyncio.Future[tuple[str, int | None] | None] | None = None
        want_size: int | None = None
        if key.kind is Kind.PACKAGE and self.expected is not None:
            known = await self.catalog.expected(key.channel, key.subdir, key.filename)
            if known is not None:
                lookup = asyncio.get_running_loop().create_future()
                lookup.set_result(known)
                want_size = known[1]
                if known[1] is not None and length is not None and known[1] != length:
                    # Known wrong before any byte went out: a clean 502, not a cut-off stream.
                    raise IntegrityError(f"{key}: upstream announces {length} bytes, channel says {known[1]}")
            else:
                # Learn the channel's digest while the body streams, so it is known by the end.
                lookup = asyncio.ensure_future(self.expected(key, channel))
        loop = asyncio.get_running_loop()
        try:
            fd: int | None = await loop.run_in_executor(
                None, os.open, body_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644
            )
        except OSError as exc:
            if lookup is not None:
                lookup.cancel()
            raise self._disk_refused(dl, exc, 0) from exc
        hasher = hashlib.sha256()
        written = 0
        try:
            if not buffered:
                dl.start_body(Head(headers, length))
            # Hold back the last byte until verified: a mismatch must never look like a whole body.
            total = length if length is not None else want_size
            cap = total - 1 if total else None
            try:
                async for chunk in resp.content.iter_chunked(READ_SIZE):
                    if fd is not None:
                        try:
                            await loop.run_in_executor(None, _write_and_hash, fd, chunk, hasher)
                        except OSError as exc:
                            await loop.run_in_executor(None, os.close, fd)
                            fd = None
                            self._unspool(dl, exc, written, buffered)
                    if fd is None:
                        await loop.run_in_executor(None, hasher.update, chunk)
                    written += len(chunk)
                    if want_size is not None and written > want_size:
                        raise IntegrityError(f"{key}: upstream sent more than the {want_size} bytes expected")
                    self.metrics.bytes_upstream.inc(len(chunk))
                    if hold is not None and hold.pending:
                        buffered, body_path = await hold.feed(dl, chunk, head, body_path)
                    if not buffered:
                        dl.publish(written, chunk, written if cap is None else min(written, cap))
                        if fd is None:
                            await self._pace(dl, channel)
            except TimeoutError as exc:
                raise UpstreamTimeout("upstream stalled mid-body") from exc
            except aiohttp.ClientPayloadError as exc:
                raise TruncatedError(f"upstream body broken: {type(exc.__cause__ or exc).__name__}") from exc
            except aiohttp.ClientError as exc:
                raise TruncatedError(f"upstream connection lost: {type(exc).__name__}") from exc
            if length is not None and written != length:
                raise TruncatedError(f"upstream sent {written} of {length} bytes")
            if hold is not None and hold.pending:  # a body shorter than the head needed
                buffered, body_path = await hold.feed(dl, None, head, body_path)
            sha = hasher.hexdigest()
            verified = await self._verify(key, sha, written, lookup)
        except CondaproxyError as exc:
            self._failed(dl, exc)
            if buffered:  # nobody reads the raw index: it must not outlive its download
                await loop.run_in_executor(None, lambda: body_path.unlink(missing_ok=True))
            return
        finally:
            if lookup is not None and not lookup.done():
                lookup.cancel()
            if fd is not None:
                await loop.run_in_executor(None, os.close, fd)
        now = time.time()
        unit = Unit(
            key, url, sha, sha, written, headers, headers.get("ETag"), headers.get("Last-Modified"), now, now
        )
        if buffered:
            prepare = self._prepare_index if hold is None else hold.prepare
            try:
                unit = await prepare(unit, body_path, dl.temp_path)
            except Exception as exc:  # a body we cannot rewrite must fail its readers, not the task
                self._failed(dl, UpstreamUnavailable(f"cannot rewrite {key.filename}: {exc}"))
                return
            finally:
                await loop.run_in_executor(None, lambda: body_path.unlink(missing_ok=True))
            dl.start_body(Head(unit.headers, unit.size))
        dl.finish(unit.size, unit.sha256)
        if not verified or dl.spool_error is not None:
            return  # nothing vouches for the bytes, or the temp file does not hold them all
        try:
            await self.persist.persist(unit, dl.temp_path)
        except Exception:
            return  # counted and logged by the persist queue; the client already has its bytes
        if key.kind is Kind.REPODATA and (cached is None or cached.blob_key != unit.blob_key):
            # New content: cached siblings (.zst beside .json) must not stay served as fresh.
            await self.catalog.expire(key.channel, key.subdir, variants.siblings(key.filename))
        if key.kind in (Kind.REPODATA, Kind.SHARD):
            await self._learn(key, dl.temp_path)

    def _disk_refused(self, dl: Download, exc: OSError, offset: int) -> CacheDiskError:
        self.metrics.spool_failures.inc()
        reason = exc.strerror or type(exc).__name__
        log.error(
            "cache disk refused %s at byte %d (%s): relaying to %d attached clients, not caching",
            dl.key,
            offset,
            reason,
            dl.subscribers,
        )
        return CacheDiskError(f"cache disk refused the download ({reason}); retry shortly")

    def _unspool(self, dl: Download, exc: OSError, offset: int, buffered: bool) -> None:
        """The temp file cannot grow (ENOSPC...): go on as a relay for the readers attached now.

        Bytes from here on exist only as the newest chunk in memory, so the download paces
        itself to its readers (see _pace), new readers are refused, and nothing is persisted.
        """
        error = self._disk_refused(dl, exc, offset)
        if buffered:
            raise error  # a shard index is rewritten from the whole file: nothing to relay
        dl.stop_spooling(error)

    async def _pace(self, dl: Download, channel: ChannelConfig) -> None:
        # Bounded memory: the next chunk replaces the one in memory only once every attached
        # reader has sent it. A reader too slow for read_timeout is left behind: lacking bytes
        # later, its response is aborted (never ended cleanly).
        try:
            await asyncio.wait_for(dl.readers_caught_up(), channel.read_timeout)
        except TimeoutError:
            log.warning("%s: a reader fell behind the unspooled download; it will be cut off", dl.key)

    async def _prepare_index(self, unit: Unit, raw: Path, out: Path) -> Unit:
        """Rewrite an index naming foreign shard or package bases so clients come back to us."""
        loop = asyncio.get_running_loop()
        key = unit.key
        # Bases come back redacted: open() puts a mirror's token back, nothing stores it.
        base, packages = await loop.run_in_executor(None, shards.rewrite_index, raw, out, unit.upstream_url)
        await self.catalog.set_shard_base(key.channel, key.subdir, base)
        if packages is not None:
            # A shard-only client learns package locations from the index alone (CEP-16 + 15).
            await self.catalog.set_package_base(key.channel, key.subdir, packages)
        if base is None and packages is None:
            await loop.run_in_executor(None, os.replace, raw, out)
            return unit
        size, sha = await loop.run_in_executor(None, hash_file, out)
        log.info("%s: index rewritten (shards at %s, packages at %s)", key, base, packages)
        # Our bytes, our client-facing ETag; unit.etag stays the upstream's, for revalidation.
        headers = {**unit.headers, "ETag": f'"{sha[:32]}"'}
        return replace(unit, blob_key=sha, sha256=sha, size=size, headers=headers, source=unit.sha256)

    async def _verify(
        self,
        key: UnitKey,
        sha: str,
        size: int,
        lookup: asyncio.Future[tuple[str, int | None] | None] | None,
    ) -> bool:
        """Raise IntegrityError on a mismatch; False when there is nothing to verify against."""
        if key.kind is Kind.SHARD:
            want = key.filename.removeprefix("shards/").removesuffix(".msgpack.zst")
            if sha != want:
                raise IntegrityError(f"shard content hashes to {sha[:12]}…, not its name")
            return True
        if key.kind is not Kind.PACKAGE:
            return True
        expected = await lookup if lookup is not None else None
        if expected is None:
            # Served as upstream sent it, but never cached: nothing vouches for these bytes.
            self.metrics.unverified.inc()
            log.warning("%s: no sha256 in the channel's metadata; served, not cached", key)
            return False
        want_sha, want_size = expected
        if sha != want_sha or (want_size is not None and size != want_size):
            raise IntegrityError(
                f"{key}: got sha256 {sha[:12]}… size {size}, channel says {want_sha[:12]}… size {want_size}"
            )
        return True

    async def _learn(self, key: UnitKey, path: Path) -> None:
        loop = asyncio.get_running_loop()
        try:
            count = await loop.run_in_executor(
                None, repodata.learn, self.catalog.path, key.channel, key.subdir, key.filename, path
            )
        except Exception as exc:  # a malformed file must not take the proxy down
            log.warning("could not learn digests from %s: %s", key, exc)
            return
        log.debug("learned %d digests from %s", count, key)
