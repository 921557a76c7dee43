"""Response bodies sent with a bound on client stalls: send_timeout seconds without progress.

aiohttp's keep-alive timeout covers only the time between requests; a client that asks for a
file and never reads would otherwise hold its connection, a file descriptor and the response's
buffers for ever (StreamResponse.write waits in drain(), loop.sendfile for a writable socket).
Progress is measured per write and per sendfile slice: each must complete within send_timeout,
so a client has to accept at least SLICE bytes in that time. A stalled response raises
ClientStalled; the caller aborts the connection (rule 4: never a short body that looks whole).
"""

from __future__ import annotations

import asyncio
from typing import IO

from aiohttp import web

from condaproxy.errors import ClientStalled, CondaproxyError

# A slice of a sendfile: the unit of measured progress, as live.CHUNK is for writes.
SLICE = 256 * 1024
# Bytes a response head may take beyond the headers a handler set (status line, Date, Server,
# Content-Length, Content-Type, Connection), when deciding whether a send can wait at all.
HEAD_ALLOWANCE = 512


def _stalled(timeout: float) -> ClientStalled:
    return ClientStalled(f"the client accepted no bytes for {timeout:g} s")


async def write(resp: web.StreamResponse, chunk: bytes | memoryview, timeout: float) -> None:
    """resp.write(chunk), or ClientStalled when the client does not take it within timeout."""
    try:
        async with asyncio.timeout(timeout):
            await resp.write(chunk)
    except TimeoutError:
        raise _stalled(timeout) from None


async def write_eof(resp: web.StreamResponse, timeout: float) -> None:
    """resp.write_eof() (a chunked body's last chunk may wait on the client too), bounded."""
    try:
        async with asyncio.timeout(timeout):
            await resp.write_eof()
    except TimeoutError:
        raise _stalled(timeout) from None


async def finish(request: web.BaseRequest, resp: web.Response, body: bytes, timeout: float) -> None:
    """Send resp (headers and body, in one write) within timeout.

    Left to aiohttp after the handler returns, a client that reads nothing while pipelining
    requests would hold the connection in drain() with no bound. drain() waits only while the
    transport's buffer is above its high-water mark: when it is empty and the whole response
    fits under that mark, nothing can wait, and the timer (a tenth of a small hit's cost) is
    not armed.
    """
    transport = request.transport
    if transport is not None and transport.get_write_buffer_size() == 0:
        size = len(body) + HEAD_ALLOWANCE + sum(len(k) + len(v) + 4 for k, v in resp.headers.items())
        if size <= transport.get_write_buffer_limits()[1]:
            await resp.prepare(request)
            await resp.write_eof()
            return
    try:
        async with asyncio.timeout(timeout):
            await resp.prepare(request)
            await resp.write_eof()
    except TimeoutError:
        raise _stalled(timeout) from None


async def sendfile(
    transport: asyncio.Transport, file: IO[bytes], offset: int, count: int, timeout: float
) -> None:
    """Send count bytes of file from offset, slice by slice, each within timeout."""
    loop = asyncio.get_running_loop()
    end = offset + count
    while offset < end:
        size = min(SLICE, end - offset)
        try:
            async with asyncio.timeout(timeout):
                sent = await loop.sendfile(transport, file, offset, size)
        except TimeoutError:
            raise _stalled(timeout) from None
        if sent < size:  # the file is shorter than its row says: never end the body cleanly
            raise CondaproxyError(f"stored file ended {end - offset - sent} bytes early")
        offset += size
