"""create_app(config): the wiring of every part, the routes, and the cleanup context that owns them."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from condaproxy.cache.adopt import Adopter
from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.cpu import CpuHook, CpuPool, default_workers
from condaproxy.cache.derive import Deriver
from condaproxy.cache.download import Fetcher
from condaproxy.cache.evict import Evictor
from condaproxy.cache.expected import DigestResolver
from condaproxy.cache.filtered import Filtered
from condaproxy.cache.history import prune_forever
from condaproxy.cache.housekeeping import flush_touches_forever, reset_temp_dir, sweep
from condaproxy.cache.inflight import InflightTable
from condaproxy.cache.persist import PersistQueue
from condaproxy.cache.policies import PolicyBook
from condaproxy.cache.private import LearnedPrivate
from condaproxy.cache.refusals import Refusals
from condaproxy.cache.scrub import Scrubber
from condaproxy.config.interfaces import bind_addresses
from condaproxy.config.model import Config
from condaproxy.http import admin
from condaproxy.http.accesslog import AccessLogger, QuietMalformedRequests
from condaproxy.http.assets import static
from condaproxy.http.budget import ColdFetches
from condaproxy.http.fdreserve import FdReserve, listeners, raise_nofile_limit
from condaproxy.http.guards import read_only
from condaproxy.http.handlers import handle
from condaproxy.http.hot import HotBlobs
from condaproxy.http.landing import landing, setup_condarc, setup_page, setup_pixi
from condaproxy.http.operations import observe, on_prepare, operations_ctx
from condaproxy.http.probes import healthz, metrics_view, readyz
from condaproxy.http.services import SERVICES, Services
from condaproxy.http.status import status_json
from condaproxy.http.statuspage import status_page
from condaproxy.metrics import Metrics
from condaproxy.ops.lifecycle import ServiceManager
from condaproxy.ops.logs import LogFiles
from condaproxy.store.blobstore import BlobStore
from condaproxy.store.filesystem import FilesystemStore
from condaproxy.store.local_cache import LocalCachedStore
from condaproxy.store.s3 import S3Store
from condaproxy.store.s3_client import S3Settings
from condaproxy.upstream.admission import ClientAuth
from condaproxy.upstream.ratelimit import ProbeLimiter

log = logging.getLogger(__name__)

# Seconds a client may take to send a complete request head, and may stay idle between
# requests on a keep-alive connection (nginx: client_header_timeout 60s, keepalive_timeout 75s;
# shorter here because nothing else stands between the proxy and slow or idle clients).
CLIENT_TIMEOUT = 15.0
MAX_HEADERS = 100


async def _services(app: web.Application) -> AsyncIterator[None]:
    config: Config = app[CONFIG]
    parts = app[PARTS]
    root = config.cache.directory
    temp = root / "tmp"
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, lambda: root.mkdir(parents=True, exist_ok=True))
    await loop.run_in_executor(None, reset_temp_dir, temp)
    store = await open_store(config, parts.store)
    catalog = await parts.catalog.open(root / "catalog.sqlite3")
    clock = app[CLOCK]
    catalog.clock = clock
    await sweep(catalog, store)
    metrics = Metrics()
    # Imported here: the upstream session must be created inside the running loop.
    from condaproxy.upstream.client import Upstream

    upstream = Upstream()
    # CPU-heavy jobs get threads of their own; the loop's default executor keeps file I/O.
    cpu = CpuPool(config.cache.cpu_workers or default_workers(), config.cache.cpu_queue, app.get(CPU_HOOK))
    persist = PersistQueue(
        store,
        catalog,
        metrics,
        config.cache.persist_workers,
        # S3 can be down while the proxy is up: refused persists wait there and are tried again.
        backlog_dir=temp / "backlog" if store.shared else None,
        backlog_limit=config.store.persist_backlog,
        retry_max=config.store.persist_retry_max,
    )
    inflight = InflightTable(temp)
    fetcher = Fetcher(
        config=config,
        catalog=catalog,
        upstream=upstream,
        persist=persist,
        inflight=inflight,
        metrics=metrics,
        cpu=cpu,
        refusals=Refusals(catalog, metrics),
    )
    resolver = DigestResolver(catalog, store, fetcher, temp, cpu)
    fetcher.expected = resolver
    if store.shared:  # other nodes' objects are found in the bucket before the upstream is asked
        fetcher.adopter = Adopter(catalog, store, metrics, resolver)
    fetcher.deriver = Deriver(
        lambda key, channel: fetcher.obtain(key, channel, derive=False),
        catalog,
        persist,
        resolver.blob_file,
        cpu=cpu,
        per_client=config.cache.derivations_per_client,
        metrics=metrics,
    )
    metrics.inflight.set_function(lambda: len(inflight))
    metrics.cpu_jobs.set_function(lambda: cpu.admitted)
    metrics.cpu_waiting.set_function(lambda: cpu.waiting)
    book = PolicyBook(config, metrics, clock)
    fetcher.filtered = Filtered(
        book,
        catalog,
        persist,
        lambda key, channel: fetcher.ensure(key, channel),
        resolver.blob_file,
        lambda: book.config.cache.repodata_ttl,
        lambda key: key in fetcher.not_found,
    )
    auth = ClientAuth(upstream, config.upstream.auth_ttl, ProbeLimiter(*config.upstream.auth_probe_rate))
    cold = ColdFetches(config.lazy.max_cold_per_client)
    hot = HotBlobs(config.lazy.hot_cache)
    private = LearnedPrivate(catalog)
    await private.load()
    app[SERVICES] = Services(
        config,
        catalog,
        store,
        upstream,
        inflight,
        persist,
        fetcher,
        metrics,
        auth,
        cold,
        book,
        clock,
        hot=hot,
        private=private,
    )
    catalog.on_blob_deleted = hot.discard  # a deleted blob is not kept in memory either
    flusher = loop.create_task(flush_touches_forever(catalog), name="flush-touches")
    pruner = loop.create_task(
        prune_forever(catalog, store, lambda: book.config.cache.history, clock), name="prune-history"
    )
    hangup = False
    if config.source is not None:
        # SIGHUP re-reads the file's policies (rules, cooldowns); nothing cached is dropped. A
        # loop that cannot take signal handlers (not the main thread, as in in-process tests)
        # keeps the other way a rule change is noticed: the file's mtime, at revalidation.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, book.reload)
            hangup = True
    app[EVICTOR] = evictor = Evictor(config.cache, catalog, store, inflight)
    if config.cache.max_size:
        evictor.start()
    scrubber = Scrubber(config.cache.scrub_interval, catalog, store, metrics, cpu)
    if config.cache.scrub_interval:
        scrubber.start()
    try:
        yield
    finally:
        deadline = app[DEADLINE]
        await scrubber.close()
        await evictor.close()  # first: it must not delete blobs while the rest shuts down
        if hangup:
            loop.remove_signal_handler(signal.SIGHUP)
        for task in (flusher, pruner):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Whatever the shutdown's first step left (downloads started by the last requests).
        await inflight.close(grace=deadline.left())
        await persist.close(timeout=deadline.left())
        await cpu.close()  # after the downloads: a job of a cancelled one may still be running
        await auth.close()
        await upstream.close()
        await catalog.close()
        await store.close()


def s3_settings(config: Config) -> S3Settings:
    """The S3 client's settings from [store]; its pool is kept above persist and read concurrency."""
    sc = config.store
    uploads = config.cache.persist_workers * sc.part_concurrency
    return S3Settings(
        bucket=sc.bucket,
        prefix=sc.prefix,
        endpoint_url=sc.endpoint_url,
        region=sc.region,
        addressing_style=sc.addressing_style,
        connect_timeout=sc.connect_timeout,
        read_timeout=sc.read_timeout,
        multipart_threshold=sc.part_size,
        part_size=sc.part_size,
        part_concurrency=sc.part_concurrency,
        max_connections=max(sc.max_connections, uploads + 32),
    )


async def open_store(config: Config, filesystem: type[FilesystemStore] = FilesystemStore) -> BlobStore:
    """The configured blob store, ready to use (S3: no request is sent yet)."""
    root = config.cache.directory
    if not config.store.s3:
        return filesystem(root / "blobs")
    remote = await S3Store(s3_settings(config)).open()
    if not config.store.local_cache:
        return remote
    try:
        return await LocalCachedStore(remote, root / "s3-cache", config.store.local_cache).open()
    except BaseException:
        await remote.close()
        raise


class Deadline:
    """When a shutdown must be over: shutdown_grace after it begins (systemd kills us after that)."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._at: float | None = None

    def left(self) -> float:
        """Seconds left; the first call starts the clock."""
        now = asyncio.get_running_loop().time()
        if self._at is None:
            self._at = now + self.grace
        return max(0.0, self._at - now)


async def _stop_downloads(app: web.Application) -> None:
    """The shutdown's first step, before requests in progress are waited for.

    Downloads still streaming are cancelled, so their clients are cut off at once instead of
    holding the shutdown for as long as the upstream takes; verified ones finish persisting
    within half the grace. aiohttp then gives requests a quarter, twice (see run()).
    """
    deadline = app[DEADLINE]
    await app[SERVICES].inflight.close(grace=deadline.left() / 2)


@dataclass(frozen=True)
class Parts:
    """The classes the app makes its catalog and blob store from (tests pass gated subclasses)."""

    catalog: type[Catalog] = Catalog
    store: type[FilesystemStore] = FilesystemStore


DEFAULT_PARTS = Parts()


async def _calibrate(reserve: FdReserve) -> None:
    reserve.calibrate()
    log.info(
        "open files: limit %d, %d held by the proxy; past %d in use requests get 503, past %d"
        " new connections",
        reserve.limit,
        reserve.base,
        reserve.work_line,
        reserve.accept_line,
    )


CONFIG = web.AppKey("config", Config)
PARTS = web.AppKey("parts", Parts)
DEADLINE = web.AppKey("deadline", Deadline)
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")
EVICTOR = web.AppKey("evictor", Evictor)
CPU_HOOK = web.AppKey("cpu_hook", CpuHook)


def create_app(
    config: Config,
    *,
    client_timeout: float = CLIENT_TIMEOUT,
    parts: Parts = DEFAULT_PARTS,
    fd_reserve: FdReserve | None = None,
    clock: Callable[[], float] = time.time,
    cpu_hook: CpuHook | None = None,
) -> web.Application:
    """Build the streamer application for config; nothing starts until the app runs.

    client_timeout bounds both the wait for a complete request head and an idle keep-alive;
    fd_reserve: the descriptors kept from clients (default: from this process's limit);
    clock is the time policies, the ledger and revisions go by (tests move it instead of sleeping).
    cpu_hook is told of every CPU pool job (tests hold jobs with it and see where they ran).
    """
    reserve = fd_reserve or FdReserve.current()
    app = web.Application(
        middlewares=[observe, read_only] if reserve is None else [observe, read_only, reserve.middleware()],
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
    app[PARTS] = parts
    app[DEADLINE] = Deadline(config.lazy.shutdown_grace)
    app[CLOCK] = clock
    if cpu_hook is not None:
        app[CPU_HOOK] = cpu_hook
    app.cleanup_ctx.append(_services)
    app.on_shutdown.append(_stop_downloads)
    if reserve is not None:
        # After the services' startup: what the proxy holds idle is not the clients'.
        app.on_startup.append(lambda _: _calibrate(reserve))
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
    raise_nofile_limit()
    reserve = FdReserve.current()
    try:
        # Our own listening sockets: their accept() keeps the descriptor reserve (fdreserve.py).
        socks = listeners(hosts, port, reserve)
    except OSError as exc:
        print(f"condaproxy: cannot listen on {', '.join(hosts)} port {port}: {exc.strerror}", file=sys.stderr)
        raise SystemExit(1) from None
    log.info("condaproxy on %s port %d, cache in %s", ", ".join(hosts), port, config.cache.directory)
    app = create_app(config, fd_reserve=reserve)
    manager = ServiceManager(
        config, [f"[{h}]:{port}" if ":" in h else f"{h}:{port}" for h in hosts], log_files
    )
    manager.attach(app)
    web.run_app(
        app,
        sock=socks,
        print=manager.listening,  # called once every site is listening: READY=1
        # aiohttp waits this long for requests in progress, then again once it cancelled them:
        # half the grace in all, after the downloads were stopped (_stop_downloads).
        shutdown_timeout=config.lazy.shutdown_grace / 4,
        **server_options(),
    )
