"""Requests refused before routing: anything but GET and HEAD without a body (and the admin API's POSTs)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from condaproxy.http.problem import error


def _refuse(
    request: web.Request, status: int, reason: str, headers: dict[str, str] | None = None
) -> web.Response:
    resp = error(request, status, reason, headers=headers)
    # The unread body may hide a smuggled request: this connection serves nothing more.
    resp.force_close()
    return resp


@web.middleware
async def read_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Only GET and HEAD without a body exist here: anything else is refused before routing."""
    if request.path.startswith("/_admin/"):
        # The admin API's routes exist only when [admin] token_file is set; they authenticate
        # before reading a body, and bound it.
        if request.method == "POST" and getattr(request.match_info.route, "method", None) == "POST":
            return await handler(request)
        return _refuse(request, 404, "no such endpoint")
    if request.method not in ("GET", "HEAD"):
        # CONNECT, OPTIONS * and writes; never an outbound connection.
        return _refuse(request, 405, "only GET and HEAD are supported", {"Allow": "GET, HEAD"})
    if request.body_exists:
        # RFC 9110 9.3.1: a GET body has no meaning, and is where request smuggling hides a
        # second request behind a front proxy that frames it differently. Never read it.
        return _refuse(request, 400, "requests with a body are not accepted")
    return await handler(request)
