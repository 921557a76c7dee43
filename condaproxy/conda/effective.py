"""When a record appeared: its effective time from CEP-47 `indexed_timestamp`, the proxy's own
first sighting, or the record's `timestamp` - in that order, each only where it can be trusted.

A record's `timestamp` is the builder's claim and may be old on purpose (a hijacked account
re-publishing with a back-dated build); the proxy's own ledger of first sightings is not, but
only for records that appeared after the ledger for the subdir began: those present at its start
were first seen then, whenever they were really published.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The largest time in seconds that still reads as a date (9999-12-31T23:59:59Z); conda and
# rattler read larger values as milliseconds.
MAX_SECONDS = 253402300799


def normalise(value: object) -> float | None:
    """A record time in seconds since the epoch (milliseconds converted), or None if it is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if value != value or value <= 0:  # NaN, zero and negatives say nothing
        return None
    seconds = float(value) / 1000.0 if value > MAX_SECONDS else float(value)
    return seconds if seconds <= MAX_SECONDS else None


def effective_time(record: Mapping[str, Any], first_seen: float | None, since: float | None) -> float | None:
    """The time the record appeared, or None when nothing says.

    first_seen is the ledger's first sighting of the record (None: never seen); since is when
    the ledger for its subdir began (None: not yet). A sighting counts only when it is later
    than since: a record already there when the ledger began was not new then.
    """
    indexed = normalise(record.get("indexed_timestamp"))
    if indexed is not None:
        return indexed
    if first_seen is not None and since is not None and first_seen > since:
        return first_seen
    return normalise(record.get("timestamp"))
