"""Liveness and metrics endpoints."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from aiohttp import web

from condaproxy.http.services import SERVICES
from condaproxy.metrics import CONTENT_TYPE_LATEST


async def healthz(request: web.Request) -> web.Response:
    """Liveness: answers from the event loop, so a slow answer means a blocked loop."""
    return web.Response(text="ok\n", headers={"Cache-Control": "no-store", "X-Cache": "MISS"})


async def metrics_view(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    body = request.app[SERVICES].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, "X-Cache": "MISS"})


READY_TIMEOUT = 5.0


def _probe_write(directory: Path) -> None:
    fd, name = tempfile.mkstemp(prefix=".readyz-", dir=directory)
    try:
        os.write(fd, b"ok")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(name)


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 when the catalog answers and the store takes a write; 503 saying why not."""
    svc = request.app[SERVICES]
    headers = {"Cache-Control": "no-store", "X-Cache": "MISS"}
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await svc.catalog.ping()
    except Exception as exc:
        return web.Response(
            status=503, text=f"catalog not answering: {exc or type(exc).__name__}\n", headers=headers
        )
    blobs = svc.config.cache.directory / "blobs"
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await asyncio.get_running_loop().run_in_executor(None, _probe_write, blobs)
    except TimeoutError:
        return web.Response(status=503, text="store not writable: a write took over 5 s\n", headers=headers)
    except OSError as exc:
        return web.Response(status=503, text=f"store not writable: {exc.strerror or exc}\n", headers=headers)
    return web.Response(text="ready\n", headers=headers)
