"""Package digests as the channel states them: (filename, sha256, size) from repodata or a shard.

Synchronous and streaming, for executor threads: repodata is parsed as a stream of JSON events
(ijson), never loaded whole; where the digests are written is the caller's business.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO

import ijson

from condaproxy.conda.decoding import Bounded, open_decoded
from condaproxy.conda.shards import RECORD_KEYS, unpack_zst_msgpack

# ijson buffers a whole string before emitting it, in superlinear time (16 MB: a second; 300 MB:
# minutes and a GB of memory). No real record holds a token of megabytes: stop feeding one.
MAX_TOKEN_BYTES = 4 * 1024 * 1024

Digest = tuple[str, str, int | None]  # filename, sha256 hex, size


def iter_repodata_digests(stream: IO[bytes]) -> Iterator[Digest]:
    """Yield (filename, sha256, size) for every record of a repodata.json stream."""
    current: str | None = None
    sha: str | None = None
    size: int | None = None
    depth_prefix = ""
    guard = Bounded(stream, MAX_TOKEN_BYTES, "a single JSON token runs")
    for prefix, event, value in ijson.parse(guard, use_float=True):
        guard.count = 0  # the parser made progress: the budget is per token, not per file
        if event == "map_key" and prefix in RECORD_KEYS:
            if current is not None and sha is not None:
                yield current, sha, size
            current, sha, size = value, None, None
            depth_prefix = f"{prefix}.{value}"
        elif current is not None and prefix.startswith(depth_prefix):
            if prefix == f"{depth_prefix}.sha256" and event == "string":
                sha = value.lower()
            elif prefix == f"{depth_prefix}.size" and event == "number":
                size = int(value)
        elif event == "end_map" and prefix in RECORD_KEYS:
            if current is not None and sha is not None:
                yield current, sha, size
            current = None
    if current is not None and sha is not None:
        yield current, sha, size


def iter_shard_digests(path: Path) -> Iterator[Digest]:
    """Yield (filename, sha256, size) from a CEP-16 shard (sha256 stored as raw bytes)."""
    shard = unpack_zst_msgpack(path)
    for key in RECORD_KEYS:
        for filename, record in (shard.get(key) or {}).items():
            sha = record.get("sha256")
            if isinstance(sha, bytes):
                sha = sha.hex()
            if isinstance(sha, str):
                size = record.get("size")
                yield filename, sha.lower(), int(size) if size is not None else None


def digests_in(path: Path, filename: str) -> Iterator[Digest]:
    """The digests a repodata file (any encoding) or a shard (shards/<sha256>.msgpack.zst) states."""
    if filename.startswith("shards/"):
        yield from iter_shard_digests(path)
        return
    with open_decoded(path, filename) as stream:
        yield from iter_repodata_digests(stream)
