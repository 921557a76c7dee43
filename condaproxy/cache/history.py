"""Bounding the revision history: revisions superseded longer ago than [cache] history are dropped."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.removal import remove_unit
from condaproxy.store.blobstore import BlobStore

log = logging.getLogger(__name__)

PRUNE_INTERVAL = 3600.0


async def prune(catalog: Catalog, store: BlobStore, history: float, now: float) -> int:
    """Drop revisions superseded before now - history, and their blobs no row needs; returns how many."""
    gone = await catalog.prune_revisions(now - history)
    for key in gone:
        if (unit := await catalog.get(key)) is not None:
            await remove_unit(catalog, store, key, unit.blob_key)
    return len(gone)


async def prune_forever(
    catalog: Catalog, store: BlobStore, history: Callable[[], float], clock: Callable[[], float]
) -> None:
    """Prune once an hour, until cancelled."""
    while True:
        try:
            if count := await prune(catalog, store, history(), clock()):
                log.info("dropped %d repodata revisions older than the history kept", count)
        except Exception as exc:  # history is a convenience: never worth dying for
            log.warning("could not prune the revision history: %s", exc)
        await asyncio.sleep(PRUNE_INTERVAL)
