"""The persist queue: verified downloads move into the blob store, then become visible.

Order per job (rule 1, "complete or invisible"): record the pending put -> store.put (fsync,
link, fsync dir; or the S3 upload) -> commit the catalog row and drop the put's own pending
mark in one transaction. A crash anywhere leaves at worst a pending blob, which the next start
deletes (on a shared store, only the mark: see housekeeping.sweep).

The queue is bounded and never blocks a download: past the bound a unit is served but not
stored, and the log says so. A store that is unavailable (S3 down or slow) hands the job to
the backlog (backlog.py), which tries again with backoff.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from condaproxy.cache.backlog import Deferred, PersistBacklog
from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.catalog.unit_rows import Put
from condaproxy.cache.removal import delete_released
from condaproxy.cache.unit import Unit
from condaproxy.errors import CatalogBusy, StoreUnavailable
from condaproxy.metrics import Metrics
from condaproxy.store.blobstore import BlobStore

log = logging.getLogger(__name__)

# Each attempt already waits out SQLite's own busy timeout (catalog.BUSY_TIMEOUT_MS).
BUSY_ATTEMPTS = 3
BUSY_BACKOFF = 0.5


@dataclass(eq=False)
class Job:
    """One verified temp file to store, and the row that makes it visible."""

    unit: Unit
    temp_path: Path
    done: asyncio.Future[Unit] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class PersistQueue:
    """A bounded queue drained by a few workers; owned by the application."""

    def __init__(
        self,
        store: BlobStore,
        catalog: Catalog,
        metrics: Metrics,
        workers: int,
        maxsize: int = 256,
        *,
        backlog_dir: Path | None = None,
        backlog_limit: int = 1000,
        retry_max: float = 300.0,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._metrics = metrics
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize)
        metrics.persist_queued.set_function(self._queue.qsize)
        self.active = 0  # jobs a worker is storing now
        # Only a store that can be down while the proxy is up (S3) needs one.
        self.backlog = (
            PersistBacklog(
                backlog_dir, self._persist, catalog, metrics, limit=backlog_limit, retry_max=retry_max
            )
            if backlog_dir is not None
            else None
        )
        self._workers = [
            asyncio.get_running_loop().create_task(self._work(), name=f"persist-{i}") for i in range(workers)
        ]

    async def persist(self, unit: Unit, temp_path: Path) -> Unit:
        """Queue the job and wait until the unit is visible.

        Raises Deferred when the store refused it for now (the backlog tries again), and any
        other exception when it is not stored at all (a full queue, a failed put).
        """
        job = Job(unit, temp_path)
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self._metrics.persist_dropped.inc()
            log.warning(
                "%s: served but not stored: %d persists already queued", unit.key, self._queue.maxsize
            )
            raise
        # The caller (a download task) may be cancelled at shutdown; the worker finishes anyway.
        return await asyncio.shield(job.done)

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            self.active += 1
            try:
                unit = await self._persist(job.unit, job.temp_path)
            except asyncio.CancelledError:
                if not job.done.done():
                    job.done.cancel()
                raise
            except StoreUnavailable as exc:
                self._metrics.persist_failures.inc()
                log.warning("could not persist %s: %s", job.unit.key, exc)
                deferred = self.backlog is not None and await self.backlog.defer(job.unit, job.temp_path)
                if not job.done.done():
                    job.done.set_exception(Deferred(str(exc)) if deferred else exc)
            except Exception as exc:
                self._metrics.persist_failures.inc()
                log.error("could not persist %s: %s", job.unit.key, exc)
                if not job.done.done():
                    job.done.set_exception(exc)
            else:
                self._metrics.persisted.labels(job.unit.key.kind.value).inc()
                if not job.done.done():
                    job.done.set_result(unit)
            finally:
                self.active -= 1
                self._queue.task_done()

    @property
    def queued(self) -> int:
        """Jobs waiting for a worker."""
        return self._queue.qsize()

    async def _persist(self, unit: Unit, temp_path: Path) -> Unit:
        # A catalog locked by another process is transient: the temp file is still there (its
        # download waits for us), so try again rather than lose a verified unit.
        for attempt in range(1, BUSY_ATTEMPTS + 1):
            try:
                return await self._persist_once(unit, temp_path)
            except CatalogBusy as exc:
                if attempt == BUSY_ATTEMPTS:
                    raise
                log.warning("catalog busy while persisting %s (%s); trying again", unit.key, exc)
                await asyncio.sleep(BUSY_BACKOFF * attempt)
        raise AssertionError("unreachable")

    async def _persist_once(self, unit: Unit, temp_path: Path) -> Unit:
        put = await self._catalog.begin_put(unit.blob_key)
        try:
            await self._store.put(put.blob_key, temp_path)
            replaced = await self._catalog.complete(unit, put)
        except BaseException:
            # Shielded whole: a blob the catalog hands over for deletion must be deleted and
            # released, or puts of the same bytes would wait for it forever.
            await asyncio.shield(self._abandon(put))
            raise
        if replaced is not None:
            await delete_released(self._catalog, self._store, replaced)
        return unit

    async def _abandon(self, put: Put) -> None:
        if await self._catalog.abandon_put(put):
            await delete_released(self._catalog, self._store, put.blob_key)

    async def close(self, timeout: float = 30.0) -> None:
        """Finish queued jobs (bounded by timeout), then stop the workers."""
        try:
            async with asyncio.timeout(timeout):
                await self._queue.join()
        except TimeoutError:
            log.warning("persist queue not drained within %.0fs", timeout)
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self.backlog is not None:
            await self.backlog.close()
