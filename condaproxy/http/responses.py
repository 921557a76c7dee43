"""The headers every unit response carries, and answers without a body (errors: problem.py)."""

from __future__ import annotations

import contextlib
import socket
import struct

from aiohttp import web

from condaproxy.cache.freshness import cache_control
from condaproxy.cache.unit import kept_headers
from condaproxy.conda.paths import UnitKey
from condaproxy.config.model import Config
from condaproxy.http import ranges


def abort(request: web.BaseRequest) -> None:
    """Drop the connection with a reset: the client sees a broken transfer, never a clean end.

    Without SO_LINGER 0 the kernel would keep an unread response's buffered bytes (megabytes,
    for a client that stopped reading) for minutes, then end them with a FIN.
    """
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


RELEASE = "X-Condaproxy-Release"


def unit_headers(
    config: Config, key: UnitKey, base: dict[str, str], xcache: str, now: float | None = None
) -> dict[str, str]:
    """The headers of a unit's response: what it keeps (rows cached before that rule too) and ours.

    A document made by a policy says when to ask again.
    """
    headers = kept_headers(key.kind, base)
    # Upstream's Cache-Control is never stored (upstream.headers): one here is the proxy's own.
    headers["Cache-Control"] = headers.get("Cache-Control") or cache_control(key.kind, config)
    release = base.get(RELEASE)
    if release is not None and now is not None:
        # No longer than until the next held record comes of age (policy documents).
        remaining = max(0, int(float(release) - now))
        headers["Cache-Control"] = f"public, max-age={min(remaining, config.cache.repodata_ttl)}"
    headers["X-Cache"] = xcache
    headers["Accept-Ranges"] = "bytes"
    return headers


def plan_for(request: web.Request, size: int | None, headers: dict[str, str]) -> ranges.Plan:
    return ranges.plan(
        request.method, request.headers, size, headers.get("ETag"), headers.get("Last-Modified")
    )


async def without_body(
    request: web.Request, plan: ranges.Plan, headers: dict[str, str]
) -> web.StreamResponse:
    """304 or 416: headers only."""
    resp = web.StreamResponse(status=plan.status, headers={**headers, **plan.headers})
    if plan.status == 416:
        resp.content_length = 0
    await resp.prepare(request)
    await resp.write_eof()
    return resp
