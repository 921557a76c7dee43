"""The persist queue: verified downloads move into the blob store, then become visible.

Order per job (rule 1, "complete or invisible"): record the pending put -> store.put (fsync,
link, fsync dir) -> commit the catalog row and drop the put's own pending mark in one
transaction. A crash anywhere leaves at worst a pending blob, which the next start deletes.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.catalog.unit_rows import Put
from condaproxy.cache.removal import delete_released
from condaproxy.cache.unit import Unit
from condaproxy.errors import CatalogBusy
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
        self, store: BlobStore, catalog: Catalog, metrics: Metrics, workers: int, maxsize: int = 256
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._metrics = metrics
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize)
        self.active = 0  # jobs a worker is storing now
        self._workers = [
            asyncio.get_running_loop().create_task(self._work(), name=f"persist-{i}") for i in range(workers)
        ]

    async def persist(self, unit: Unit, temp_path: Path) -> Unit:
        """Queue the job and wait until the unit is visible (raises if persisting failed)."""
        job = Job(unit, temp_path)
        await self._queue.put(job)
        # The caller (a download task) may be cancelled at shutdown; the worker finishes anyway.
        return await asyncio.shield(job.done)

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            self.active += 1
            try:
                unit = await self._persist(job)
            except asyncio.CancelledError:
                if not job.done.done():
                    job.done.cancel()
                raise
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

    async def _persist(self, job: Job) -> Unit:
        # A catalog locked by another process is transient: the temp file is still there (its
        # download waits for us), so try again rather than lose a verified unit.
        for attempt in range(1, BUSY_ATTEMPTS + 1):
            try:
                return await self._persist_once(job)
            except CatalogBusy as exc:
                if attempt == BUSY_ATTEMPTS:
                    raise
                log.warning("catalog busy while persisting %s (%s); trying again", job.unit.key, exc)
                await asyncio.sleep(BUSY_BACKOFF * attempt)
        raise AssertionError("unreachable")

    async def _persist_once(self, job: Job) -> Unit:
        put = await self._catalog.begin_put(job.unit.blob_key)
        try:
            await self._store.put(put.blob_key, job.temp_path)
            replaced = await self._catalog.complete(job.unit, put)
        except BaseException:
            # Shielded whole: a blob the catalog hands over for deletion must be deleted and
            # released, or puts of the same bytes would wait for it forever.
            await asyncio.shield(self._abandon(put))
            raise
        if replaced is not None:
            await delete_released(self._catalog, self._store, replaced)
        return job.unit

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
