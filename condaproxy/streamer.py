"""Thin request handlers: parse, decide hit / join / start, then stream; errors map to statuses.

Headers go out before any body byte. Once they are out, a failure can only be signalled by
aborting the connection, never by ending the body cleanly (rule 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import IO

from aiohttp import web

from condaproxy import ranges, variants
from condaproxy.auth import Refused
from condaproxy.catalog import Unit
from condaproxy.config import ChannelConfig
from condaproxy.errors import (
    CatalogBusy,
    CondaproxyError,
    UpstreamError,
    UpstreamNotFound,
)
from condaproxy.freshness import Verdict, cache_control, may_serve_stale, verdict
from condaproxy.inflight import Download, State
from condaproxy.paths import Kind, Rejection, UnitKey, parse_path
from condaproxy.services import SERVICES, Services

log = logging.getLogger(__name__)

CHUNK = 256 * 1024


def text(
    status: int, reason: str, xcache: str = "MISS", headers: dict[str, str] | None = None
) -> web.Response:
    """A short plain-text answer (errors, rejections); a 503 always says when to retry."""
    retry = {"Retry-After": "1"} if status == 503 else {}
    return web.Response(
        status=status,
        text=reason + "\n",
        headers={"X-Cache": xcache, "Cache-Control": "no-store", **retry, **(headers or {})},
    )


def _abort(request: web.BaseRequest) -> None:
    # Drop the connection: the client sees a broken transfer, never a clean short body.
    if request.transport is not None:
        request.transport.abort()


def _response_headers(svc: Services, key: UnitKey, base: dict[str, str], xcache: str) -> dict[str, str]:
    headers = dict(base)
    headers["Cache-Control"] = cache_control(key.kind, svc.config)
    headers["X-Cache"] = xcache
    headers["Accept-Ranges"] = "bytes"
    return headers


async def handle(request: web.Request) -> web.StreamResponse:
    """GET/HEAD /<channel>/<subdir>/<file>: serve from the store, join a fetch, or start one."""
    svc = request.app[SERVICES]
    parsed = parse_path(request.raw_path)
    if isinstance(parsed, Rejection):
        return text(parsed.status, parsed.reason)
    key = parsed.key
    channel = svc.config.channel(key.channel)
    if channel is None:
        return text(404, f"channel {key.channel!r} is not served by this proxy")
    try:
        # Before any cache look-up: a private channel's bytes go only to a token its upstream accepts.
        channel = await svc.auth.admit(channel, parsed.token)
    except Refused as exc:
        return text(exc.status, exc.reason)
    try:
        return await _serve(request, svc, key, channel)
    except CatalogBusy:
        return text(503, "catalog busy, retry shortly", headers={"Retry-After": "1"})


async def _serve(
    request: web.Request, svc: Services, key: UnitKey, channel: ChannelConfig
) -> web.StreamResponse:
    now = time.time()
    unit: Unit | None = None
    dl = svc.inflight.get(key)
    xcache = "COLLAPSED"
    if dl is None or dl.state is State.NOT_MODIFIED:
        unit = await svc.catalog.get(key)
        found = verdict(unit, now, svc.config)
        if found is Verdict.HIT and unit is not None:
            served = await _serve_unit(request, svc, unit, "HIT", channel)
            if served is not None:
                return served
            unit = None  # the blob went missing or changed size: fetch it again
        elif found is Verdict.STALE_WHILE_REVALIDATE and unit is not None:
            if svc.inflight.get(key) is None:
                with contextlib.suppress(CondaproxyError):
                    svc.fetcher.start(key, channel, unit)  # one background revalidation
            served = await _serve_unit(request, svc, unit, "STALE", channel)
            if served is not None:
                return served
            unit = None
        # Re-check after the await: another request may have started the fetch meanwhile.
        dl = svc.inflight.get(key)
        if dl is None:
            try:
                dl = svc.fetcher.start(key, channel, unit)
            except CondaproxyError as exc:
                return text(exc.status, str(exc))
            xcache = "MISS"
    elif not key.kind.immutable:
        unit = await svc.catalog.get(key)  # for a stale fallback if this revalidation fails
        if unit is not None and verdict(unit, now, svc.config) is Verdict.STALE_WHILE_REVALIDATE:
            served = await _serve_unit(request, svc, unit, "STALE", channel)
            if served is not None:
                return served
    try:
        state = await dl.wait_head()
    except UpstreamError as exc:
        if not isinstance(exc, UpstreamNotFound) and may_serve_stale(unit, now, svc.config):
            assert unit is not None
            served = await _serve_unit(request, svc, unit, "STALE", channel)
            if served is not None:
                return served
        return text(exc.status, exc.reason)
    except CondaproxyError as exc:
        return text(exc.status, str(exc))
    if state is State.NOT_MODIFIED:
        fresh = await svc.catalog.get(key)
        if fresh is not None:
            served = await _serve_unit(request, svc, fresh, "REVALIDATED", channel)
            if served is not None:
                return served
        return text(502, "cached copy vanished during revalidation")
    return await _stream(request, svc, dl, xcache)


def _open_blob(path: str, size: int) -> IO[bytes] | None:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the caller
    except FileNotFoundError:
        return None
    if os.fstat(f.fileno()).st_size != size:
        f.close()
        return None
    return f


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
                svc.fetcher.start(coded_key, channel, coded)
    return None


async def _serve_unit(
    request: web.Request, svc: Services, unit: Unit, xcache: str, channel: ChannelConfig
) -> web.StreamResponse | None:
    """Answer from the store; None if the blob is missing or damaged (the row is then dropped)."""
    extra: dict[str, str] = {}
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
    """Send a stored unit: sendfile for local blobs, Range and conditionals honoured."""
    loop = asyncio.get_running_loop()
    local = svc.store.local_path(unit.blob_key)
    fobj: IO[bytes] | None = None
    if local is not None:
        fobj = await loop.run_in_executor(None, _open_blob, str(local), unit.size)
        if fobj is None:
            log.error("blob of %s is missing or has the wrong size; refetching", unit.key)
            if (orphan := await svc.catalog.remove(unit.key)) is not None:
                await svc.store.delete(orphan)
            return None
    try:
        headers = _response_headers(svc, unit.key, {**unit.headers, **extra}, xcache)
        if xcache == "STALE":
            headers["Age"] = str(max(0, int(time.time() - unit.validated_at)))
        svc.catalog.touch(unit.key, time.time())
        # Client-facing validators: for derived or rewritten units they differ from upstream's.
        plan = _plan(request, unit.size, unit.headers)
        svc.metrics.responses.labels(xcache, str(plan.status)).inc()
        if not plan.has_body:
            return await _without_body(request, plan, headers)
        count = unit.size - plan.offset if plan.count is None else plan.count
        resp = web.StreamResponse(status=plan.status, headers={**headers, **plan.headers})
        resp.content_length = count
        await resp.prepare(request)
        if request.method == "HEAD" or count == 0:
            await resp.write_eof()
            return resp
        if fobj is not None and request.transport is not None:
            await loop.sendfile(request.transport, fobj, plan.offset, count)
        else:
            async for chunk in svc.store.read(unit.blob_key, plan.offset, count):
                await resp.write(chunk)
        await resp.write_eof()
        return resp
    finally:
        if fobj is not None:
            fobj.close()


def _plan(request: web.Request, size: int | None, headers: dict[str, str]) -> ranges.Plan:
    return ranges.plan(
        request.method, request.headers, size, headers.get("ETag"), headers.get("Last-Modified")
    )


async def _without_body(
    request: web.Request, plan: ranges.Plan, headers: dict[str, str]
) -> web.StreamResponse:
    """304 or 416: headers only."""
    resp = web.StreamResponse(status=plan.status, headers={**headers, **plan.headers})
    if plan.status == 416:
        resp.content_length = 0
    await resp.prepare(request)
    await resp.write_eof()
    return resp


async def _stream(request: web.Request, svc: Services, dl: Download, xcache: str) -> web.StreamResponse:
    """Stream a download in progress: bytes already written at once, then live."""
    assert dl.head is not None
    head = dl.head
    headers = _response_headers(svc, dl.key, head.headers, xcache)
    if dl.key.filename in variants.BASES:
        headers["Vary"] = "Accept-Encoding"
    plan = _plan(request, head.length, head.headers)
    svc.metrics.responses.labels(xcache, str(plan.status)).inc()
    if not plan.has_body:
        return await _without_body(request, plan, headers)
    resp = web.StreamResponse(status=plan.status, headers={**headers, **plan.headers})
    end = head.length if plan.count is None else plan.offset + plan.count
    if end is not None:
        resp.content_length = end - plan.offset
    await resp.prepare(request)
    if request.method == "HEAD":
        await resp.write_eof()
        return resp
    dl.attach()
    try:
        await _pump(request, resp, dl, plan.offset, end)
    except CondaproxyError as exc:
        log.warning("aborting response for %s: %s", dl.key, exc)
        _abort(request)
        return resp
    except ConnectionError:
        return resp
    finally:
        dl.detach()
    await resp.write_eof()
    return resp


async def _pump(
    request: web.Request, resp: web.StreamResponse, dl: Download, offset: int, end: int | None
) -> None:
    """Copy [offset, end) of the download to the response as it is published."""
    loop = asyncio.get_running_loop()
    fd: int | None = None
    try:
        while end is None or offset < end:
            published = await dl.wait_beyond(offset)
            stop = published if end is None else min(published, end)
            if offset >= stop:
                if dl.complete:
                    return  # the whole body (or the asked window) went out
                continue
            # Bounded writes: each client's transport buffers at most one CHUNK of ours.
            stop = min(stop, offset + CHUNK)
            chunk: bytes | memoryview | None = dl.cached_chunk(offset, stop)
            if chunk is None:
                if fd is None:
                    fd = await loop.run_in_executor(None, os.open, dl.temp_path, os.O_RDONLY)
                chunk = await loop.run_in_executor(None, os.pread, fd, stop - offset, offset)
                if not chunk:
                    # The bytes are gone (the cache disk refused them): abort, never end cleanly.
                    raise CondaproxyError("temporary file shorter than published")
            await resp.write(chunk)
            offset += len(chunk)
        # The window is sent; a whole-body response must still wait for verification.
        if end is not None and (dl.head is None or dl.head.length == end):
            while not dl.complete:
                await dl.wait_beyond(offset)
    finally:
        if fd is not None:
            os.close(fd)
