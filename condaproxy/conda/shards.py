"""CEP-16 sharded repodata: the index and shard codecs, and rewriting a foreign shards_base_url.

An index may name an absolute `shards_base_url` (a CDN, another host). Passed through as it
is, clients would fetch shards from there and bypass the proxy (pixi #5092). The proxy keeps
the upstream base in the catalog, serves a copy of the index whose base is `./shards/`, and
maps `<subdir>/shards/<sha256>.msgpack.zst` requests back to the upstream base.
"""

from __future__ import annotations

from collections.abc import Container, Iterator
from pathlib import Path
from typing import IO, Any, cast
from urllib.parse import urljoin, urlsplit

import msgpack
import zstandard

from condaproxy.conda.baseurl import foreign_base
from condaproxy.conda.decoding import STEP
from condaproxy.conda.packed import MAX_LEN, MAX_STR, MAX_WINDOW, Kind, open_packed
from condaproxy.conda.urls import redacted_url
from condaproxy.errors import RefusedDocument

# Inflated sizes past which a document is refused. Most are small (conda-forge's largest index,
# ~30,000 names, inflates to a few MiB; its shards to KiB), but real channels go much further:
# conda-pypi's boto3-stubs shard inflates to 49 MB (conda/conda#16575) and its noarch index
# outgrew conda's former 16 MiB limit (conda/conda#16285). These are conda's own limits, so the
# proxy never refuses what a client would accept; memory stays bounded however large a document
# is, because it is walked as a stream (conda.packed), never unpacked whole.
MAX_INDEX_BYTES = 128 * 1024 * 1024
MAX_SHARD_BYTES = 64 * 1024 * 1024
RECORD_KEYS = ("packages", "packages.conda")
# Containers (maps, arrays) a document unpacked whole may hold (policy filtering needs whole
# shards): a record is a few, so this is ~50,000 records, more than nearly any real shard has;
# 200,000 one-entry maps cost ~50 MB before the refusal, where 100 MB of them cost 6.87 GiB.
MAX_OBJECTS = 200_000

Digest = tuple[str, str, int | None]  # filename, sha256 hex, size


def iter_shard_records(path: Path, limit: int = MAX_SHARD_BYTES) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (filename, record) from a CEP-16 shard, walked as a stream: one record in memory."""
    with open_packed(path, limit, "shard") as cur:
        for _ in range(cur.map_len()):
            if cur.key() not in RECORD_KEYS or cur.kind() is not Kind.MAP:
                cur.skip()
                continue
            for _ in range(cur.map_len()):
                filename = cur.key()
                if filename is None:
                    cur.skip()
                    continue
                record = cur.entry()
                if isinstance(record, dict):
                    yield filename, record
        cur.finish()


def iter_shard_digests(path: Path, limit: int = MAX_SHARD_BYTES) -> Iterator[Digest]:
    """Yield (filename, sha256, size) from a CEP-16 shard (sha256 stored as raw bytes)."""
    for filename, record in iter_shard_records(path, limit):
        sha = record.get("sha256")
        if isinstance(sha, bytes):
            sha = sha.hex()
        if isinstance(sha, str):
            size = record.get("size")
            yield filename, sha.lower(), int(size) if size is not None else None


def unpack_zst_msgpack(path: Path, limit: int = MAX_SHARD_BYTES) -> Any:
    """Decode a zstd-compressed msgpack document whole, within bounds; RefusedDocument past them.

    For the few readers that need the whole document (filtering a shard or an index by policy);
    everything else walks it as a stream (conda.packed).
    """
    data = bytearray()
    decoder = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
    try:
        with open(path, "rb") as raw, decoder.stream_reader(raw) as f:
            while chunk := f.read(STEP):
                data += chunk
                if len(data) > limit:
                    raise RefusedDocument("inflated", f"{path.name}: inflates past {limit} bytes: refused")
    except zstandard.ZstdError as exc:
        raise ValueError(f"{path.name}: not zstd: {exc}") from None
    count = 0

    def counted(obj: Any) -> Any:
        nonlocal count
        count += 1
        if count > MAX_OBJECTS:
            raise RefusedDocument("objects", f"{path.name}: more than {MAX_OBJECTS} maps and arrays: refused")
        return obj

    return msgpack.unpackb(
        bytes(data),
        raw=False,
        strict_map_key=False,
        max_str_len=MAX_STR,
        max_bin_len=MAX_STR,
        max_ext_len=MAX_STR,
        max_array_len=MAX_LEN,
        max_map_len=MAX_LEN,
        object_hook=counted,
        list_hook=counted,
    )


def read_shard_index(
    path: Path, names: Container[str] | None = None, limit: int = MAX_INDEX_BYTES
) -> tuple[str, dict[str, str]]:
    """A CEP-16 index: (shards_base_url, package name -> shard sha256 hex), for names only if given."""
    base = "./shards/"
    shards: dict[str, str] = {}
    with open_packed(path, limit, "shard index") as cur:
        for _ in range(cur.map_len()):
            key = cur.key()
            if key == "info":
                info = cur.entry()
                if isinstance(info, dict):
                    base = str(info.get("shards_base_url") or "./shards/")
            elif key == "shards" and cur.kind() is Kind.MAP:
                for _ in range(cur.map_len()):
                    name = cur.key()
                    if name is None or (names is not None and name not in names):
                        cur.skip()
                        continue
                    digest = cur.scalar()
                    if digest is not None:
                        shards[name] = digest.hex() if isinstance(digest, bytes) else str(digest)
            else:
                cur.skip()
        cur.finish()
    return base, shards


LOCAL_BASE = "./shards/"
_PLAIN = {"./shards/", "shards/", "./shards", "shards"}


def upstream_base(index_url: str, base: str) -> str | None:
    """The shards base an index names, or None when it is our own relative ./shards/ layout."""
    if base in _PLAIN or not base:
        return None
    resolved = urljoin(index_url, base)
    if urlsplit(resolved).scheme not in ("http", "https"):
        raise ValueError(f"unsupported shards_base_url {base!r}")
    if not resolved.endswith("/"):
        resolved += "/"
    parts = urlsplit(base)
    # Only a relative base landing on our own layout is left alone: a host or an absolute
    # path - even one naming the very same place upstream - would send clients elsewhere.
    if not (parts.scheme or parts.netloc or base.startswith("/")) and resolved == urljoin(
        index_url, LOCAL_BASE
    ):
        return None
    return redacted_url(resolved)


def rewrite_index(
    src: Path, dst: Path, index_url: str, limit: int = MAX_INDEX_BYTES
) -> tuple[str | None, str | None]:
    """Point a foreign shards base at ./shards/ and a foreign package base (CEP-15) at "".

    Returns (shards base, package base) as upstream named them, each None when it needed
    no rewrite; dst is written only when one of them did: upstream's bytes, but for the info
    map. Two streaming passes: one finds info, the other copies around it.
    """
    spans: list[tuple[int, int]] = []
    info: dict[object, object] = {}
    with open_packed(src, limit, "shard index") as cur:
        for _ in range(cur.map_len()):
            if cur.key() != "info":
                cur.skip()
                continue
            start = cur.tell()
            found = cur.entry()
            spans.append((start, cur.tell()))
            info = found if isinstance(found, dict) else {}
        cur.finish()
        end = cur.tell()
    shards_base = upstream_base(index_url, str(info.get("shards_base_url") or ""))
    package_base = foreign_base(index_url, str(info.get("base_url") or ""))
    if shards_base is None and package_base is None:
        return None, None
    if shards_base is not None:
        info["shards_base_url"] = LOCAL_BASE
    if package_base is not None:
        info["base_url"] = ""
    packed = msgpack.packb(info, use_bin_type=True)
    size = end + sum(len(packed) - (stop - start) for start, stop in spans)
    cuts = [(start, stop, packed) for start, stop in spans]
    decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
    with (
        open(src, "rb") as raw,
        decompressor.stream_reader(raw) as reader,
        open(dst, "wb") as out,
        # The size goes in the frame header: some clients decode shards in one shot and need it.
        zstandard.ZstdCompressor(level=10).stream_writer(out, size=size) as writer,
    ):
        _splice(cast(IO[bytes], reader), cast(IO[bytes], writer), cuts, end)
    return shards_base, package_base


def _splice(reader: IO[bytes], writer: IO[bytes], cuts: list[tuple[int, int, bytes]], end: int) -> None:
    """Copy reader's first end bytes to writer, each cut [start, stop) replaced by its bytes."""
    pos = 0
    for start, stop, replacement in [*cuts, (end, end, b"")]:
        _copy(reader, writer, start - pos)
        writer.write(replacement)
        _copy(reader, None, stop - start)
        pos = stop


def _copy(reader: IO[bytes], writer: IO[bytes] | None, count: int) -> None:
    """Read count bytes from reader, writing them to writer (or dropping them)."""
    while count > 0:
        chunk = reader.read(min(STEP, count))
        if not chunk:
            raise ValueError("shard index shorter on the second read")
        if writer is not None:
            writer.write(chunk)
        count -= len(chunk)
