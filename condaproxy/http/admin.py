"""The admin API: POST /_admin/... with `Authorization: Bearer <token>` ([admin] token_file).

The routes exist only when the token file is configured (otherwise /_admin/ answers 404). The
token is checked before any body byte is read; bodies are bounded. A refused request is logged
with the client's address and the path, never with what it offered.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from condaproxy.cache.removal import remove_unit
from condaproxy.conda.lockfiles import Lockfile, LockfileError, parse
from condaproxy.conda.paths import Rejection, parse_path
from condaproxy.config.model import is_channel_name
from condaproxy.http.operations import CLIENT, OPERATIONS
from condaproxy.http.services import SERVICES

log = logging.getLogger(__name__)

SMALL_BODY = 64 * 1024
LOCKFILE_BODY = 32 * 1024 * 1024  # a pixi.lock of a large workspace runs to megabytes
_SUBDIR = re.compile(r"noarch|(?:linux|osx|win|zos|emscripten|wasi|freebsd|unknown)-[a-z0-9_]+")


def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    """An RFC 9457 problem answer."""
    body = {"type": "about:blank", "status": status, "title": _TITLES.get(status, "Error"), "detail": detail}
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type="application/problem+json",
        headers={"Cache-Control": "no-store", "X-Cache": "MISS", **(headers or {})},
    )


_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    413: "Content Too Large",
    409: "Conflict",
}


def _ok(data: dict[str, Any], status: int = 200) -> web.Response:
    return web.json_response(data, status=status, headers={"Cache-Control": "no-store", "X-Cache": "MISS"})


class _Refused(Exception):
    def __init__(self, response: web.Response) -> None:
        self.response = response


def _authorize(request: web.Request) -> None:
    admin = request.app[OPERATIONS].admin
    if admin is None or not admin.accepts(request.headers.get("Authorization")):
        log.warning(
            "refused admin request from %s to %s: wrong or missing token", request[CLIENT], request.path
        )
        raise _Refused(problem(401, "a valid admin token is required", {"WWW-Authenticate": "Bearer"}))


def _too_large(limit: int) -> _Refused:
    response = problem(413, f"the body may be at most {limit} bytes")
    response.force_close()  # the rest of the body is never read
    return _Refused(response)


async def _body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    data = bytearray()
    while chunk := await request.content.readany():
        data += chunk
        if len(data) > limit:  # chunked bodies have no Content-Length to refuse up front
            raise _too_large(limit)
    return bytes(data)


async def _json(request: web.Request) -> dict[str, Any]:
    raw = await _body(request, SMALL_BODY)
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise _Refused(problem(400, "the body must be a JSON object")) from None
    if not isinstance(data, dict):
        raise _Refused(problem(400, "the body must be a JSON object"))
    return data


Endpoint = Callable[[web.Request], Awaitable[web.Response]]


def _admin(handler: Endpoint) -> Endpoint:
    """The token is checked before the handler reads any byte of the body."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.Response:
        try:
            _authorize(request)
            return await handler(request)
        except _Refused as refused:
            return refused.response

    return wrapped


def split_target(target: str) -> tuple[str, str | None, str | None] | str:
    """CHANNEL[/SUBDIR[/FILE]] -> (channel, subdir, file), or why it is not one."""
    segs = [s for s in target.strip().strip("/").split("/") if s]
    index = next((i for i, s in enumerate(segs) if i >= 1 and _SUBDIR.fullmatch(s)), None)
    channel = "/".join(segs if index is None else segs[:index])
    if not is_channel_name(channel):
        return f"not a channel name: {channel[:100]!r}"
    if index is None:
        return channel, None, None
    file = "/".join(segs[index + 1 :]) or None
    if file is not None:
        parsed = parse_path("/" + "/".join(segs))
        if isinstance(parsed, Rejection) or parsed.key.channel != channel:
            return f"not a file of {channel}/{segs[index]}: {file[:100]!r}"
    return channel, segs[index], file


@_admin
async def invalidate(request: web.Request) -> web.Response:
    """{"target": "CHANNEL[/SUBDIR[/FILE]]"}: mark repodata stale now, or drop one cached file."""
    data = await _json(request)
    target = data.get("target")
    if not isinstance(target, str):
        return problem(400, 'expected {"target": "CHANNEL[/SUBDIR[/FILE]]"}')
    split = split_target(target)
    if isinstance(split, str):
        return problem(400, split)
    channel, subdir, file = split
    svc = request.app[SERVICES]
    if file is None:
        count = await svc.catalog.invalidate(channel, subdir)
        log.info("admin: %s marked %d files of %s stale", request[CLIENT], count, target)
        return _ok({"target": target, "invalidated": count})
    parsed = parse_path("/" + target.strip("/"))
    assert not isinstance(parsed, Rejection)
    key = parsed.key
    unit = await svc.catalog.get(key)
    found = unit is not None and await remove_unit(svc.catalog, svc.store, key, unit.blob_key)
    log.info("admin: %s dropped %s (%s)", request[CLIENT], key, "was cached" if found else "was not cached")
    return _ok({"target": target, "dropped": found})


async def _patterns(request: web.Request) -> list[str] | web.Response:
    data = await _json(request)
    packages = data.get("packages")
    if not isinstance(packages, list) or not all(isinstance(p, str) for p in packages) or not packages:
        return problem(
            400, 'expected {"packages": ["numpy-2.0.0-py312h22e1c76_0.conda", "numpy-2.*", "numpy"]}'
        )
    return [str(p) for p in packages]


async def _change_pins(request: web.Request, *, add: bool) -> web.Response:
    """Add or remove the run-time pins a {"packages": [...]} body names."""
    patterns = await _patterns(request)
    if isinstance(patterns, web.Response):
        return patterns
    pins = request.app[OPERATIONS].pins
    try:
        added, removed = await (pins.change(add=patterns) if add else pins.change(remove=patterns))
    except ValueError as exc:
        return problem(400, str(exc))
    changed = {"pinned": added} if add else {"unpinned": removed}
    return _ok({**changed, "pins": pins.patterns})


@_admin
async def pin(request: web.Request) -> web.Response:
    """{"packages": [...]}: never evict these (file names, globs or package names); kept across restarts."""
    return await _change_pins(request, add=True)


@_admin
async def unpin(request: web.Request) -> web.Response:
    """{"packages": [...]}: remove pins set at run time."""
    return await _change_pins(request, add=False)


@_admin
async def prefetch(request: web.Request) -> web.Response:
    """The body is a pixi.lock, conda-lock.yml or @EXPLICIT file; ?pin=yes pins what it names."""
    raw = await _body(request, LOCKFILE_BODY)
    try:
        parsed = parse(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return problem(400, "the lock file is not UTF-8 text")
    except LockfileError as exc:
        return problem(400, str(exc))
    if not isinstance(parsed, Lockfile):
        return problem(400, "an environment.yml must be solved first: use `condaproxy prefetch` from a shell")
    pin_it = request.query.get("pin", "no").lower() in ("1", "yes", "true", "on")
    job = request.app[OPERATIONS].prefetcher.start(parsed, pin=pin_it)
    log.info("admin: %s started prefetch %d of %d packages", request[CLIENT], job.id, job.total)
    return _ok({"job": job.id, "total": job.total, "skipped": parsed.skipped, "status": "/_status"}, 202)


@_admin
async def gc(request: web.Request) -> web.Response:
    """{"dry_run": bool}: evict down to max_size now."""
    data = await _json(request)
    svc = request.app[SERVICES]
    if not svc.config.cache.max_size:
        return problem(409, "[cache] max_size is not set: nothing is ever evicted")
    result = await request.app[OPERATIONS].evictor.run_once(dry_run=bool(data.get("dry_run")))
    return _ok(
        {
            "units": result.units,
            "freed": result.freed,
            "size": result.size,
            "catalog": result.catalog,
            "max_size": svc.config.cache.max_size,
        }
    )


def add_routes(app: web.Application) -> None:
    """Register the admin API (only when [admin] token_file is set)."""
    app.router.add_post("/_admin/invalidate", invalidate)
    app.router.add_post("/_admin/pin", pin)
    app.router.add_post("/_admin/unpin", unpin)
    app.router.add_post("/_admin/prefetch", prefetch)
    app.router.add_post("/_admin/gc", gc)
