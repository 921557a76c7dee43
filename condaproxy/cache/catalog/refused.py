"""Documents refused by a reader (past a nesting, work, size or object bound), remembered by sha256.

Remembered so that a document is read (and refused) once: a restart, a second channel serving
the same bytes or a variant derived from it does not read it again. Bounded, oldest dropped.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from condaproxy.cache.catalog.db import CatalogDB

# A row is ~150 bytes; only an upstream serving hostile documents adds any.
MAX_REFUSED = 10_000


class RefusedRows(CatalogDB):
    """The refused_documents table."""

    async def refused(self, shas: Iterable[str]) -> str | None:
        """Why one of these documents was refused, if one was."""
        wanted = list(shas)
        marks = ", ".join("?" * len(wanted))
        rows = await self._read(f"SELECT reason FROM refused_documents WHERE sha256 IN ({marks})", wanted)
        return str(rows[0]["reason"]) if rows else None

    async def refuse(self, sha256: str, reason: str, path: str) -> bool:
        """Remember a refused document; False when it already was."""
        async with self.transaction() as tx:
            rows = await tx.execute(
                """INSERT INTO refused_documents (sha256, reason, path, refused_at) VALUES (?, ?, ?, ?)
                   ON CONFLICT (sha256) DO NOTHING RETURNING sha256""",
                (sha256, reason, path, time.time()),
            )
            if rows:
                await tx.execute(
                    """DELETE FROM refused_documents WHERE sha256 NOT IN
                       (SELECT sha256 FROM refused_documents ORDER BY refused_at DESC LIMIT ?)""",
                    (MAX_REFUSED,),
                )
        return bool(rows)
