"""Streaming, collapsing and persisting: the core promises, against a real channel and upstream."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
import pytest
from channel import Channel
from gates import GATED, GatedCatalog
from proxy import Proxy, check_invariants
from upstream import FakeUpstream

from condaproxy.conda.paths import Kind, UnitKey

CH = "/testchan"


async def test_miss_then_hit_byte_exact(proxy: Proxy, upstream: FakeUpstream, channel: Channel) -> None:
    pkg = channel.by_name("cp-big")
    path = f"{CH}/{pkg.url_path}"
    first = await proxy.get(path)
    assert first.status == 200 and first.xcache == "MISS"
    assert first.body == pkg.read_bytes()
    await proxy.idle()
    second = await proxy.get(path)
    assert second.status == 200 and second.xcache == "HIT"
    assert hashlib.sha256(second.body).hexdigest() == pkg.sha256
    assert upstream.count(path) == 1
    rows = check_invariants(proxy.config.cache.directory)
    assert ("testchan", pkg.subdir, pkg.filename) in rows


async def test_headers_pass_through_with_our_cache_control(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel
) -> None:
    pkg = channel.by_name("cp-app")
    path = f"{CH}/{pkg.url_path}"
    upstream.add_headers(path, {"X-Upstream-Thing": "kept", "Cache-Control": "no-cache"})
    miss = await proxy.get(path)
    await proxy.idle()
    hit = await proxy.get(path)
    direct = upstream.requests_for(path)
    assert direct, "upstream was asked"
    for resp in (miss, hit):
        assert resp.headers["Cache-Control"] == "public, max-age=86400"
        assert "X-Upstream-Thing" not in resp.headers  # packages keep a fixed header set
        assert resp.headers["Content-Length"] == str(pkg.size)
        assert resp.headers["ETag"] and resp.headers["Last-Modified"]
    assert miss.headers["ETag"] == hit.headers["ETag"]
    assert miss.headers["Content-Type"] == hit.headers["Content-Type"]
    repo = await proxy.get(f"{CH}/noarch/repodata.json")
    assert repo.headers["Cache-Control"] == f"public, max-age={proxy.config.cache.repodata_ttl}"


async def test_headers_then_bytes_before_upstream_finishes(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel
) -> None:
    """Never store-and-forward: headers and the first half arrive while upstream is held."""
    pkg = channel.by_name("cp-tools")
    path = f"{CH}/{pkg.url_path}"
    hold = upstream.hold(path, 0.5)
    assert proxy.session is not None
    async with proxy.session.get(proxy.url + path) as resp:
        assert resp.status == 200
        assert resp.headers["X-Cache"] == "MISS"
        got = await asyncio.wait_for(resp.content.readexactly(pkg.size // 4), 10)
        assert not hold.released.is_set()
        hold.release()
        rest = await resp.read()
    assert got + rest == pkg.read_bytes()


async def test_late_joiner_gets_bytes_before_download_ends(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel
) -> None:
    pkg = channel.by_name("cp-big")
    path = f"{CH}/{pkg.url_path}"
    hold = upstream.hold(path, 0.6)
    assert proxy.session is not None
    async with proxy.session.get(proxy.url + path) as leader:
        await asyncio.wait_for(hold.reached.wait(), 10)
        async with proxy.session.get(proxy.url + path) as joiner:
            assert joiner.headers["X-Cache"] == "COLLAPSED"
            # Bytes already written reach the joiner while the upstream is still held.
            early = await asyncio.wait_for(joiner.content.readexactly(pkg.size // 2), 10)
            assert not hold.released.is_set()
            hold.release()
            joined = early + await joiner.read()
        led = await leader.read()
    assert joined == led == pkg.read_bytes()
    assert upstream.count(path) == 1


@pytest.mark.parametrize("n", [20])
async def test_concurrent_cold_requests_share_one_fetch(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel, n: int
) -> None:
    pkg = channel.by_name("cp-data")
    path = f"{CH}/{pkg.url_path}"
    upstream.throttle(path, 8 * 1024 * 1024)
    results = await asyncio.gather(*(proxy.get(path) for _ in range(n)))
    assert upstream.count(path) == 1
    assert all(r.status == 200 and r.body == pkg.read_bytes() for r in results)
    assert sorted(r.xcache or "" for r in results).count("MISS") == 1
    await proxy.idle()
    check_invariants(proxy.config.cache.directory)


@pytest.mark.parametrize("handler_cancellation", [False, True])
async def test_leader_disconnect_does_not_cancel_shared_fetch(
    proxy_factory, upstream: FakeUpstream, channel: Channel, handler_cancellation: bool
) -> None:
    proxy = await proxy_factory(handler_cancellation=handler_cancellation)
    pkg = channel.by_name("cp-big")
    path = f"{CH}/{pkg.url_path}"
    hold = upstream.hold(path, 0.1)
    leader_session = aiohttp.ClientSession()
    try:
        leader = await leader_session.get(proxy.url + path)
        await leader.content.readexactly(1024)
        follower_task = asyncio.ensure_future(proxy.get(path))
        await asyncio.sleep(0.1)
    finally:
        leader.close()  # drop the leader's connection mid-body
        await leader_session.close()
    hold.release()
    follower = await asyncio.wait_for(follower_task, 20)
    assert follower.body == pkg.read_bytes() and follower.xcache == "COLLAPSED"
    await proxy.idle()
    assert (await proxy.get(path)).xcache == "HIT"
    assert upstream.count(path) == 1
    check_invariants(proxy.config.cache.directory)


async def test_all_clients_gone_fetch_still_completes(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel
) -> None:
    pkg = channel.by_name("cp-data")
    path = f"{CH}/{pkg.url_path}"
    hold = upstream.hold(path, 0.3)
    async with aiohttp.ClientSession() as session:
        resp = await session.get(proxy.url + path)
        await asyncio.wait_for(hold.reached.wait(), 10)
        resp.close()
    hold.release()
    await proxy.idle()
    hit = await proxy.get(path)
    assert hit.xcache == "HIT" and hit.body == pkg.read_bytes()
    assert upstream.count(path) == 1


async def test_client_no_store_request_header_does_not_stop_caching(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    index = await proxy.get(f"{CH}/noarch/repodata_shards.msgpack.zst", headers={"Cache-Control": "no-store"})
    assert index.status == 200
    await proxy.idle()
    again = await proxy.get(f"{CH}/noarch/repodata_shards.msgpack.zst", headers={"Cache-Control": "no-store"})
    assert again.xcache == "HIT"
    assert upstream.count(f"{CH}/noarch/repodata_shards.msgpack.zst") == 1


async def test_shared_fetch_forwards_no_client_headers(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel
) -> None:
    pkg = channel.by_name("cp-tools")
    path = f"{CH}/{pkg.url_path}"
    resp = await proxy.get(
        path,
        headers={
            "Range": "bytes=0-9",
            "If-None-Match": '"abc"',
            "If-Modified-Since": "Wed, 21 Oct 2015 07:28:00 GMT",
            "Authorization": "Bearer secret-token",
        },
    )
    assert resp.status == 206 and resp.body == pkg.read_bytes()[:10]
    (req,) = upstream.requests_for(path)
    for name in ("Range", "If-None-Match", "If-Modified-Since", "Authorization", "If-Range"):
        assert name not in req.headers


async def test_fifty_cold_clients_all_get_whole_bodies(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel
) -> None:
    """Readers that keep up from memory must still find the temp file after the fetch ends."""
    pkg = channel.by_name("cp-big")
    path = f"{CH}/{pkg.url_path}"
    results = await asyncio.gather(*(proxy.get(path) for _ in range(50)))
    assert upstream.count(path) == 1
    bad = [r for r in results if r.error is not None or hashlib.sha256(r.body).hexdigest() != pkg.sha256]
    assert not bad, f"{len(bad)} of 50 bodies broken: {bad[0].error!r}"
    await proxy.idle()
    check_invariants(proxy.config.cache.directory)


async def test_late_joiner_paused_before_attaching_still_gets_the_whole_body(
    proxy_factory, upstream: FakeUpstream, channel: Channel
) -> None:
    """A joiner of a mutable unit reads the catalog first: the download may end meanwhile."""
    proxy = await proxy_factory(parts=GATED)
    catalog = proxy.services.catalog
    assert isinstance(catalog, GatedCatalog)
    path = f"{CH}/linux-64/repodata.json"
    want = (channel.path / "linux-64" / "repodata.json").read_bytes()
    key = UnitKey("testchan", "linux-64", "repodata.json", Kind.REPODATA)
    hold = upstream.hold(path, 0.5, times=1)
    assert proxy.session is not None
    async with proxy.session.get(proxy.url + path) as leader:
        await asyncio.wait_for(hold.reached.wait(), 10)
        dl = proxy.services.inflight.get(key)
        assert dl is not None and dl.task is not None
        paused = catalog.hold_get(key)
        joiner = asyncio.ensure_future(proxy.get(path))
        await asyncio.wait_for(paused.reached.wait(), 10)
        # While the joiner is paused, the download runs to its end: sent, persisted, gone.
        hold.release()
        assert await leader.read() == want
    await asyncio.wait_for(asyncio.shield(dl.task), 10)
    await proxy.idle()
    paused.release()
    joined = await asyncio.wait_for(joiner, 10)
    assert joined.error is None and joined.status == 200
    assert joined.body == want
    await proxy.idle()
    check_invariants(proxy.config.cache.directory)


@pytest.mark.parametrize("window", ["bytes=0-1023", "bytes=4096-8191"])
async def test_a_window_of_a_corrupt_download_is_never_a_clean_206(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel, window: str
) -> None:
    """A corrupting CDN: a window's bytes arrive before the verdict, but its end must wait for it."""
    pkg = channel.by_name("cp-big")
    path = f"{CH}/{pkg.url_path}"
    assert (await proxy.get(f"{CH}/{pkg.subdir}/repodata.json")).status == 200  # digests learned
    upstream.corrupt(path, times=1)
    hold = upstream.hold(path, 0.5, times=1)
    first, last = (int(n) for n in window.removeprefix("bytes=").split("-"))
    assert proxy.session is not None
    async with proxy.session.get(proxy.url + path) as leader:
        await asyncio.wait_for(hold.reached.wait(), 10)
        async with proxy.session.get(proxy.url + path, headers={"Range": window}) as ranged:
            assert ranged.status == 206 and ranged.headers["X-Cache"] == "COLLAPSED"
            assert ranged.headers["Content-Range"] == f"bytes {first}-{last}/{pkg.size}"
            # All but the window's last byte may go out before the verdict.
            await asyncio.wait_for(ranged.content.readexactly(last - first), 10)
            hold.release()
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(ranged.read(), 10)
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(leader.read(), 10)
    await proxy.idle()
    check_invariants(proxy.config.cache.directory)


async def test_a_window_of_a_good_download_ends_once_verified(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel
) -> None:
    pkg = channel.by_name("cp-big")
    path = f"{CH}/{pkg.url_path}"
    assert (await proxy.get(f"{CH}/{pkg.subdir}/repodata.json")).status == 200
    hold = upstream.hold(path, 0.5, times=1)
    assert proxy.session is not None
    async with proxy.session.get(proxy.url + path) as leader:
        await asyncio.wait_for(hold.reached.wait(), 10)
        async with proxy.session.get(proxy.url + path, headers={"Range": "bytes=10-1033"}) as ranged:
            assert ranged.status == 206
            early = await asyncio.wait_for(ranged.content.readexactly(1023), 10)
            hold.release()
            body = early + await asyncio.wait_for(ranged.read(), 10)
        assert body == pkg.read_bytes()[10:1034]
        assert await leader.read() == pkg.read_bytes()
    await proxy.idle()
    check_invariants(proxy.config.cache.directory)


async def test_packages_and_shards_keep_only_a_fixed_header_set(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel
) -> None:
    """One response with a bad header must not be replayed with the package forever."""
    pkg = channel.by_name("cp-app")
    path = f"{CH}/{pkg.url_path}"
    assert (await proxy.get(f"{CH}/{pkg.subdir}/repodata.json")).status == 200
    bad = {
        "Content-Encoding": "gzip",
        "Content-Disposition": "attachment; filename=evil.html",
        "X-Upstream-Thing": "replayed",
        "Content-Type": "text/html",
    }
    upstream.add_headers(path, bad, times=1)
    live = await proxy.get(path)
    await proxy.idle()
    hit = await proxy.get(path)
    assert hit.xcache == "HIT"
    for resp in (live, hit):
        assert resp.status == 200 and resp.body == pkg.read_bytes()
        assert "Content-Encoding" not in resp.headers
        assert "Content-Disposition" not in resp.headers and "X-Upstream-Thing" not in resp.headers
        assert resp.headers["Content-Type"] == "application/octet-stream"
        assert resp.headers["ETag"] and resp.headers["Last-Modified"]
    # A client that decodes what it is told to still gets the package.
    async with aiohttp.ClientSession() as plain, plain.get(proxy.url + path) as decoded:
        assert await decoded.read() == pkg.read_bytes()
