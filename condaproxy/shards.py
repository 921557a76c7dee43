"""CEP-16 shard indexes whose shards live elsewhere: rewritten so clients come back to us.

An index may name an absolute `shards_base_url` (a CDN, another host). Passed through as it
is, clients would fetch shards from there and bypass the proxy (pixi #5092). The proxy keeps
the upstream base in the catalog, serves a copy of the index whose base is `./shards/`, and
maps `<subdir>/shards/<sha256>.msgpack.zst` requests back to the upstream base.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urljoin, urlsplit

import msgpack
import zstandard

from condaproxy.repodata import unpack_zst_msgpack

LOCAL_BASE = "./shards/"
_PLAIN = {"./shards/", "shards/", "./shards", "shards"}


def upstream_base(index_url: str, base: str) -> str | None:
    """The absolute shards base an index names, or None when it is the plain ./shards/."""
    if base in _PLAIN or not base:
        return None
    resolved = urljoin(index_url, base)
    if urlsplit(resolved).scheme not in ("http", "https"):
        raise ValueError(f"unsupported shards_base_url {base!r}")
    if not resolved.endswith("/"):
        resolved += "/"
    # A relative base that lands on our own layout needs no mapping either.
    if resolved == urljoin(index_url, LOCAL_BASE):
        return None
    return resolved


def rewrite_index(src: Path, dst: Path, index_url: str) -> str | None:
    """If src names a foreign shards base, write dst pointing at ./shards/ and return the base."""
    index = unpack_zst_msgpack(src)
    info = index.get("info") or {}
    base = upstream_base(index_url, str(info.get("shards_base_url") or ""))
    if base is None:
        return None
    info["shards_base_url"] = LOCAL_BASE
    index["info"] = info
    packed = msgpack.packb(index, use_bin_type=True)
    dst.write_bytes(zstandard.ZstdCompressor(level=10).compress(packed))
    return base
