"""The download's stream loop: upstream body -> spool -> published to readers -> verified unit.

Readers may send every byte but the last until the body is verified: a mismatch must never
look like a whole body. A shard index, and repodata whose head names a foreign base, are held
back whole and rewritten (cache.rewrite) before readers get any byte. So is a unit fetched from
another origin that the channel's metadata named: no byte of it goes out before it is verified
against the channel's own metadata, and without a digest there it is refused.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp

from condaproxy.cache import integrity
from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.cpu import CpuPool
from condaproxy.cache.inflight import Download, Head
from condaproxy.cache.refusals import Refusals
from condaproxy.cache.rewrite import Holdback, prepare_index
from condaproxy.cache.spool import Spool
from condaproxy.cache.unit import Unit, kept_headers
from condaproxy.conda.paths import Kind
from condaproxy.config.model import ChannelConfig
from condaproxy.errors import (
    CondaproxyError,
    DownloadAbandoned,
    IntegrityError,
    RefusedDocument,
    TruncatedError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from condaproxy.metrics import Metrics
from condaproxy.upstream.headers import passthrough_headers

READ_SIZE = 1 << 20
Failed = Callable[[Download, CondaproxyError], None]


class Receiver:
    """Receives upstream bodies into downloads; knows nothing of what happens to them next."""

    def __init__(
        self, catalog: Catalog, metrics: Metrics, failed: Failed, cpu: CpuPool, refusals: Refusals
    ) -> None:
        self._catalog = catalog
        self._metrics = metrics
        self._failed = failed  # fails the download's readers and remembers why
        self._cpu = cpu
        self._refusals = refusals

    async def receive(
        self,
        dl: Download,
        resp: aiohttp.ClientResponse,
        channel: ChannelConfig,
        url: str,
        expected: integrity.ExpectedLookup | None,
        *,
        whole: bool = False,
    ) -> Unit | None:
        """Stream resp into dl until its readers may end; the unit to persist, or None.

        whole: readers get nothing until the body is in and verified (bytes from an origin
        that only the channel's metadata vouches for). None: nothing vouches for the bytes,
        the temp file does not hold them all, or the body failed (the download is failed
        then). CondaproxyError only before the body.
        """
        key = dl.key
        # A shard index may need rewriting before clients see it: small, so fetched whole first.
        rewritten = key.kind is Kind.SHARD_INDEX
        buffered = rewritten or whole
        body_path = dl.temp_path.with_name(dl.temp_path.name + ".raw") if rewritten else dl.temp_path
        length = resp.content_length
        headers = kept_headers(key.kind, passthrough_headers(resp.headers))
        head = Head(headers, length)
        # Repodata is held back until its head shows whether it names a foreign base (CEP-15).
        hold = None if whole else Holdback.of(key, channel, headers, self._catalog, self._cpu)
        buffered = buffered or hold is not None
        lookup, want_size = await integrity.start_lookup(self._catalog, expected, key, channel, length)
        integrity.watch(dl, lookup)
        spool = Spool(dl, self._metrics)
        loop = asyncio.get_running_loop()
        try:
            await spool.open(body_path)
        except CondaproxyError:
            if lookup is not None:
                lookup.cancel()
            raise
        try:
            if not buffered:
                dl.start_body(Head(headers, length))
            # Hold back the last byte until verified: a mismatch must never look like a whole body.
            total = length if length is not None else want_size
            cap = total - 1 if total else None
            try:
                async for chunk in resp.content.iter_chunked(READ_SIZE):
                    await spool.write(chunk, buffered)
                    written = spool.written
                    if want_size is not None and written > want_size:
                        raise IntegrityError(f"{key}: upstream sent more than the {want_size} bytes expected")
                    self._metrics.bytes_upstream.inc(len(chunk))
                    if hold is not None and hold.pending:
                        buffered, body_path = await hold.feed(dl, chunk, head, body_path)
                    if not buffered:
                        dl.publish(written, chunk, written if cap is None else min(written, cap))
                        if dl.abandoned:  # never to be cached, and its last reader has gone
                            raise DownloadAbandoned(f"{key}: nobody reads it and it cannot be cached")
                        if not spool.spooling:
                            await spool.pace(channel)
            except TimeoutError as exc:
                raise UpstreamTimeout("upstream stalled mid-body") from exc
            except aiohttp.ClientPayloadError as exc:
                raise TruncatedError(f"upstream body broken: {type(exc.__cause__ or exc).__name__}") from exc
            except aiohttp.ClientError as exc:
                raise TruncatedError(f"upstream connection lost: {type(exc).__name__}") from exc
            written = spool.written
            if length is not None and written != length:
                raise TruncatedError(f"upstream sent {written} of {length} bytes")
            if hold is not None and hold.pending:  # a body shorter than the head needed
                buffered, body_path = await hold.feed(dl, None, head, body_path)
            sha = spool.hexdigest()
            verified = await integrity.verify(key, sha, written, lookup, self._metrics, required=whole)
        except CondaproxyError as exc:
            self._failed(dl, exc)
            if buffered:  # nobody reads the raw index: it must not outlive its download
                await loop.run_in_executor(None, lambda: body_path.unlink(missing_ok=True))
            return None
        finally:
            if lookup is not None and not lookup.done():
                lookup.cancel()
            await spool.close()
        now = time.time()
        unit = Unit(
            key, url, sha, sha, written, headers, headers.get("ETag"), headers.get("Last-Modified"), now, now
        )
        if buffered:
            if body_path != dl.temp_path:
                try:
                    if (reason := await self._refusals.known(unit)) is not None:
                        self._failed(
                            dl, RefusedDocument(reason, f"{key.filename} was refused before ({reason})")
                        )
                        return None
                    if hold is None:
                        unit = await prepare_index(self._catalog, self._cpu, unit, body_path, dl.temp_path)
                    else:
                        unit = await hold.prepare(unit, body_path, dl.temp_path)
                except RefusedDocument as exc:  # past a bound: 502, and never read again
                    await self._refusals.record(unit.sha256, key, exc)
                    self._failed(dl, exc)
                    return None
                except Exception as exc:  # a body we cannot rewrite must fail its readers, not the task
                    self._failed(dl, UpstreamUnavailable(f"cannot rewrite {key.filename}: {exc}"))
                    return None
                finally:
                    await loop.run_in_executor(None, lambda: body_path.unlink(missing_ok=True))
            dl.start_body(Head(unit.headers, unit.size))
        dl.finish(unit.size, unit.sha256)
        if not verified or dl.spool_error is not None:
            return None  # nothing vouches for the bytes, or the temp file does not hold them all
        return unit
