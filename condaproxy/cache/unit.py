"""Unit: one complete unit as the catalog records it, and what is needed to serve and revalidate it."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field

from condaproxy.conda.paths import Kind, UnitKey

COMPLETE = "complete"
REPRESENTATION_HEADERS = frozenset(
    {"ETag", "Last-Modified", "Content-Type", "Content-Encoding", "Content-Md5"}
)


# Packages and shards are kept for good, and their headers with them: one upstream response
# with a stray header (Content-Encoding: gzip on plain bytes breaks every decoding client) must
# not be replayed forever, so they carry only these, and a type no browser renders.
IMMUTABLE_HEADERS = ("ETag", "Last-Modified")
IMMUTABLE_TYPE = "application/octet-stream"


def kept_headers(kind: Kind, headers: Mapping[str, str]) -> dict[str, str]:
    """The upstream headers a unit is cached and served with (the proxy adds its own)."""
    if not kind.immutable:
        return dict(headers)
    kept = {name: headers[name] for name in IMMUTABLE_HEADERS if name in headers}
    return {"Content-Type": IMMUTABLE_TYPE, **kept}


@dataclass(frozen=True, slots=True)
class Unit:
    """A catalog row: a complete unit and what is needed to serve and revalidate it."""

    key: UnitKey
    upstream_url: str
    blob_key: str
    sha256: str
    size: int
    headers: dict[str, str] = field(hash=False)
    etag: str | None
    last_modified: str | None
    fetched_at: float
    validated_at: float
    state: str = COMPLETE
    source: str | None = None  # a derived unit: blob key of the variant it was made from


def unit_from_row(row: sqlite3.Row) -> Unit:
    return Unit(
        key=UnitKey(row["channel"], row["subdir"], row["filename"], Kind(row["kind"])),
        upstream_url=row["upstream_url"],
        blob_key=row["blob_key"],
        sha256=row["sha256"],
        size=row["size"],
        headers=json.loads(row["headers"]),
        etag=row["etag"],
        last_modified=row["last_modified"],
        fetched_at=row["fetched_at"],
        validated_at=row["validated_at"],
        state=row["state"],
        source=row["source_blob"],
    )
