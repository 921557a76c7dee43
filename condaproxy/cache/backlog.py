"""The persist backlog: verified downloads the store refused for now, tried again with backoff.

S3 down or slow must never cost a client a download: the clients attached to a download got
every byte from the upstream already; only its persist waits. The backlog keeps its own hard
link of the verified temp file (the download's own goes when its readers leave), tries the
persist again with exponential backoff, and the unit's row becomes complete only once the blob
landed. It is bounded: past `limit` jobs a new one is dropped (served, not stored) and said so.
The files live under the temp directory, which every start empties: a restart forgets the
backlog, and those units are simply fetched again when next asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.unit import Unit
from condaproxy.conda.paths import UnitKey
from condaproxy.errors import StoreUnavailable
from condaproxy.metrics import Metrics
from condaproxy.store.files import unlink_all

log = logging.getLogger(__name__)

RETRY_MIN = 1.0  # first wait, doubled after each failure up to retry_max


class Deferred(Exception):
    """The unit was served but is not stored yet: the backlog tries again later."""


@dataclass(eq=False)
class _Entry:
    unit: Unit
    path: Path
    failures: int
    due: float


Attempt = Callable[[Unit, Path], Awaitable[Unit]]


def backoff(failures: int, retry_max: float, jitter: float) -> float:
    """Seconds before the next try after `failures` failures (jitter in [0, 1) spreads nodes apart)."""
    base = min(RETRY_MIN, retry_max) * 2.0 ** min(failures - 1, 30)
    return min(retry_max, base) * (0.5 + jitter / 2)


class PersistBacklog:
    """Bounded retries of refused persists; one task, owned by the persist queue."""

    def __init__(
        self,
        directory: Path,
        attempt: Attempt,
        catalog: Catalog,
        metrics: Metrics,
        *,
        limit: int,
        retry_max: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self._attempt = attempt
        self._catalog = catalog
        self._metrics = metrics
        self.limit = limit
        self.retry_max = retry_max
        self._clock = clock
        self._entries: dict[UnitKey, _Entry] = {}
        self._serial = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<PersistBacklog {len(self._entries)}/{self.limit}>"

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[UnitKey]:
        """The units waiting for the store."""
        return list(self._entries)

    async def defer(self, unit: Unit, temp_path: Path) -> bool:
        """Keep a copy of temp_path and try the persist again later; False when the backlog is full."""
        replaced = self._entries.get(unit.key)
        if replaced is None and len(self._entries) >= self.limit:
            self._metrics.persist_dropped.inc()
            log.warning(
                "%s: served but not stored: %d persists already wait for the store", unit.key, self.limit
            )
            return False
        self._serial += 1
        path = self.directory / f"{self._serial:08d}-{unit.blob_key}"
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, lambda: self.directory.mkdir(parents=True, exist_ok=True))
            await loop.run_in_executor(None, os.link, temp_path, path)
        except OSError as exc:
            self._metrics.persist_dropped.inc()
            log.warning(
                "%s: served but not stored: cannot keep it for later (%s)", unit.key, exc.strerror or exc
            )
            return False
        entry = _Entry(unit, path, 1, self._clock() + backoff(1, self.retry_max, random.random()))
        self._entries[unit.key] = entry  # a newer download of the same unit replaces the older
        if replaced is not None:
            await loop.run_in_executor(None, lambda: replaced.path.unlink(missing_ok=True))
        self._metrics.persist_backlog.set(len(self._entries))
        self._start()
        self._wake.set()
        return True

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="persist-backlog")

    async def _run(self) -> None:
        while self._entries:
            now = self._clock()
            due = [e for e in self._entries.values() if e.due <= now]
            if not due:
                wait = min(e.due for e in self._entries.values()) - now
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            for entry in due:
                await self._try(entry)
            self._metrics.persist_backlog.set(len(self._entries))

    async def _try(self, entry: _Entry) -> None:
        unit = entry.unit
        if self._entries.get(unit.key) is not entry:
            return  # replaced by a newer download meanwhile
        current = await self._catalog.get(unit.key)
        if current is not None and current.fetched_at >= unit.fetched_at:
            await self._forget(entry)  # a newer download of the unit landed meanwhile
            return
        try:
            await self._attempt(unit, entry.path)
        except StoreUnavailable as exc:
            self._metrics.persist_failures.inc()
            entry.failures += 1
            delay = backoff(entry.failures, self.retry_max, random.random())
            entry.due = self._clock() + delay
            log.warning("%s: store still refuses it (%s); next try in %.0fs", unit.key, exc, delay)
            return
        except Exception as exc:
            self._metrics.persist_failures.inc()
            log.error("%s: giving up storing it: %s", unit.key, exc)
        else:
            self._metrics.persisted.labels(unit.key.kind.value).inc()
            log.info("%s: stored after %d failed tries", unit.key, entry.failures)
        await self._forget(entry)

    async def _forget(self, entry: _Entry) -> None:
        if self._entries.get(entry.unit.key) is entry:
            del self._entries[entry.unit.key]
            self._metrics.persist_backlog.set(len(self._entries))
        await asyncio.get_running_loop().run_in_executor(None, lambda: entry.path.unlink(missing_ok=True))

    def retry_now(self) -> None:
        """Make every waiting persist due at once (the store is known to be back)."""
        now = self._clock()
        for entry in self._entries.values():
            entry.due = now
        self._wake.set()

    async def close(self) -> None:
        """Stop retrying; what is left is dropped (its files go with the temp directory)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._entries:
            log.warning(
                "%d verified downloads were never stored (the store did not come back)", len(self._entries)
            )
        paths = [e.path for e in self._entries.values()]
        self._entries.clear()
        self._metrics.persist_backlog.set(0)
        await asyncio.get_running_loop().run_in_executor(None, unlink_all, paths)
