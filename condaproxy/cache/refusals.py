"""Documents a reader refused: remembered by sha256 so that they are never read again, and counted."""

from __future__ import annotations

import logging

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.unit import Unit
from condaproxy.conda.paths import UnitKey
from condaproxy.errors import CatalogBusy, RefusedDocument
from condaproxy.metrics import Metrics

log = logging.getLogger(__name__)


class Refusals:
    """Asks and tells the catalog's refused_documents table; counts each document once."""

    def __init__(self, catalog: Catalog, metrics: Metrics) -> None:
        self._catalog = catalog
        self._metrics = metrics

    async def known(self, unit: Unit) -> str | None:
        """Why unit's bytes, or those it was made from, were refused; None if they never were."""
        shas = [unit.sha256] if unit.source is None else [unit.sha256, unit.source]
        return await self._catalog.refused(shas)

    async def record(self, sha256: str, key: UnitKey, exc: RefusedDocument) -> None:
        """Remember and count a refusal (a document already refused is not counted again)."""
        log.warning("refused to read %s (sha256 %s): %s", key, sha256, exc)
        try:
            new = await self._catalog.refuse(sha256, exc.reason, str(key))
        except CatalogBusy:
            log.warning("could not remember the refusal of %s: catalog busy", key)
            new = True  # counted now; it may be read (and refused) once more
        if new:
            self._metrics.refused_documents.labels(exc.reason).inc()
