"""`condaproxy serve` as a systemd service (Type=notify): READY=1 once every listener is bound
and the catalog is open, STATUS= lines, WATCHDOG=1 pings from the event loop, STOPPING=1 at
shutdown; and SIGHUP, which reopens log files and reloads what can change safely.

Reloaded: the [channel:NAME] sections (added, removed or changed), [upstream] default,
allow_unlisted and timeouts, [lazy] trusted_proxies and public_url, and the admin token file's
contents. Everything else (listen addresses, [cache], [log], where the token file is) needs a
restart; a reload that changes it says so in the log and keeps the running values.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from condaproxy.config.load import load_config
from condaproxy.config.model import Config
from condaproxy.errors import ConfigError
from condaproxy.http.operations import OPERATIONS
from condaproxy.http.services import SERVICES
from condaproxy.ops.logs import LogFiles
from condaproxy.ops.notify import Notifier, watchdog_interval

log = logging.getLogger(__name__)

STATUS_EVERY = 30.0


def merge_reload(old: Config, new: Config) -> tuple[Config, list[str]]:
    """The running configuration with new's reloadable parts; and what was left for a restart."""
    lazy = replace(old.lazy, trusted_proxies=new.lazy.trusted_proxies, public_url=new.lazy.public_url)
    upstream = replace(new.upstream, auth_ttl=old.upstream.auth_ttl)
    merged = replace(old, lazy=lazy, upstream=upstream, channels=new.channels)
    ignored = []
    if replace(new.lazy, trusted_proxies=(), public_url=None) != replace(
        old.lazy, trusted_proxies=(), public_url=None
    ):
        ignored.append("[lazy] listen settings")
    if new.cache != old.cache:
        ignored.append("[cache]")
    if new.upstream.auth_ttl != old.upstream.auth_ttl:
        ignored.append("[upstream] auth_ttl")
    if new.log != old.log:
        ignored.append("[log]")
    if new.admin != old.admin:
        ignored.append("[admin] token_file")
    return merged, ignored


class ServiceManager:
    """Talks to systemd for one `serve` run, and reloads on SIGHUP."""

    def __init__(self, config: Config, addresses: Sequence[str], log_files: LogFiles | None = None) -> None:
        self.notifier = Notifier()
        self._source = config.source
        self._addresses = list(addresses)
        self._log_files = log_files
        self._app: web.Application | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def attach(self, app: web.Application) -> None:
        """Add the service context to app (last, so that it stops first)."""
        self._app = app
        app.cleanup_ctx.append(self._context)

    def listening(self, *_: object) -> None:
        """Every listener is bound (aiohttp's run_app calls its `print` after starting each site)."""
        self.notifier.send("READY=1", f"STATUS=serving on {', '.join(self._addresses)}")
        log.info("ready: serving on %s", ", ".join(self._addresses))

    async def _context(self, app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._spawn, self.reload)
        if (interval := watchdog_interval()) is not None:
            self._spawn(self._watchdog, interval)
        if self.notifier.enabled:
            self._spawn(self._status_lines)
        try:
            yield
        finally:
            self.notifier.send("STOPPING=1", "STATUS=stopping: ending downloads, draining the persist queue")
            loop.remove_signal_handler(signal.SIGHUP)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self.notifier.close()

    def _spawn(self, job: object, *args: object) -> None:
        task = asyncio.get_running_loop().create_task(job(*args))  # type: ignore[operator]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watchdog(self, interval: float) -> None:
        # Sent from the event loop itself: a loop blocked for WatchdogSec= gets the service restarted.
        while True:
            self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _status_lines(self) -> None:
        assert self._app is not None
        while True:
            await asyncio.sleep(STATUS_EVERY)
            svc, ops = self._app[SERVICES], self._app.get(OPERATIONS)
            hour = ops.recorder.ratios()["hour"] if ops is not None else {}
            ratio = hour.get("hit_ratio")
            hits = f"{100 * float(ratio):.0f}% hits" if ratio is not None else "no requests"
            self.notifier.send(
                f"STATUS=serving on {', '.join(self._addresses)}; {len(svc.inflight)} downloads in flight; "
                f"{hits} in the last hour"
            )

    async def reload(self) -> None:
        """SIGHUP: reopen log files, reload the configuration's reloadable parts."""
        assert self._app is not None
        loop = asyncio.get_running_loop()
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}", "STATUS=reloading")
        try:
            if self._log_files is not None:
                await loop.run_in_executor(None, self._log_files.reopen)
            if self._source is not None:
                await self._reload_config(self._source)
                # The policies' own SIGHUP handler is replaced by this one: asyncio keeps one.
                self._app[SERVICES].policies.reload()
        except Exception as exc:  # a reload must never take the proxy down
            log.error("reload failed: %s", exc)
        finally:
            self.notifier.send("READY=1", f"STATUS=serving on {', '.join(self._addresses)}")

    async def _reload_config(self, source: Path) -> None:
        assert self._app is not None
        loop = asyncio.get_running_loop()
        try:
            new = await loop.run_in_executor(None, load_config, source)
        except ConfigError as exc:
            log.error("reload: %s; the running configuration stays", exc)
            return
        svc = self._app[SERVICES]
        merged, ignored = merge_reload(svc.config, new)
        added = sorted(set(merged.channels) - set(svc.config.channels))
        removed = sorted(set(svc.config.channels) - set(merged.channels))
        changed = sorted(
            n
            for n in set(merged.channels) & set(svc.config.channels)
            if merged.channels[n] != svc.config.channels[n]
        )
        svc.config = merged
        svc.fetcher.config = merged
        ops = self._app.get(OPERATIONS)
        if ops is not None and ops.admin is not None:
            try:
                await ops.admin.load()
            except ConfigError as exc:
                log.error("reload: %s; the admin token stays", exc)
        log.info(
            "reloaded %s: channels added %s, removed %s, changed %s",
            source,
            ", ".join(added) or "none",
            ", ".join(removed) or "none",
            ", ".join(changed) or "none",
        )
        if ignored:
            log.warning("reload: changes to %s take effect at the next restart", ", ".join(ignored))
