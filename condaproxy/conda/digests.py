"""Package digests as the channel states them: (filename, sha256, size) from repodata or a shard.

Synchronous and streaming, for executor threads: repodata is parsed as a stream of JSON events
(ijson), never loaded whole; where the digests are written is the caller's business.

A hostile document must cost little to refuse. The parser is ijson's basic event stream,
which names no path: ijson.parse builds a prefix string per event that grows with the nesting,
so 120 KB of `[` nested 60,000 deep cost gigabytes. Here the depth is counted and bounded,
and so is the work (events) per document.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO

import ijson

from condaproxy.conda.decoding import MAX_DEPTH, Bounded, open_decoded
from condaproxy.conda.shards import RECORD_KEYS, Digest, iter_shard_digests
from condaproxy.errors import RefusedDocument

__all__ = ["Digest", "digests_in", "iter_repodata_digests", "iter_shard_digests", "work_budget"]

# ijson buffers a whole string before emitting it, in superlinear time (16 MB: a second; 300 MB:
# minutes and a GB of memory). No real record holds a token of megabytes: stop feeding one.
MAX_TOKEN_BYTES = 4 * 1024 * 1024
# Work per document, in parser events (one per token): real repodata gives under one event per
# byte of its .zst or .bz2 (conda-forge's: ~15 bytes of JSON a token, inflated ~8-fold, so ~0.5),
# and never more than one per byte of plain JSON. A document giving more than EVENTS_PER_BYTE per
# byte of the file as stored (MIN_EVENTS for small files) is refused.
EVENTS_PER_BYTE = 16
MIN_EVENTS = 1 << 20


def work_budget(stored_size: int) -> int:
    """The parser events a repodata file of stored_size bytes (compressed or not) may cost."""
    return max(MIN_EVENTS, EVENTS_PER_BYTE * stored_size)


def iter_repodata_digests(stream: IO[bytes], max_events: int | None = None) -> Iterator[Digest]:
    """Yield (filename, sha256, size) for every record of a repodata.json stream.

    Only a record's own top-level `sha256` and `size` count (nested ones are other things).
    RefusedDocument past MAX_DEPTH, max_events or MAX_TOKEN_BYTES.
    """
    limit = max_events if max_events is not None else float("inf")
    depth = 0  # containers open around the next event
    top_key: str | None = None  # the document's key whose value is being read
    in_records = False  # inside the map of a RECORD_KEYS key
    in_record = False  # directly inside one record's map
    current: str | None = None
    field: str | None = None
    sha: str | None = None
    size: int | None = None
    guard = Bounded(stream, MAX_TOKEN_BYTES, "a single JSON token runs", reason="token")
    for events, (event, value) in enumerate(ijson.basic_parse(guard, use_float=True), 1):
        guard.count = 0  # the parser made progress: the budget is per token, not per file
        if events > limit:
            raise RefusedDocument("work", f"repodata past {max_events} parser events: refused")
        if event == "map_key":
            if depth == 1:
                top_key = value
            elif depth == 2 and in_records:
                if current is not None and sha is not None:
                    yield current, sha, size
                current, sha, size, field = value, None, None, None
            elif depth == 3 and in_record:
                field = value
        elif event == "start_map" or event == "start_array":
            depth += 1
            if depth > MAX_DEPTH:
                raise RefusedDocument("depth", f"repodata nests deeper than {MAX_DEPTH} levels: refused")
            if depth == 2:
                in_records = event == "start_map" and top_key in RECORD_KEYS
            elif depth == 3 and in_records:
                in_record = event == "start_map" and current is not None
        elif event == "end_map" or event == "end_array":
            if depth == 2 and in_records:
                if current is not None and sha is not None:
                    yield current, sha, size
                current, in_records = None, False
            elif depth == 3:
                in_record = False
            depth -= 1
        elif depth == 3 and in_record:
            if field == "sha256" and event == "string":
                sha = value.lower()
            elif field == "size" and event == "number":
                size = int(value)


def digests_in(path: Path, filename: str) -> Iterator[Digest]:
    """The digests a repodata file (any encoding) or a shard (shards/<sha256>.msgpack.zst) states."""
    if filename.startswith("shards/"):
        yield from iter_shard_digests(path)
        return
    budget = work_budget(path.stat().st_size)
    with open_decoded(path, filename) as stream:
        yield from iter_repodata_digests(stream, budget)
