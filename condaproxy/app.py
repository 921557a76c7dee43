"""create_app(config): routes, and the cleanup context that owns every long-lived part."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from condaproxy.accesslog import AccessLogger
from condaproxy.auth import ClientAuth
from condaproxy.catalog import Catalog
from condaproxy.config import Config, bind_addresses
from condaproxy.derive import Deriver
from condaproxy.digests import DigestResolver
from condaproxy.evict import Evictor
from condaproxy.fetch import Fetcher
from condaproxy.inflight import InflightTable
from condaproxy.metrics import CONTENT_TYPE_LATEST, Metrics
from condaproxy.persist import PersistQueue
from condaproxy.scrub import Scrubber
from condaproxy.services import SERVICES, Services
from condaproxy.store.filesystem import FilesystemStore
from condaproxy.streamer import handle

log = logging.getLogger(__name__)

TOUCH_FLUSH_INTERVAL = 5.0
# Seconds a client may take to send a complete request head, and may stay idle between
# requests on a keep-alive connection (nginx: client_header_timeout 60s, keepalive_timeout 75s;
# shorter here because nothing else stands between the proxy and slow or idle clients).
CLIENT_TIMEOUT = 15.0
MAX_HEADERS = 100


def _reset_temp_dir(temp: Path) -> None:
    # Temp files are never valid after a restart: their downloads died with the process.
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir(parents=True)


async def _sweep(catalog: Catalog, store: FilesystemStore) -> None:
    """Delete what a crash can leave in the store: blobs no committed row references.

    Pending puts are the usual case; a kill between committing a row that replaced (or
    dropped) a blob and deleting the old blob leaves one too, unmarked, so every key is checked.
    """
    for key in await catalog.pending_orphans():
        log.info("sweeping blob %s left by an interrupted persist", key)
        await store.delete(key)
    referenced = await catalog.referenced_blobs()
    async for key in store.keys():
        if key not in referenced:
            log.info("sweeping blob %s that no catalog row references", key)
            await store.delete(key)
    for name in await store.remove_partials():
        log.info("swept %s, a partial copy left by an interrupted put", name)


async def _flush_touches(catalog: Catalog) -> None:
    while True:
        await asyncio.sleep(TOUCH_FLUSH_INTERVAL)
        try:
            await catalog.flush_touches()
        except Exception as exc:  # statistics only: never worth dying for
            log.warning("could not record access statistics: %s", exc)


async def _services(app: web.Application) -> AsyncIterator[None]:
    config: Config = app[CONFIG]
    root = config.cache.directory
    temp = root / "tmp"
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, lambda: root.mkdir(parents=True, exist_ok=True))
    await loop.run_in_executor(None, _reset_temp_dir, temp)
    store = FilesystemStore(root / "blobs")
    catalog = await Catalog.open(root / "catalog.sqlite3")
    await _sweep(catalog, store)
    metrics = Metrics()
    # Imported here: the upstream session must be created inside the running loop.
    from condaproxy.upstream import Upstream

    upstream = Upstream()
    persist = PersistQueue(store, catalog, metrics, config.cache.persist_workers)
    inflight = InflightTable(temp)
    fetcher = Fetcher(
        config=config, catalog=catalog, upstream=upstream, persist=persist, inflight=inflight, metrics=metrics
    )
    resolver = DigestResolver(catalog, store, fetcher, temp)
    fetcher.expected = resolver
    fetcher.deriver = Deriver(fetcher, resolver.blob_file)
    metrics.inflight.set_function(lambda: len(inflight))
    auth = ClientAuth(upstream, config.upstream.auth_ttl)
    app[SERVICES] = Services(config, catalog, store, upstream, inflight, persist, fetcher, metrics, auth)
    flusher = loop.create_task(_flush_touches(catalog), name="flush-touches")
    app[EVICTOR] = evictor = Evictor(config.cache, catalog, store, inflight)
    if config.cache.max_size:
        evictor.start()
    scrubber = Scrubber(config.cache.scrub_interval, catalog, store, metrics)
    if config.cache.scrub_interval:
        scrubber.start()
    try:
        yield
    finally:
        await scrubber.close()
        await evictor.close()  # first: it must not delete blobs while the rest shuts down
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        await inflight.close()
        await persist.close()
        await auth.close()
        await upstream.close()
        await catalog.close()
        await store.close()


async def healthz(request: web.Request) -> web.Response:
    """Liveness: answers from the event loop, so a slow answer means a blocked loop."""
    return web.Response(text="ok\n", headers={"Cache-Control": "no-store", "X-Cache": "MISS"})


async def metrics_view(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    body = request.app[SERVICES].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, "X-Cache": "MISS"})


CONFIG = web.AppKey("config", Config)
EVICTOR = web.AppKey("evictor", Evictor)


def _refuse(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    resp = web.Response(
        status=status,
        text=reason + "\n",
        headers={"X-Cache": "MISS", "Cache-Control": "no-store", **(headers or {})},
    )
    # The unread body may hide a smuggled request: this connection serves nothing more.
    resp.force_close()
    return resp


@web.middleware
async def read_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Only GET and HEAD without a body exist here: anything else is refused before routing."""
    if request.method not in ("GET", "HEAD"):
        # CONNECT, OPTIONS * and writes; never an outbound connection.
        return _refuse(405, "only GET and HEAD are supported", {"Allow": "GET, HEAD"})
    if request.body_exists:
        # RFC 9110 9.3.1: a GET body has no meaning, and is where request smuggling hides a
        # second request behind a front proxy that frames it differently. Never read it.
        return _refuse(400, "requests with a body are not accepted")
    return await handler(request)


def create_app(config: Config, *, client_timeout: float = CLIENT_TIMEOUT) -> web.Application:
    """Build the streamer application for config; nothing starts until the app runs.

    client_timeout bounds both the wait for a complete request head and an idle keep-alive.
    """
    app = web.Application(
        middlewares=[read_only],
        handler_args={
            "max_line_size": 8190,
            "max_field_size": 8190,
            "max_headers": MAX_HEADERS,
            # aiohttp arms this timer when a connection opens and after each response, and
            # closes the connection if it fires while no complete request head has arrived:
            # it is the header-read timeout (slowloris) as well as the idle keep-alive timeout.
            # A handler already running (a long download) is never cut by it.
            "keepalive_timeout": client_timeout,
            # Bodies are refused, never drained: do not linger reading one before closing.
            "lingering_time": 0,
        },
    )
    app[CONFIG] = config
    app.cleanup_ctx.append(_services)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/{tail:.*}", handle)
    return app


def server_options() -> dict[str, Any]:
    """Options for the aiohttp server around the app: the redacting access log."""
    return {"access_log": logging.getLogger("condaproxy.access"), "access_log_class": AccessLogger}


class QuietMalformedRequests(logging.Filter):
    """aiohttp logs a malformed request as an error whose traceback quotes the request's bytes:
    tokens in /t/<token>/ paths, Authorization values (rule 9), and a flood of tracebacks
    under attack. Such a record becomes one line naming the parser's complaint, not its input.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite records about HttpProcessingError; let every other record through."""
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "refused a malformed request from %s: %s"
            record.args = (remote, type(exc).__name__)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def run(config: Config) -> None:
    """Serve until interrupted, on every configured interface address."""
    logging.getLogger("aiohttp.server").addFilter(QuietMalformedRequests())
    hosts = bind_addresses(config.lazy.streamer_interface, source=config.source)
    port = config.lazy.streamer_port
    log.info("condaproxy on %s port %d, cache in %s", ", ".join(hosts), port, config.cache.directory)
    try:
        web.run_app(
            create_app(config),
            host=hosts,
            port=port,
            print=None,
            **server_options(),
        )
    except OSError as exc:
        print(f"condaproxy: cannot listen on {', '.join(hosts)} port {port}: {exc.strerror}", file=sys.stderr)
        raise SystemExit(1) from None
