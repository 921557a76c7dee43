"""Streaming a download in progress: the bytes already written at once, then live.

Headers go out before any body byte. Once they are out, a failure can only be signalled by
aborting the connection, never by ending the body cleanly (rule 4).
"""

from __future__ import annotations

import asyncio
import logging
import os

from aiohttp import web

from condaproxy.cache.inflight import Download
from condaproxy.conda import variants
from condaproxy.errors import CondaproxyError
from condaproxy.http import sending
from condaproxy.http.responses import abort, plan_for, unit_headers, without_body
from condaproxy.http.services import Services

log = logging.getLogger(__name__)

CHUNK = 256 * 1024


async def stream(request: web.Request, svc: Services, dl: Download, xcache: str) -> web.StreamResponse:
    """Stream a download in progress: bytes already written at once, then live."""
    assert dl.head is not None
    head = dl.head
    headers = unit_headers(svc.config, dl.key, head.headers, xcache)
    if dl.key.filename in variants.BASES:
        headers["Vary"] = "Accept-Encoding"
    plan = plan_for(request, head.length, head.headers)
    svc.metrics.responses.labels(xcache, str(plan.status)).inc()
    if not plan.has_body:
        return await without_body(request, plan, headers)
    resp = web.StreamResponse(status=plan.status, headers={**headers, **plan.headers})
    end = head.length if plan.count is None else plan.offset + plan.count
    if end is not None:
        resp.content_length = end - plan.offset
    if request.method == "HEAD":
        await resp.prepare(request)
        await resp.write_eof()
        return resp
    timeout = svc.config.lazy.send_timeout
    # Attached before any await: from wait_head() to here the download must never look unread.
    dl.attach()
    try:
        await resp.prepare(request)
        await _pump(request, resp, dl, plan.offset, end, timeout)
        await sending.write_eof(resp, timeout)
    except CondaproxyError as exc:
        log.warning("aborting response for %s: %s", dl.key, exc)
        abort(request)
    except ConnectionError:
        pass
    finally:
        dl.detach()
    return resp


async def _pump(
    request: web.Request,
    resp: web.StreamResponse,
    dl: Download,
    offset: int,
    end: int | None,
    timeout: float,
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
            await sending.write(resp, chunk, timeout)  # send_timeout: a client that stops reading
            offset += len(chunk)
        # The window is sent; a whole-body response must still wait for verification.
        if end is not None and (dl.head is None or dl.head.length == end):
            while not dl.complete:
                await dl.wait_beyond(offset)
    finally:
        if fd is not None:
            os.close(fd)
