"""Deleting what the catalog lets go of: a blob no row uses any more.

Every removal ends here (eviction, the scrub, a reader that finds its blob gone, a put that
replaced or abandoned a blob). The catalog hands the blob over claimed, so that a put of the
same bytes waits, and marked pending, so that a crash before the delete is swept at the next
start; blob_deleted() then clears the mark and lets puts go on.
"""

from __future__ import annotations

import asyncio

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.conda.paths import UnitKey
from condaproxy.store.blobstore import BlobStore


async def delete_released(catalog: Catalog, store: BlobStore, blob_key: str) -> None:
    """Delete a blob the catalog handed over, then tell the catalog."""
    deleted = False
    try:
        await store.delete(blob_key)
        deleted = True
    finally:
        # Not deleted: the blob stays marked pending, and the next start sweeps it.
        await asyncio.shield(catalog.blob_deleted(blob_key, deleted))


async def remove_unit(catalog: Catalog, store: BlobStore, key: UnitKey, blob_key: str) -> bool:
    """Drop key's row if it still holds blob_key, and the blob once no row uses it.

    False when the row holds another blob by now (a revalidation replaced it): that one stays.
    """
    dropped = await catalog.remove(key, blob_key)
    if dropped.orphan is not None:
        await delete_released(catalog, store, dropped.orphan)
    return dropped.removed
