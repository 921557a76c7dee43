"""The ledger: when the proxy first saw each record, per channel, subdir and file name.

Written once and never changed (CEP-47's rule for indexed_timestamp), by the digest learner as
documents pass through (learning.py); read here to tell each record's effective time. A subdir's
ledger begins the first time a whole repodata.json is read: the records in it were not new then.
"""

from __future__ import annotations

from dataclasses import dataclass

from condaproxy.cache.catalog.db import CatalogDB


@dataclass(frozen=True, slots=True)
class Sighting:
    """One ledger row: the record's first sighting and the times it carried then."""

    filename: str
    name: str
    first_seen: float
    timestamp: float | None
    indexed_timestamp: float | None


def _sighting(row: object) -> Sighting:
    r = row
    return Sighting(r["filename"], r["name"], r["first_seen"], r["timestamp"], r["indexed_timestamp"])  # type: ignore[index]


class LedgerRows(CatalogDB):
    """Reading the ledger."""

    async def ledger_since(self, channel: str, subdir: str) -> float | None:
        """When the subdir's ledger began (None: no whole repodata.json read yet)."""
        rows = await self._read(
            "SELECT since FROM ledger_subdirs WHERE channel=? AND subdir=?", (channel, subdir)
        )
        return float(rows[0]["since"]) if rows else None

    async def sightings_after(self, channel: str, subdir: str, since: float) -> dict[str, float]:
        """filename -> first sighting, for the records that appeared after the ledger began."""
        rows = await self._read(
            "SELECT filename, first_seen FROM ledger WHERE channel=? AND subdir=? AND first_seen>?",
            (channel, subdir, since),
        )
        return {r["filename"]: r["first_seen"] for r in rows}

    async def sighting(self, channel: str, subdir: str, filename: str) -> Sighting | None:
        """The ledger row of one record."""
        rows = await self._read(
            "SELECT * FROM ledger WHERE channel=? AND subdir=? AND filename=?", (channel, subdir, filename)
        )
        return _sighting(rows[0]) if rows else None

    async def newer_than(self, channel: str, subdir: str, moment: float, unknown: bool) -> list[Sighting]:
        """Records that may have appeared after moment (a superset: the caller applies the rules).

        unknown: also those that carry no time at all.
        """
        rows = await self._read(
            """SELECT * FROM ledger WHERE channel=? AND subdir=? AND (indexed_timestamp>? OR first_seen>?
               OR timestamp>? OR (? AND indexed_timestamp IS NULL AND timestamp IS NULL))""",
            (channel, subdir, moment, moment, moment, unknown),
        )
        return [_sighting(r) for r in rows]
