"""CEP-16 sharded repodata: the index and shard codecs, and rewriting a foreign shards_base_url.

An index may name an absolute `shards_base_url` (a CDN, another host). Passed through as it
is, clients would fetch shards from there and bypass the proxy (pixi #5092). The proxy keeps
the upstream base in the catalog, serves a copy of the index whose base is `./shards/`, and
maps `<subdir>/shards/<sha256>.msgpack.zst` requests back to the upstream base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import msgpack
import zstandard

from condaproxy.conda.baseurl import foreign_base
from condaproxy.conda.decoding import STEP
from condaproxy.conda.urls import redacted_url

# A shard or shard index is small (conda-forge's largest index inflates to a few MB): refuse to
# inflate anything absurd, reading in steps so a decompression bomb never gets the memory.
MAX_MSGPACK_BYTES = 96 * 1024 * 1024
RECORD_KEYS = ("packages", "packages.conda")


def unpack_zst_msgpack(path: Path) -> Any:
    """Decode a zstd-compressed msgpack document, refusing to inflate past MAX_MSGPACK_BYTES."""
    data = bytearray()
    with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as f:
        while chunk := f.read(STEP):
            data += chunk
            if len(data) > MAX_MSGPACK_BYTES:
                raise ValueError(f"{path.name}: decompresses to more than {MAX_MSGPACK_BYTES} bytes")
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def read_shard_index(path: Path) -> tuple[str, dict[str, str]]:
    """A CEP-16 index: (shards_base_url, package name -> shard sha256 hex)."""
    index = unpack_zst_msgpack(path)
    base = str((index.get("info") or {}).get("shards_base_url") or "./shards/")
    shards = {
        name: (digest.hex() if isinstance(digest, bytes) else str(digest))
        for name, digest in (index.get("shards") or {}).items()
    }
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


def rewrite_index(src: Path, dst: Path, index_url: str) -> tuple[str | None, str | None]:
    """Point a foreign shards base at ./shards/ and a foreign package base (CEP-15) at "".

    Returns (shards base, package base) as upstream named them, each None when it needed
    no rewrite; dst is written only when one of them did.
    """
    index = unpack_zst_msgpack(src)
    info = index.get("info") or {}
    shards_base = upstream_base(index_url, str(info.get("shards_base_url") or ""))
    package_base = foreign_base(index_url, str(info.get("base_url") or ""))
    if shards_base is None and package_base is None:
        return None, None
    if shards_base is not None:
        info["shards_base_url"] = LOCAL_BASE
    if package_base is not None:
        info["base_url"] = ""
    index["info"] = info
    packed = msgpack.packb(index, use_bin_type=True)
    dst.write_bytes(zstandard.ZstdCompressor(level=10).compress(packed))
    return shards_base, package_base
