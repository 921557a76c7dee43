"""The unit catalog: SQLite (WAL) rows saying which units are complete in the blob store.

One writer and one reader connection, reached through a small class per job: unit rows,
learned metadata, eviction, the ledger of first sightings, the revision history and refused
documents.
"""

from __future__ import annotations

from condaproxy.cache.catalog.eviction import EvictionRows
from condaproxy.cache.catalog.learned import LearnedRows
from condaproxy.cache.catalog.ledger import LedgerRows
from condaproxy.cache.catalog.refused import RefusedRows
from condaproxy.cache.catalog.revisions import RevisionRows
from condaproxy.cache.catalog.summary import SummaryRows
from condaproxy.cache.catalog.unit_rows import UnitRows


class Catalog(UnitRows, LearnedRows, EvictionRows, LedgerRows, RevisionRows, RefusedRows, SummaryRows):
    """Async access to the catalog; the only writer of unit rows."""

    async def close(self) -> None:
        """Flush access statistics and close; safe to call twice."""
        if self._db is None:
            return
        try:
            await self.flush_touches()
        finally:
            async with self._lock:  # a transaction still running keeps its connection
                db, self._db = self._db, None  # type: ignore[assignment]
                reader, self._reader = self._reader, None  # type: ignore[assignment]
                try:
                    await db.close()
                finally:
                    await reader.close()
