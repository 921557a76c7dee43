"""What a client can make the proxy fetch: cold HEADs start no download, a download nobody reads
and nobody can cache is stopped, and each client address has a bound on cold fetches."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable
from dataclasses import replace

import aiohttp
import pytest
from channel import Channel
from proxy import Proxy, check_invariants, make_config
from upstream import FakeUpstream

from condaproxy.conda.paths import Request, UnitKey, parse_path

CH = "/testchan"
# Headers that differ between any two responses, whatever they carry.
PER_RESPONSE = {"Date", "Server", "X-Cache", "Age", "Connection", "Keep-Alive"}


def unlisted(upstream: FakeUpstream, count: int, size: int, prefix: str = "ghost") -> dict[str, bytes]:
    """count packages the upstream serves but the channel's metadata does not list."""
    rng = random.Random(size)
    files = {f"{CH}/linux-64/{prefix}{i}-1.0-h0_0.conda": rng.randbytes(size) for i in range(count)}
    for path, data in files.items():
        upstream.replace(path, data, "application/octet-stream")
    return files


def unit_key(path: str) -> UnitKey:
    parsed = parse_path(path)
    assert isinstance(parsed, Request), parsed
    return parsed.key


async def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Poll a test-side condition (the proxy's own code never polls)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what or "condition not reached")
        await asyncio.sleep(0.01)


async def upstream_bytes(proxy: Proxy) -> float:
    text = (await proxy.get("/metrics")).body.decode()
    found = re.search(r"^condaproxy_upstream_bytes_total ([0-9.e+]+)$", text, re.M)
    assert found, text
    return float(found.group(1))


def comparable(headers: aiohttp.typedefs.LooseHeaders) -> dict[str, str]:
    return {k: v for k, v in dict(headers).items() if k not in PER_RESPONSE}


# -- a: cold HEADs ---------------------------------------------------------------------------------


async def test_a_flood_of_cold_heads_starts_no_download(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel
) -> None:
    """32 HEADs of unlisted packages once left 33 full downloads running for nobody."""
    ghosts = unlisted(upstream, 32, 256 << 10)
    assert (await proxy.get(f"{CH}/noarch/repodata.json")).status == 200  # the noarch digests
    await proxy.idle()
    listed = channel.by_name("cp-lib")
    upstream.reset_counts()

    heads = await asyncio.gather(*(proxy.get(p, method="HEAD") for p in [*ghosts, f"{CH}/{listed.url_path}"]))
    for head, (path, data) in zip(heads, ghosts.items(), strict=False):
        assert head.status == 200 and head.body == b"", path
        assert head.headers["Content-Length"] == str(len(data))
        assert upstream.count(path, "HEAD") == 1  # an upstream HEAD: the size is not in metadata
        assert upstream.count(path, "GET") == 0  # and never a download
    known = heads[-1]
    assert known.status == 200 and known.headers["Content-Length"] == str(listed.size)
    assert known.headers["Cache-Control"] == "public, max-age=86400"
    assert upstream.count(f"{CH}/{listed.url_path}", None) == 0  # answered from the repodata
    assert len(proxy.services.inflight) == 0
    assert proxy.services.cold.running("127.0.0.1") == 0

    # A shard's size is in no metadata: an upstream HEAD, never a download either.
    shard = next((channel.path / "noarch" / "shards").iterdir())
    shard_path = f"{CH}/noarch/shards/{shard.name}"
    head = await proxy.get(shard_path, method="HEAD")
    assert head.status == 200 and head.headers["Content-Length"] == str(shard.stat().st_size)
    assert (upstream.count(shard_path, "HEAD"), upstream.count(shard_path, "GET")) == (1, 0)

    # HEAD mirrors GET: what the GET sends (bar the per-response headers) the HEAD sent too.
    path, data = next(iter(ghosts.items()))
    got = await proxy.get(path)
    assert got.body == data
    assert comparable(heads[0].headers) == comparable(got.headers)


async def test_heads_of_repodata_and_the_shard_index_mirror_their_gets(proxy: Proxy) -> None:
    """libmamba HEAD-probes .zst and the shard index: those may download, and must match GET."""
    for name in ("repodata.json.zst", "repodata_shards.msgpack.zst", "repodata.json"):
        path = f"{CH}/linux-64/{name}"
        head = await proxy.get(path, method="HEAD")
        await proxy.idle()
        got = await proxy.get(path)
        assert head.status == got.status == 200 and head.body == b""
        assert comparable(head.headers) == comparable(got.headers), name


async def test_a_cold_head_of_a_missing_package_is_404_and_remembered(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    path = f"{CH}/linux-64/nothere-1.0-h0_0.conda"
    assert (await proxy.get(path, method="HEAD")).status == 404
    assert (await proxy.get(path, method="HEAD")).status == 404
    assert (await proxy.get(path)).status == 404
    assert upstream.count(path, None) == 1  # negative_ttl covers HEAD and GET alike


# -- b: downloads nobody reads and nobody can cache ------------------------------------------------


@pytest.mark.parametrize("handler_cancellation", [False, True])
async def test_a_download_nobody_reads_and_nobody_can_cache_is_stopped(
    proxy_factory, upstream: FakeUpstream, handler_cancellation: bool
) -> None:
    proxy = await proxy_factory(handler_cancellation=handler_cancellation)
    path, data = next(iter(unlisted(upstream, 1, 8 << 20).items()))
    hold = upstream.hold(path, 1 << 20)
    async with aiohttp.ClientSession() as session:
        resp = await session.get(proxy.url + path)
        await resp.content.readexactly(64 << 10)
        dl = proxy.services.inflight.get(unit_key(path))
        assert dl is not None
        await wait_until(lambda: dl.uncacheable, what="the channel's metadata not to list it")
        resp.close()  # the only reader goes away
    hold.release()
    await proxy.idle()
    # Stopped within a chunk or two of the client leaving, not fetched to the end for nobody.
    assert await upstream_bytes(proxy) < len(data) / 2
    assert upstream.count(path) == 1
    again = await proxy.get(path)  # a later client gets it whole from a new fetch
    assert again.status == 200 and again.body == data and again.xcache == "MISS"
    await proxy.idle()
    check_invariants(proxy.config.cache.directory)


async def test_a_download_that_will_be_cached_runs_on_without_readers(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel
) -> None:
    """Rule 3 stands for everything that can be cached: the next client gets a hit."""
    pkg = channel.by_name("cp-big")
    path = f"{CH}/{pkg.url_path}"
    hold = upstream.hold(path, 1 << 20)
    async with aiohttp.ClientSession() as session:
        resp = await session.get(proxy.url + path)
        await resp.content.readexactly(64 << 10)
        resp.close()
    hold.release()
    await proxy.idle()
    hit = await proxy.get(path)
    assert hit.xcache == "HIT" and hit.body == pkg.read_bytes()
    assert upstream.count(path) == 1
    check_invariants(proxy.config.cache.directory)


# -- c: cold fetches per client --------------------------------------------------------------------


async def test_cold_fetches_are_bounded_per_client(
    upstream: FakeUpstream, channel: Channel, tmp_path
) -> None:
    config = make_config(tmp_path / "cache", upstream.url)
    proxy = await Proxy(replace(config, lazy=replace(config.lazy, max_cold_per_client=3))).start()
    try:
        warm = channel.by_name("cp-base")
        assert (await proxy.get(f"{CH}/{warm.url_path}")).status == 200
        await proxy.idle()
        ghosts = list(unlisted(upstream, 5, 64 << 10))
        holds = [upstream.hold_headers(p) for p in ghosts]
        started = [asyncio.ensure_future(proxy.get(p)) for p in ghosts[:3]]
        for hold in holds[:3]:
            await asyncio.wait_for(hold.reached.wait(), 10)
        assert proxy.services.cold.running("127.0.0.1") == 3

        refused = await proxy.get(ghosts[3])  # a fourth cold download
        assert refused.status == 503 and refused.headers["Retry-After"]
        head = await proxy.get(ghosts[4], method="HEAD")  # a cold HEAD asks upstream: it counts
        assert head.status == 503
        assert upstream.count(ghosts[3], None) == upstream.count(ghosts[4], None) == 0
        # Hits and joins start nothing: they are never refused.
        assert (await proxy.get(f"{CH}/{warm.url_path}")).xcache == "HIT"
        joined = asyncio.ensure_future(proxy.get(ghosts[0]))

        for hold in holds:
            hold.release()
        for got in await asyncio.gather(*started, joined):
            assert got.status == 200 and got.error is None
        await proxy.idle()
        assert proxy.services.cold.running("127.0.0.1") == 0
        assert (await proxy.get(ghosts[3])).status == 200  # the slots came back
        assert upstream.count(ghosts[0]) == 1
    finally:
        await proxy.close()
