"""Verifying a download against the channel's own metadata: a package's sha256/size, a shard's name.

The channel's repodata and shards are the authority; a client's claim never is. A package whose
digest is not yet learned has it looked up while its body streams, so it is known by the end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.inflight import Download
from condaproxy.conda.paths import Kind, UnitKey
from condaproxy.config.model import ChannelConfig
from condaproxy.errors import IntegrityError
from condaproxy.metrics import Metrics

log = logging.getLogger(__name__)

Expected = tuple[str, int | None]
ExpectedLookup = Callable[[UnitKey, ChannelConfig], Awaitable[Expected | None]]
Lookup = asyncio.Future[Expected | None]


async def start_lookup(
    catalog: Catalog,
    expected: ExpectedLookup | None,
    key: UnitKey,
    channel: ChannelConfig,
    length: int | None,
) -> tuple[Lookup | None, int | None]:
    """(the digest a package must have, as a future; its size if already known).

    IntegrityError at once when the upstream's announced length is already known to be wrong:
    a clean 502 before any byte went out, not a cut-off stream.
    """
    if key.kind is not Kind.PACKAGE or expected is None:
        return None, None
    known = await catalog.expected(key.channel, key.subdir, key.filename)
    if known is None:
        # Learn the channel's digest while the body streams, so it is known by the end.
        return asyncio.ensure_future(expected(key, channel)), None
    lookup: Lookup = asyncio.get_running_loop().create_future()
    lookup.set_result(known)
    if known[1] is not None and length is not None and known[1] != length:
        raise IntegrityError(f"{key}: upstream announces {length} bytes, channel says {known[1]}")
    return lookup, known[1]


def watch(dl: Download, lookup: Lookup | None) -> None:
    """Tell dl as soon as it is known that nothing vouches for its package: it is never cached."""
    if dl.key.kind is not Kind.PACKAGE:
        return
    if lookup is None:
        dl.never_cached()
        return

    def resolved(done: Lookup) -> None:
        if not done.cancelled() and done.exception() is None and done.result() is None:
            dl.never_cached()

    lookup.add_done_callback(resolved)


async def verify(
    key: UnitKey, sha: str, size: int, lookup: Lookup | None, metrics: Metrics, *, required: bool = False
) -> bool:
    """Raise IntegrityError on a mismatch; False when there is nothing to verify against.

    required: nothing to verify against is an IntegrityError too (the bytes come from an
    origin that only the channel's metadata vouches for).
    """
    if key.kind is Kind.SHARD:
        want = key.filename.removeprefix("shards/").removesuffix(".msgpack.zst")
        if sha != want:
            raise IntegrityError(f"shard content hashes to {sha[:12]}…, not its name")
        return True
    if key.kind is not Kind.PACKAGE:
        if required:
            raise IntegrityError(f"{key}: nothing in the channel's metadata vouches for it; refused")
        return True
    expected = await lookup if lookup is not None else None
    if expected is None and required:
        raise IntegrityError(f"{key}: from another origin, and the channel's metadata lists no sha256")
    if expected is None:
        # Served as upstream sent it, but never cached: nothing vouches for these bytes.
        metrics.unverified.inc()
        log.warning("%s: no sha256 in the channel's metadata; served, not cached", key)
        return False
    want_sha, want_size = expected
    if sha != want_sha or (want_size is not None and size != want_size):
        raise IntegrityError(
            f"{key}: got sha256 {sha[:12]}… size {size}, channel says {want_sha[:12]}… size {want_size}"
        )
    return True
