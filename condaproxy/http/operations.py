"""The running proxy's operational parts beside the cache itself: statistics, run-time pins,
prefetch jobs and the admin token; and the middleware that feeds the statistics and works out
who the client is. Built by a cleanup context that create_app adds after the services."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from condaproxy.cache.evict import Evictor
from condaproxy.cache.ownership import ServeLock
from condaproxy.cache.pins import RuntimePins
from condaproxy.cache.prefetch import Prefetcher
from condaproxy.cache.stats import Recorder
from condaproxy.conda.paths import Rejection, parse_path
from condaproxy.errors import ConfigError
from condaproxy.http.forwarded import client_address
from condaproxy.http.services import SERVICES

log = logging.getLogger(__name__)

CLIENT = web.RequestKey("client", str)  # the client's address (a trusted front's X-Forwarded-For)
STARTED = web.RequestKey("started", float)  # loop time the handler began
HEAD_SENT = web.RequestKey("head_sent", float)  # loop time the response head went out


class AdminToken:
    """The admin API's bearer token, read from [admin] token_file; compared in constant time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._token = b""

    async def load(self) -> None:
        """(Re-)read the token file; an empty or unreadable file is a configuration error."""
        loop = asyncio.get_running_loop()
        try:
            raw = await loop.run_in_executor(None, self.path.read_bytes)
        except OSError as exc:
            raise ConfigError(str(self.path), "admin", "token_file", f"cannot read: {exc.strerror}") from None
        token = raw.strip()
        if len(token) < 16:
            raise ConfigError(
                str(self.path), "admin", "token_file", "the token must be at least 16 characters"
            )
        self._token = token

    def accepts(self, authorization: str | None) -> bool:
        """Whether an Authorization header carries the token (`Bearer <token>`)."""
        scheme, _, offered = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not self._token:
            return False
        return hmac.compare_digest(offered.strip().encode("utf-8", "replace"), self._token)


@dataclass(eq=False)
class Operations:
    """What the status page, the admin API and the reload need besides the services."""

    recorder: Recorder
    evictor: Evictor
    pins: RuntimePins
    prefetcher: Prefetcher
    admin: AdminToken | None
    started: float = field(default_factory=time.time)
    # The status page's catalog figures, shared by every viewer for a few seconds.
    status_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    status_view: object = None


OPERATIONS = web.AppKey("operations", Operations)


async def operations_ctx(app: web.Application, evictor: Callable[[], Evictor]) -> AsyncIterator[None]:
    """Build the operational parts once the services exist; stop prefetch jobs first at shutdown."""
    svc = app[SERVICES]
    registry = svc.metrics.registry
    recorder = Recorder(
        upstream_bytes=lambda: registry.get_sample_value("condaproxy_upstream_bytes_total") or 0.0
    )
    svc.fetcher.on_start = recorder.fetch_started
    svc.fetcher.on_failure = recorder.fetch_failed
    pins = RuntimePins(svc.config.cache.directory, evictor())
    await pins.load()
    # Admitted as the proxy itself (no client address): the overall token-check rate applies.
    prefetcher = Prefetcher(
        lambda: svc.config, svc.catalog, svc.fetcher, lambda ch, token: svc.auth.admit(ch, token, None), pins
    )
    admin = None
    if svc.config.admin.token_file is not None:
        admin = AdminToken(svc.config.admin.token_file)
        await admin.load()
    # Held while serving: `condaproxy gc` and `invalidate` then act through the admin API.
    hold = await asyncio.get_running_loop().run_in_executor(None, ServeLock, svc.config.cache.directory)
    app[OPERATIONS] = Operations(recorder, evictor(), pins, prefetcher, admin)
    try:
        yield
    finally:
        await prefetcher.close()
        svc.fetcher.on_start = svc.fetcher.on_failure = None
        hold.release()


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Note when the response head goes out: for a miss, the wait before it was the upstream's."""
    request[HEAD_SENT] = asyncio.get_running_loop().time()


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Find the client's address, then count the response of every unit request."""
    svc = request.app[SERVICES]
    request[CLIENT] = client_address(request.remote, request.headers, svc.config.lazy.trusted_proxies) or "-"
    request[STARTED] = asyncio.get_running_loop().time()
    response = await handler(request)
    ops = request.app.get(OPERATIONS)
    if ops is not None and not request.path.startswith("/_"):
        parsed = parse_path(request.raw_path)
        if not isinstance(parsed, Rejection):
            nbytes = response.content_length if response.content_length is not None else response.body_length
            if request.method == "HEAD":
                nbytes = 0
            detail = ""
            if isinstance(response, web.Response) and response.status >= 400:
                detail = (response.text or "").strip()
            ops.recorder.response(
                parsed.key, response.headers.get("X-Cache"), response.status, nbytes or 0, detail
            )
    return response
