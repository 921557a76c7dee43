"""Streaming a download in progress: the bytes already written at once, then live.

Headers go out before any body byte. Once they are out, a failure can only be signalled by
aborting the connection, never by ending the body cleanly (rule 4). So the last byte of
every response, a Range's window included, waits until the whole download is verified: with
a Content-Length, a client holds a complete-looking response as soon as its last byte is in.
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
from condaproxy.http.problem import failed
from condaproxy.http.responses import abort, plan_for, unit_headers, without_body
from condaproxy.http.services import Services
from condaproxy.store.files import open_fd, opened

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
    svc.metrics.response(xcache, plan.status)
    if not plan.has_body:
        return await without_body(request, plan, headers)
    end = head.length if plan.count is None else plan.offset + plan.count
    if end == plan.offset and request.method != "HEAD":
        # An empty body has no last byte to hold back: its headers wait for the verdict.
        try:
            await dl.wait_verified()
        except CondaproxyError as exc:
            return failed(request, exc, key=dl.key)
    resp = web.StreamResponse(status=plan.status, headers={**headers, **plan.headers})
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
    """Copy [offset, end) of the download to the response as it is published.

    Byte end - 1 goes out only once the download is verified; failing, it raises.
    """
    loop = asyncio.get_running_loop()
    fd: int | None = None
    try:
        while end is None or offset < end:
            if end is not None and offset == end - 1:
                await dl.wait_verified()
            published = await dl.wait_beyond(offset)
            if end is not None:
                published = min(published, end if dl.complete else end - 1)
            if offset >= published:
                if end is None:
                    return  # the whole body of unknown length went out (wait_beyond said DONE)
                raise CondaproxyError("download ended short of the response")
            # Bounded writes: each client's transport buffers at most one CHUNK of ours.
            stop = min(published, offset + CHUNK)
            chunk: bytes | memoryview | None = dl.cached_chunk(offset, stop)
            if chunk is None:
                if fd is None:
                    fd = await opened(open_fd(dl.temp_path, os.O_RDONLY), os.close)
                chunk = await loop.run_in_executor(None, os.pread, fd, stop - offset, offset)
                if not chunk:
                    # The bytes are gone (the cache disk refused them): abort, never end cleanly.
                    raise CondaproxyError("temporary file shorter than published")
            await sending.write(resp, chunk, timeout)  # send_timeout: a client that stops reading
            offset += len(chunk)
    finally:
        if fd is not None:
            os.close(fd)
