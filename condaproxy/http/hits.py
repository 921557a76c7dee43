"""Serving units from the store: sendfile for local blobs, Range and conditionals honoured,
and the gzip/zstd-coded copies of repodata a client accepts."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from functools import partial
from typing import IO

from aiohttp import web

from condaproxy.cache.freshness import stored_freshness
from condaproxy.cache.removal import remove_unit
from condaproxy.cache.unit import Unit
from condaproxy.conda import variants
from condaproxy.conda.paths import Kind, UnitKey
from condaproxy.config.model import ChannelConfig
from condaproxy.errors import BlobDamaged, CondaproxyError, StoreError
from condaproxy.http import sending
from condaproxy.http.ranges import Plan
from condaproxy.http.responses import RELEASE, abort, plan_for, unit_headers, without_body
from condaproxy.http.services import Services
from condaproxy.store.files import opened

log = logging.getLogger(__name__)


def _max_age(cache_control: str) -> int:
    """The max-age of a Cache-Control value the proxy wrote ("public, max-age=N")."""
    return int(cache_control.rpartition("max-age=")[2] or 0)


def _open_blob(path: str, size: int) -> IO[bytes] | None:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the caller
    except FileNotFoundError:
        return None
    if os.fstat(f.fileno()).st_size != size:
        f.close()
        return None
    return f


def _close(fobj: IO[bytes] | None) -> None:
    if fobj is not None:
        fobj.close()


async def _coded(request: web.Request, svc: Services, unit: Unit, channel: ChannelConfig) -> Unit | None:
    """A gzip/zstd-coded copy of repodata the client accepts, made from unit's very bytes.

    When there is none yet, one is made in the background and this client gets identity.
    """
    k = unit.key
    for coding in variants.accepted_codings(request.headers.get("Accept-Encoding"))[:1]:
        coded_key = UnitKey(k.channel, k.subdir, f"{k.filename}@{coding}", Kind.REPODATA)
        coded = await svc.catalog.get(coded_key)
        if coded is not None and coded.source == unit.blob_key:
            return coded
        if svc.inflight.get(coded_key) is None:
            with contextlib.suppress(CondaproxyError):
                svc.fetcher.start(coded_key, channel, coded, client=request.remote)
    return None


async def serve_unit(
    request: web.Request,
    svc: Services,
    unit: Unit,
    xcache: str,
    channel: ChannelConfig,
    headers: dict[str, str] | None = None,
) -> web.StreamResponse | None:
    """Answer from the store; None if the blob is missing or damaged (its row is then dropped)."""
    extra: dict[str, str] = dict(headers or {})
    if unit.key.filename in variants.BASES:
        extra["Vary"] = "Accept-Encoding"
        coded = await _coded(request, svc, unit, channel)
        if coded is not None:
            served = await _serve_blob(
                request,
                svc,
                coded,
                xcache,
                {**extra, "Content-Encoding": coded.key.filename.partition("@")[2]},
            )
            if served is not None:
                return served
    return await _serve_blob(request, svc, unit, xcache, extra)


async def _serve_blob(
    request: web.Request, svc: Services, unit: Unit, xcache: str, extra: dict[str, str]
) -> web.StreamResponse | None:
    """Send a stored unit: sendfile for local blobs, Range and conditionals honoured.

    None when the store cannot serve it: the blob is missing or damaged (its row is dropped
    first) or the shared store is unreachable (the row stays); the caller fetches it upstream.
    """
    store = svc.store
    local = store.local_path(unit.blob_key)
    fobj: IO[bytes] | None = None
    if local is not None:
        fobj = await opened(partial(_open_blob, str(local), unit.size), _close)
        if fobj is None and not store.shared:
            log.error("blob of %s is missing or has the wrong size; refetching", unit.key)
            # Only the row version this reader was given: a revalidation may have replaced it.
            await remove_unit(svc.catalog, svc.store, unit.key, unit.blob_key)
            return None
        if fobj is None:  # only this node's copy of a shared blob: drop it, the bucket has the blob
            log.warning("local copy of %s is missing or has the wrong size; dropped", unit.key)
            await store.delete(unit.blob_key)
    try:
        headers = unit_headers(svc.config, unit.key, {**unit.headers, **extra}, xcache, svc.clock())
        fresh = stored_freshness(unit, time.time(), svc.config)
        if RELEASE in unit.headers and "Cache-Control" in fresh:
            # A policy document's own cap (the next release) stays when it is the shorter.
            fresh["Cache-Control"] = min(headers["Cache-Control"], fresh["Cache-Control"], key=_max_age)
        headers.update(fresh)
        # Client-facing validators: for derived or rewritten units they differ from upstream's.
        plan = plan_for(request, unit.size, unit.headers)
        if not plan.has_body:
            svc.catalog.touch(unit.key, time.time())
            svc.metrics.responses.labels(xcache, str(plan.status)).inc()
            return await without_body(request, plan, headers)
        count = unit.size - plan.offset if plan.count is None else plan.count
        if fobj is None and request.method == "GET" and count > 0:
            if (redirected := await _redirect(svc, unit, xcache)) is not None:
                svc.catalog.touch(unit.key, time.time())
                return redirected
            return await _stream_from_store(request, svc, unit, headers, plan, count, xcache)
        svc.catalog.touch(unit.key, time.time())
        svc.metrics.responses.labels(xcache, str(plan.status)).inc()
        resp = web.StreamResponse(status=plan.status, headers={**headers, **plan.headers})
        resp.content_length = count
        await resp.prepare(request)
        if request.method == "HEAD" or count == 0:
            await resp.write_eof()
            return resp
        timeout = svc.config.lazy.send_timeout
        try:
            if fobj is not None and request.transport is not None:
                await sending.sendfile(request.transport, fobj, plan.offset, count, timeout)
            else:
                async for chunk in store.read(unit.blob_key, plan.offset, count):
                    await sending.write(resp, chunk, timeout)
            await sending.write_eof(resp, timeout)
        except CondaproxyError as exc:
            log.warning("aborting response for %s: %s", unit.key, exc)
            abort(request)
        except ConnectionError:
            pass  # the client went away
        return resp
    finally:
        if fobj is not None:
            fobj.close()


async def _redirect(svc: Services, unit: Unit, xcache: str) -> web.StreamResponse | None:
    """[store] redirect: a package or shard hit answers 302 to a presigned GET URL of its object.

    Repodata is always served by the proxy (it is rewritten, coded and revalidated here), and
    HEAD never reaches this: a presigned URL is bound to GET, so the proxy answers HEAD itself.
    """
    config = svc.config.store
    if not config.redirect or not unit.key.kind.immutable:
        return None
    try:
        url = await svc.store.presign(unit.blob_key, config.presign_ttl)
    except StoreError as exc:
        log.warning("cannot presign %s (%s); streaming it instead", unit.key, exc)
        return None
    if url is None:
        return None
    svc.metrics.redirects.inc()
    svc.metrics.responses.labels(xcache, "302").inc()
    # The URL expires: never cached by the client or anything between.
    return web.Response(status=302, headers={"Location": url, "Cache-Control": "no-store", "X-Cache": xcache})


async def _stream_from_store(
    request: web.Request,
    svc: Services,
    unit: Unit,
    headers: dict[str, str],
    plan: Plan,
    count: int,
    xcache: str,
) -> web.StreamResponse | None:
    """Stream a blob the store holds elsewhere (S3) with ranged GETs.

    The first chunk is read before any header is sent: up to then, S3 trouble is still a clean
    fallback to the upstream (None). After it, a failure aborts the connection (rule 4).
    """
    store = svc.store
    chunks = store.read(unit.blob_key, plan.offset, count, size=unit.size)
    async with contextlib.aclosing(chunks):
        try:
            first = await anext(chunks)
        except BlobDamaged as exc:
            svc.metrics.store_read_failures.inc()
            log.error("blob of %s is damaged (%s); dropped, fetching it again", unit.key, exc)
            await remove_unit(svc.catalog, store, unit.key, unit.blob_key)
            return None
        except StoreError as exc:
            svc.metrics.store_read_failures.inc()
            log.warning("store cannot serve %s (%s); fetching it upstream instead", unit.key, exc)
            return None
        svc.catalog.touch(unit.key, time.time())
        svc.metrics.responses.labels(xcache, str(plan.status)).inc()
        resp = web.StreamResponse(status=plan.status, headers={**headers, **plan.headers})
        resp.content_length = count
        timeout = svc.config.lazy.send_timeout
        try:
            await resp.prepare(request)
            await sending.write(resp, first, timeout)
            async for chunk in chunks:
                await sending.write(resp, chunk, timeout)
            await sending.write_eof(resp, timeout)
        except StoreError as exc:
            svc.metrics.store_read_failures.inc()
            log.error("store failed while sending %s (%s); connection aborted", unit.key, exc)
            abort(request)
            return resp
        except CondaproxyError as exc:
            log.warning("aborting response for %s: %s", unit.key, exc)
            abort(request)
            return resp
        except ConnectionError:
            return resp  # the client went away
    store.keep_local(unit.blob_key, unit.size)
    return resp
