"""create_app(config): routes, and the cleanup context that owns every long-lived part."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from condaproxy.accesslog import AccessLogger
from condaproxy.catalog import Catalog
from condaproxy.config import Config, bind_addresses
from condaproxy.derive import Deriver
from condaproxy.digests import DigestResolver
from condaproxy.fetch import Fetcher
from condaproxy.inflight import InflightTable
from condaproxy.metrics import CONTENT_TYPE_LATEST, Metrics
from condaproxy.persist import PersistQueue
from condaproxy.services import SERVICES, Services
from condaproxy.store.filesystem import FilesystemStore
from condaproxy.streamer import handle

log = logging.getLogger(__name__)

TOUCH_FLUSH_INTERVAL = 5.0


def _reset_temp_dir(temp: Path) -> None:
    # Temp files are never valid after a restart: their downloads died with the process.
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir(parents=True)


async def _sweep(catalog: Catalog, store: FilesystemStore) -> None:
    """Delete blobs whose put never reached a committed row (a crash mid-persist)."""
    for key in await catalog.pending_orphans():
        log.info("sweeping blob %s left by an interrupted persist", key)
        await store.delete(key)


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
    app[SERVICES] = Services(config, catalog, store, upstream, inflight, persist, fetcher, metrics)
    flusher = loop.create_task(_flush_touches(catalog), name="flush-touches")
    try:
        yield
    finally:
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        await inflight.close()
        await persist.close()
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


@web.middleware
async def read_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Only GET and HEAD exist here: CONNECT, OPTIONS * and writes get 405 before routing."""
    if request.method not in ("GET", "HEAD"):
        return web.Response(
            status=405,
            text="only GET and HEAD are supported\n",
            headers={"Allow": "GET, HEAD", "X-Cache": "MISS"},
        )
    return await handler(request)


def create_app(config: Config) -> web.Application:
    """Build the streamer application for config; nothing starts until the app runs."""
    app = web.Application(
        middlewares=[read_only], handler_args={"max_line_size": 8190, "max_field_size": 8190}
    )
    app[CONFIG] = config
    app.cleanup_ctx.append(_services)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/{tail:.*}", handle)
    return app


def run(config: Config) -> None:
    """Serve until interrupted, on every configured interface address."""
    hosts = bind_addresses(config.lazy.streamer_interface, source=config.source)
    port = config.lazy.streamer_port
    log.info("condaproxy on %s port %d, cache in %s", ", ".join(hosts), port, config.cache.directory)
    try:
        web.run_app(
            create_app(config),
            host=hosts,
            port=port,
            print=None,
            access_log=logging.getLogger("condaproxy.access"),
            access_log_class=AccessLogger,
        )
    except OSError as exc:
        print(f"condaproxy: cannot listen on {', '.join(hosts)} port {port}: {exc.strerror}", file=sys.stderr)
        raise SystemExit(1) from None
