"""A failed or lying upstream never leaves a partial or wrong file in the cache."""

from __future__ import annotations

import asyncio
import time

import pytest
from channel import Channel
from proxy import Proxy, check_invariants
from upstream import FakeUpstream

CH = "/testchan"


@pytest.mark.parametrize("chunked", [False, True])
async def test_truncated_upstream_aborts_clients_and_caches_nothing(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel, chunked: bool
) -> None:
    pkg = channel.by_name("cp-data")
    path = f"{CH}/{pkg.url_path}"
    upstream.truncate(path, 0.4, times=1)
    if chunked:
        upstream.chunked(path, times=1)
    results = await asyncio.gather(*(proxy.get(path) for _ in range(3)))
    for r in results:
        # Headers went out, then the connection was dropped: never a clean short body.
        assert r.status == 200
        assert r.error is not None, "a truncated transfer must not end cleanly"
        assert len(r.body) < pkg.size
    await proxy.idle()
    assert check_invariants(proxy.config.cache.directory) == [] or all(
        f != pkg.filename for _, _, f in check_invariants(proxy.config.cache.directory)
    )
    again = await proxy.get(path)
    assert again.status == 200 and again.error is None and again.body == pkg.read_bytes()
    assert upstream.count(path) == 2


async def test_reset_midway_aborts_every_attached_client(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel
) -> None:
    pkg = channel.by_name("cp-big")
    path = f"{CH}/{pkg.url_path}"
    hold = upstream.hold(path, 0.3, times=1)
    upstream.reset(path, 0.4, times=1)
    tasks = [asyncio.ensure_future(proxy.get(path)) for _ in range(5)]
    await asyncio.wait_for(hold.reached.wait(), 10)
    hold.release()
    results = await asyncio.gather(*tasks)
    assert all(r.error is not None and len(r.body) < pkg.size for r in results)
    await proxy.idle()
    check_invariants(proxy.config.cache.directory)
    again = await proxy.get(path)
    assert again.body == pkg.read_bytes() and again.xcache == "MISS"
    assert upstream.count(path) == 2


async def test_corrupted_bytes_are_never_cached_nor_served_whole(
    proxy_factory, upstream: FakeUpstream, channel: Channel
) -> None:
    proxy = await proxy_factory(integrity_cooldown=0)
    pkg = channel.by_name("cp-tools")
    path = f"{CH}/{pkg.url_path}"
    await proxy.get(f"{CH}/linux-64/repodata.json")  # the channel's own digests, learned
    upstream.corrupt(path, times=1)
    bad = await proxy.get(path)
    assert bad.error is not None, "a mismatching body must be cut off before its last byte"
    assert len(bad.body) < pkg.size
    await proxy.idle()
    assert all(f != pkg.filename for _, _, f in check_invariants(proxy.config.cache.directory))
    good = await proxy.get(path)
    assert good.error is None and good.body == pkg.read_bytes()
    await proxy.idle()
    assert (await proxy.get(path)).xcache == "HIT"
    assert proxy.services.metrics.integrity_failures._value.get() == 1


async def test_html_error_page_with_200_is_refused(proxy: Proxy, upstream: FakeUpstream, channel: Channel) -> None:
    pkg = channel.by_name("cp-app")
    path = f"{CH}/{pkg.url_path}"
    upstream.replace(path, b"<html>upstream maintenance</html>", times=1)
    bad = await proxy.get(path)
    assert bad.error is not None or bad.status >= 500
    await proxy.idle()
    assert all(f != pkg.filename for _, _, f in check_invariants(proxy.config.cache.directory))
    # The URL is on a short cooldown rather than hammered.
    cooled = await proxy.get(path)
    assert cooled.status == 502
    assert upstream.count(path) == 1


@pytest.mark.parametrize("code", [500, 503])
async def test_upstream_5xx_is_502_never_404(proxy: Proxy, upstream: FakeUpstream, code: int) -> None:
    path = f"{CH}/noarch/repodata.json"
    upstream.status(path, code)
    resp = await proxy.get(path)
    assert resp.status == 502
    assert str(code) in resp.body.decode()
    assert resp.xcache == "MISS"


async def test_upstream_unreachable_is_502(proxy_factory, tmp_path) -> None:
    from proxy import Proxy, free_port, make_config

    dead = f"http://127.0.0.1:{free_port()}"
    proxy = await Proxy(make_config(tmp_path / "c", dead)).start()
    try:
        resp = await proxy.get(f"{CH}/noarch/repodata.json")
        assert resp.status == 502 and "unreachable" in resp.body.decode()
    finally:
        await proxy.close()


async def test_upstream_slow_headers_is_504(proxy: Proxy, upstream: FakeUpstream) -> None:
    path = f"{CH}/noarch/repodata.json"
    upstream.delay_headers(path, 8)  # the proxy's connect/first-byte timeout is 5 s in tests
    started = time.monotonic()
    resp = await proxy.get(path)
    assert resp.status == 504
    assert time.monotonic() - started < 7.5


async def test_upstream_stall_mid_body_aborts(proxy: Proxy, upstream: FakeUpstream, channel: Channel) -> None:
    pkg = channel.by_name("cp-data")
    path = f"{CH}/{pkg.url_path}"
    upstream.stall(path, 0.5, None, times=1)  # read timeout is 5 s in tests
    resp = await asyncio.wait_for(proxy.get(path), 20)
    assert resp.error is not None and len(resp.body) < pkg.size
    await proxy.idle()
    check_invariants(proxy.config.cache.directory)


async def test_upstream_404_is_404_and_remembered_briefly(proxy_factory, upstream: FakeUpstream) -> None:
    proxy = await proxy_factory(negative_ttl=1)
    path = f"{CH}/noarch/missing-1.0-0.conda"
    assert (await proxy.get(path)).status == 404
    assert (await proxy.get(path)).status == 404
    assert upstream.count(path) == 1
    await asyncio.sleep(1.2)
    assert (await proxy.get(path)).status == 404
    assert upstream.count(path) == 2


async def test_missing_zst_variant_is_404_not_5xx(proxy: Proxy, upstream: FakeUpstream) -> None:
    # No variant of this subdir exists upstream, so none can be derived: a plain 404.
    path = f"{CH}/osx-64/repodata.json.zst"
    resp = await proxy.get(path)
    assert resp.status == 404  # conda falls back to repodata.json only on a 4xx


async def test_stale_repodata_served_when_upstream_fails(proxy_factory, upstream: FakeUpstream) -> None:
    proxy = await proxy_factory(repodata_ttl=1)
    path = f"{CH}/noarch/repodata.json"
    fresh = await proxy.get(path)
    await proxy.idle()
    await asyncio.sleep(1.2)
    upstream.status(path, 503)
    stale = await proxy.get(path)
    assert stale.status == 200 and stale.xcache == "STALE"
    assert stale.body == fresh.body
    assert int(stale.headers["Age"]) >= 1
    upstream.clear_faults()
    upstream.reset_counts()
    # After a failure the next request revalidates again (no lasting damage).
    again = await proxy.get(path)
    assert again.xcache == "REVALIDATED" and again.body == fresh.body


async def test_stale_not_served_past_max_stale(proxy_factory, upstream: FakeUpstream) -> None:
    proxy = await proxy_factory(repodata_ttl=1, max_stale=0)
    path = f"{CH}/noarch/repodata.json"
    await proxy.get(path)
    await proxy.idle()
    await asyncio.sleep(1.2)
    upstream.status(path, 503)
    assert (await proxy.get(path)).status == 502
