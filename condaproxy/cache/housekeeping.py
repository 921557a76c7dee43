"""Housekeeping of the cache: what a crash may leave behind, swept at start, and batched statistics."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.store.blobstore import BlobStore

log = logging.getLogger(__name__)

TOUCH_FLUSH_INTERVAL = 5.0


def reset_temp_dir(temp: Path) -> None:
    """Empty the temp directory (run it in an executor)."""
    # Temp files are never valid after a restart: their downloads died with the process.
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir(parents=True)


async def sweep(catalog: Catalog, store: BlobStore) -> None:
    """Delete what a crash can leave in the store: blobs no committed row references.

    Pending puts are the usual case; a kill between committing a row that replaced (or
    dropped) a blob and deleting the old blob leaves one too, unmarked, so every key is checked.
    Learned rows of subdirs whose metadata is gone (an older catalog kept them) go too.

    A shared store (S3) is another matter: an object there exists only whole and verified,
    and other nodes may index it, so this node only clears its own pending marks; it never
    lists the bucket and deletes nothing from it. Stray multipart parts of an upload a crash
    interrupted are the bucket's lifecycle rule's to remove (README: the S3 store).
    """
    orphans = await catalog.pending_orphans()
    if store.shared:
        if orphans:
            log.info(
                "cleared %d pending puts of a previous run (objects in the shared store stay)", len(orphans)
            )
    else:
        for key in orphans:
            log.info("sweeping blob %s left by an interrupted persist", key)
            await store.delete(key)
        referenced = await catalog.referenced_blobs()
        async for key in store.keys():
            if key not in referenced:
                log.info("sweeping blob %s that no catalog row references", key)
                await store.delete(key)
    for name in await store.remove_partials():
        log.info("swept %s, a partial copy left by an interrupted put", name)
    if await catalog.forget_unowned():
        log.info("dropped digests and bases learned for subdirs whose metadata is no longer cached")
        await catalog.reclaim()


async def flush_touches_forever(catalog: Catalog) -> None:
    """Write buffered access statistics every few seconds, until cancelled."""
    while True:
        await asyncio.sleep(TOUCH_FLUSH_INTERVAL)
        try:
            await catalog.flush_touches()
        except Exception as exc:  # statistics only: never worth dying for
            log.warning("could not record access statistics: %s", exc)
