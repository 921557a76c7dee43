"""Hits from the store (sendfile, HEAD, Range) and repodata freshness (TTL, 304s both ways)."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from channel import Channel
from proxy import Proxy
from upstream import FakeUpstream

from condaproxy.cache.removal import remove_unit

CH = "/testchan"


async def warm(proxy: Proxy, path: str) -> bytes:
    """Fetch once through the proxy and wait until the unit is persisted."""
    resp = await proxy.get(path)
    assert resp.status == 200 and resp.error is None
    await proxy.idle()
    return resp.body


@pytest.mark.parametrize(
    ("range_header", "window"),
    [("bytes=0-9", (0, 10)), ("bytes=100-", (100, None)), ("bytes=-37", (-37, None)), ("bytes=5-5", (5, 6))],
)
@pytest.mark.parametrize("warm_first", [True, False])
async def test_ranges(
    proxy: Proxy, channel: Channel, range_header: str, window: tuple[int, int | None], warm_first: bool
) -> None:
    pkg = channel.by_name("cp-tools")
    path = f"{CH}/{pkg.url_path}"
    data = pkg.read_bytes()
    if warm_first:
        await warm(proxy, path)
    resp = await proxy.get(path, headers={"Range": range_header})
    want = data[window[0] : window[1]]
    assert resp.status == 206
    assert resp.body == want
    start = window[0] % len(data)
    assert resp.headers["Content-Range"] == f"bytes {start}-{start + len(want) - 1}/{len(data)}"
    assert resp.xcache == ("HIT" if warm_first else "MISS")


@pytest.mark.parametrize("warm_first", [True, False])
async def test_range_past_end_is_416(proxy: Proxy, channel: Channel, warm_first: bool) -> None:
    pkg = channel.by_name("cp-app")
    path = f"{CH}/{pkg.url_path}"
    if warm_first:
        await warm(proxy, path)
    resp = await proxy.get(path, headers={"Range": f"bytes={pkg.size}-"})
    assert resp.status == 416
    assert resp.headers["Content-Range"] == f"bytes */{pkg.size}"


async def test_if_range_mismatch_gives_whole_file(proxy: Proxy, channel: Channel) -> None:
    pkg = channel.by_name("cp-app")
    path = f"{CH}/{pkg.url_path}"
    first = await proxy.get(path)
    await proxy.idle()
    etag = first.headers["ETag"]
    ok = await proxy.get(path, headers={"Range": "bytes=-10", "If-Range": etag})
    assert ok.status == 206 and ok.body == pkg.read_bytes()[-10:]
    stale = await proxy.get(path, headers={"Range": "bytes=-10", "If-Range": '"other"'})
    assert stale.status == 200 and stale.body == pkg.read_bytes()


async def test_multi_and_garbage_ranges_give_whole_file(proxy: Proxy, channel: Channel) -> None:
    pkg = channel.by_name("cp-app")
    path = f"{CH}/{pkg.url_path}"
    await warm(proxy, path)
    many = ",".join(f"{i}-{i + 10}" for i in range(0, 1000))
    for header in (f"bytes={many}", "bytes=abc", "lines=1-2"):
        resp = await proxy.get(path, headers={"Range": header})
        assert resp.status == 200 and resp.body == pkg.read_bytes()


@pytest.mark.parametrize("warm_first", [True, False])
async def test_head_cold_and_warm(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel, warm_first: bool
) -> None:
    pkg = channel.by_name("cp-data")
    path = f"{CH}/{pkg.url_path}"
    if warm_first:
        await warm(proxy, path)
    resp = await proxy.get(path, method="HEAD")
    assert resp.status == 200 and resp.body == b""
    assert resp.headers["Content-Length"] == str(pkg.size)
    assert resp.headers["Cache-Control"] == "public, max-age=86400"
    assert resp.xcache == ("HIT" if warm_first else "MISS")
    for name in ("repodata.json", "repodata.json.zst", "repodata_shards.msgpack.zst"):
        head = await proxy.get(f"{CH}/noarch/{name}", method="HEAD")
        assert head.status == 200 and head.body == b""


async def test_head_of_missing_file_is_404(proxy: Proxy) -> None:
    for path in (f"{CH}/osx-64/repodata.json.zst", f"{CH}/noarch/nothere-1.0-0.conda"):
        resp = await proxy.get(path, method="HEAD")
        assert resp.status == 404


async def test_repodata_fresh_within_ttl_then_revalidated(proxy_factory, upstream: FakeUpstream) -> None:
    proxy = await proxy_factory(repodata_ttl=1)
    path = f"{CH}/noarch/repodata.json"
    body = await warm(proxy, path)
    assert (await proxy.get(path)).xcache == "HIT"
    assert upstream.count(path) == 1
    await asyncio.sleep(1.2)
    again = await proxy.get(path)
    assert again.xcache == "REVALIDATED" and again.body == body
    conditional = upstream.requests_for(path)[-1].headers
    assert "If-None-Match" in conditional or "If-Modified-Since" in conditional
    # The 304 refreshed the age: the next request is a plain hit.
    assert (await proxy.get(path)).xcache == "HIT"
    assert upstream.count(path) == 2


async def test_changed_repodata_replaces_cached_copy(proxy_factory, upstream: FakeUpstream, tmp_path) -> None:
    proxy = await proxy_factory(repodata_ttl=1)
    path = f"{CH}/noarch/current_repodata.json"
    upstream.replace(path, b'{"packages": {}, "info": {"subdir": "noarch"}}', "application/json")
    first = await warm(proxy, path)
    await asyncio.sleep(1.2)
    upstream.clear_faults()
    upstream.replace(path, b'{"packages": {}, "info": {"subdir": "noarch"}, "v": 2}', "application/json")
    second = await proxy.get(path)
    await proxy.idle()
    assert second.xcache == "MISS" and second.body != first and b'"v": 2' in second.body
    assert (await proxy.get(path)).body == second.body
    # The replaced blob is gone from the store: one row, one blob.
    db = sqlite3.connect(proxy.config.cache.directory / "catalog.sqlite3")
    (blob,) = db.execute("SELECT blob_key FROM units WHERE filename='current_repodata.json'").fetchone()
    db.close()
    assert [p.name for p in (proxy.config.cache.directory / "blobs").glob("??/*") if p.name == blob]


async def test_client_conditionals_answered_with_304(proxy: Proxy, upstream: FakeUpstream) -> None:
    path = f"{CH}/noarch/repodata.json"
    first = await warm(proxy, path)
    assert first
    resp = await proxy.get(path)
    etag, modified = resp.headers["ETag"], resp.headers["Last-Modified"]
    inm = await proxy.get(path, headers={"If-None-Match": etag})
    assert inm.status == 304 and inm.body == b"" and inm.headers["ETag"] == etag
    assert inm.headers["Cache-Control"].startswith("public, max-age=")
    ims = await proxy.get(path, headers={"If-Modified-Since": modified})
    assert ims.status == 304
    other = await proxy.get(path, headers={"If-None-Match": '"not-it"'})
    assert other.status == 200 and other.body == first
    assert upstream.count(path) == 1


async def test_digests_learned_from_repodata_of_any_encoding(
    proxy: Proxy, channel: Channel, upstream: FakeUpstream
) -> None:
    for subdir, name in (("noarch", "repodata.json.zst"), ("linux-64", "repodata.json")):
        await warm(proxy, f"{CH}/{subdir}/{name}")
    for pkg in channel.packages.values():
        got = await proxy.services.catalog.expected("testchan", pkg.subdir, pkg.filename)
        assert got == (pkg.sha256, pkg.size)


async def test_digests_learned_from_shards(proxy: Proxy, channel: Channel, upstream: FakeUpstream) -> None:
    """A shard-only client: the package is verified from the shard, and no repodata.json is fetched."""
    pkg = channel.by_name("cp-big")
    resp = await proxy.get(f"{CH}/{pkg.url_path}")
    assert resp.body == pkg.read_bytes()
    await proxy.idle()
    assert (await proxy.get(f"{CH}/{pkg.url_path}")).xcache == "HIT"
    assert upstream.count(f"{CH}/{pkg.subdir}/repodata_shards.msgpack.zst") == 1
    assert upstream.count(f"{CH}/{pkg.subdir}/repodata.json") == 0
    assert upstream.count(f"{CH}/{pkg.subdir}/repodata.json.zst") == 0


async def test_package_without_shards_verified_from_repodata(
    proxy_factory, upstream: FakeUpstream, channel: Channel, tmp_path
) -> None:
    upstream.mount("noshards", channel.shardless_copy(tmp_path / "noshards"))
    proxy = await proxy_factory()
    pkg = channel.by_name("cp-data")
    resp = await proxy.get(f"/noshards/{pkg.url_path}")
    assert resp.body == pkg.read_bytes()
    await proxy.idle()
    assert (await proxy.get(f"/noshards/{pkg.url_path}")).xcache == "HIT"
    assert upstream.count(f"/noshards/{pkg.subdir}/repodata.json.zst") == 1


async def test_unit_evicted_during_revalidation_is_fetched_whole(
    proxy_factory, upstream: FakeUpstream
) -> None:
    from condaproxy.conda.paths import Request, parse_path

    proxy = await proxy_factory(repodata_ttl=1)
    path = f"{CH}/noarch/repodata.json"
    body = await warm(proxy, path)
    await asyncio.sleep(1.2)
    hold = upstream.hold_headers(path, times=1)
    pending = asyncio.ensure_future(proxy.get(path))
    await asyncio.wait_for(hold.reached.wait(), 10)
    parsed = parse_path(path)
    assert isinstance(parsed, Request)
    unit = await proxy.services.catalog.get(parsed.key)
    assert unit is not None
    await remove_unit(proxy.services.catalog, proxy.services.store, unit.key, unit.blob_key)
    hold.release()
    resp = await asyncio.wait_for(pending, 10)
    assert resp.status == 200 and resp.error is None and resp.body == body
    await proxy.idle()
    assert (await proxy.get(path)).xcache == "HIT"
