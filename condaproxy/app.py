"""create_app(config): the wiring of every part, the routes, and the cleanup context that owns them."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.derive import Deriver
from condaproxy.cache.download import Fetcher
from condaproxy.cache.evict import Evictor
from condaproxy.cache.expected import DigestResolver
from condaproxy.cache.housekeeping import flush_touches_forever, reset_temp_dir, sweep
from condaproxy.cache.inflight import InflightTable
from condaproxy.cache.persist import PersistQueue
from condaproxy.cache.scrub import Scrubber
from condaproxy.config.interfaces import bind_addresses
from condaproxy.config.model import Config
from condaproxy.http import admin
from condaproxy.http.accesslog import AccessLogger, QuietMalformedRequests
from condaproxy.http.assets import static
from condaproxy.http.guards import read_only
from condaproxy.http.handlers import handle
from condaproxy.http.landing import landing, setup_condarc, setup_page, setup_pixi
from condaproxy.http.operations import observe, on_prepare, operations_ctx
from condaproxy.http.probes import healthz, metrics_view, readyz
from condaproxy.http.services import SERVICES, Services
from condaproxy.http.status import status_json
from condaproxy.http.statuspage import status_page
from condaproxy.metrics import Metrics
from condaproxy.ops.lifecycle import ServiceManager
from condaproxy.ops.logs import LogFiles
from condaproxy.store.filesystem import FilesystemStore
from condaproxy.upstream.admission import ClientAuth

log = logging.getLogger(__name__)

# Seconds a client may take to send a complete request head, and may stay idle between
# requests on a keep-alive connection (nginx: client_header_timeout 60s, keepalive_timeout 75s;
# shorter here because nothing else stands between the proxy and slow or idle clients).
CLIENT_TIMEOUT = 15.0
MAX_HEADERS = 100


async def _services(app: web.Application) -> AsyncIterator[None]:
    config: Config = app[CONFIG]
    root = config.cache.directory
    temp = root / "tmp"
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, lambda: root.mkdir(parents=True, exist_ok=True))
    await loop.run_in_executor(None, reset_temp_dir, temp)
    store = FilesystemStore(root / "blobs")
    catalog = await Catalog.open(root / "catalog.sqlite3")
    await sweep(catalog, store)
    metrics = Metrics()
    # Imported here: the upstream session must be created inside the running loop.
    from condaproxy.upstream.client import Upstream

    upstream = Upstream()
    persist = PersistQueue(store, catalog, metrics, config.cache.persist_workers)
    inflight = InflightTable(temp)
    fetcher = Fetcher(
        config=config, catalog=catalog, upstream=upstream, persist=persist, inflight=inflight, metrics=metrics
    )
    resolver = DigestResolver(catalog, store, fetcher, temp)
    fetcher.expected = resolver
    fetcher.deriver = Deriver(
        lambda key, channel: fetcher.ensure(key, channel, derive=False), catalog, persist, resolver.blob_file
    )
    metrics.inflight.set_function(lambda: len(inflight))
    auth = ClientAuth(upstream, config.upstream.auth_ttl)
    app[SERVICES] = Services(config, catalog, store, upstream, inflight, persist, fetcher, metrics, auth)
    flusher = loop.create_task(flush_touches_forever(catalog), name="flush-touches")
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


CONFIG = web.AppKey("config", Config)
EVICTOR = web.AppKey("evictor", Evictor)


def create_app(config: Config, *, client_timeout: float = CLIENT_TIMEOUT) -> web.Application:
    """Build the streamer application for config; nothing starts until the app runs.

    client_timeout bounds both the wait for a complete request head and an idle keep-alive.
    """
    app = web.Application(
        middlewares=[observe, read_only],
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
    app.cleanup_ctx.append(functools.partial(operations_ctx, evictor=lambda: app[EVICTOR]))
    app.on_response_prepare.append(on_prepare)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    _add_operator_routes(app, config)
    app.router.add_get("/{tail:.*}", handle)
    return app


def _add_operator_routes(app: web.Application, config: Config) -> None:
    # Names starting with "_" can never be channels, so these never shadow a unit path.
    app.router.add_get("/", landing)
    app.router.add_get("/_status", status_page)
    app.router.add_get("/_status.json", status_json)
    app.router.add_get("/_setup", setup_page)
    app.router.add_get("/_setup/condarc", setup_condarc)
    app.router.add_get("/_setup/pixi", setup_pixi)
    app.router.add_get("/_static/{name}", static)
    if config.admin.token_file is not None:
        admin.add_routes(app)


def server_options() -> dict[str, Any]:
    """Options for the aiohttp server around the app: the redacting access log."""
    return {"access_log": logging.getLogger("condaproxy.access"), "access_log_class": AccessLogger}


def run(config: Config, log_files: LogFiles | None = None) -> None:
    """Serve until interrupted, on every configured interface address (telling systemd how it goes)."""
    logging.getLogger("aiohttp.server").addFilter(QuietMalformedRequests())
    hosts = bind_addresses(config.lazy.streamer_interface, source=config.source)
    port = config.lazy.streamer_port
    log.info("condaproxy on %s port %d, cache in %s", ", ".join(hosts), port, config.cache.directory)
    app = create_app(config)
    manager = ServiceManager(
        config, [f"[{h}]:{port}" if ":" in h else f"{h}:{port}" for h in hosts], log_files
    )
    manager.attach(app)
    try:
        web.run_app(
            app,
            host=hosts,
            port=port,
            print=manager.listening,  # called once every site is listening: READY=1
            **server_options(),
        )
    except OSError as exc:
        print(f"condaproxy: cannot listen on {', '.join(hosts)} port {port}: {exc.strerror}", file=sys.stderr)
        raise SystemExit(1) from None
