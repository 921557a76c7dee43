"""The periodic scrub: `condaproxy verify` inside the running proxy, every [cache] scrub_interval.

Each pass re-hashes every blob, one at a time in the CPU pool (never on the loop, and never in
the executor that serves hits). A blob
that no longer matches its name or its rows' size is purged through the catalog exactly like an
eviction: the rows go first, the blob is marked pending while it is deleted, and a put of the
same bytes waits meanwhile (it would otherwise trust the damaged file that is about to go).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.cpu import CpuPool
from condaproxy.cache.removal import delete_released
from condaproxy.cache.verify import check_blob
from condaproxy.metrics import Metrics
from condaproxy.store.blobstore import BlobStore

log = logging.getLogger(__name__)

PAGE = 256  # blobs per catalog read


class Scrubber:
    """Re-hashes the store every interval seconds; owned by the application."""

    def __init__(
        self, interval: float, catalog: Catalog, store: BlobStore, metrics: Metrics, cpu: CpuPool
    ) -> None:
        self.interval = interval
        self._cpu = cpu
        self._catalog = catalog
        self._store = store
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        state = "running" if self._task is not None and not self._task.done() else "idle"
        return f"<Scrubber {state} every {self.interval}s>"

    def start(self) -> None:
        """Run a pass every interval seconds until close()."""
        if self._task is not None:
            raise RuntimeError(f"{self!r} already started")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="scrub")

    async def close(self) -> None:
        """Stop (a pass in progress stops between blobs); safe to call twice."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.run_once()
            except Exception as exc:  # the next pass tries again; serving goes on regardless
                log.warning("scrub pass failed: %s", exc)

    async def run_once(self) -> int:
        """One pass over every blob; returns how many damaged blobs were purged."""
        checked = purged = 0
        after = ""
        # A page of blobs at a time, each with only its rows' sizes: a pass holds PAGE blob keys,
        # never the catalog's rows (~2 KB each with their headers: a gigabyte at 500,000 units).
        while page := await self._catalog.blob_page(after, PAGE):
            for blob_key, sizes in page:
                path = self._store.local_path(blob_key)
                if path is None:
                    continue  # remote stores check themselves
                checked += 1
                problem = await self._cpu.run(check_blob, path, blob_key, sizes)
                if problem is not None and await self._purge(blob_key, problem):
                    purged += 1
            after = page[-1][0]
        log.info("scrub pass: %d blobs checked, %d purged", checked, purged)
        return purged

    async def _purge(self, blob_key: str, problem: str) -> bool:
        dropped = await self._catalog.purge_blob(blob_key)
        for key in dropped.keys:
            log.error("scrub: purged %s: %s", key, problem)
            self._metrics.scrub_purged.inc()
        if dropped.orphan is None:
            return False
        await delete_released(self._catalog, self._store, dropped.orphan)
        return True
