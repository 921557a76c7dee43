"""Liveness and metrics endpoints."""

from __future__ import annotations

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
