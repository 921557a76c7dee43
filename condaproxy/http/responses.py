"""Answers the proxy writes itself: short errors, and the headers every unit response carries."""

from __future__ import annotations

from aiohttp import web

from condaproxy.cache.freshness import cache_control
from condaproxy.cache.unit import kept_headers
from condaproxy.conda.paths import UnitKey
from condaproxy.config.model import Config
from condaproxy.http import ranges


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


def abort(request: web.BaseRequest) -> None:
    # Drop the connection: the client sees a broken transfer, never a clean short body.
    if request.transport is not None:
        request.transport.abort()


def unit_headers(config: Config, key: UnitKey, base: dict[str, str], xcache: str) -> dict[str, str]:
    """The headers of a unit's response: what it keeps (rows cached before that rule too) and ours."""
    headers = kept_headers(key.kind, base)
    headers["Cache-Control"] = cache_control(key.kind, config)
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
