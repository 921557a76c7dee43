"""Repodata as clients meet it: variants kept in step, derived when missing, coded on demand,
stale-while-revalidate, CEP-16 shards that live on another host, and channel-level files."""

from __future__ import annotations

import asyncio
import bz2
import gzip
import hashlib
import json
import time
from pathlib import Path

import msgpack
import pytest
import zstandard
from channel import Channel
from gates import GATED, GatedStore
from proxy import Proxy, check_invariants
from test_rattler_client import solve_and_install
from upstream import FakeUpstream

from condaproxy.cache.removal import remove_unit
from condaproxy.conda.paths import Request, parse_path


def unzstd(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


async def finished(proxy: Proxy, path: str) -> None:
    """Wait until the download of path (if one runs) has ended: persisted and learned from."""
    parsed = parse_path(path)
    assert isinstance(parsed, Request)
    dl = proxy.services.inflight.get(parsed.key)
    if dl is not None and dl.task is not None:
        await asyncio.wait_for(asyncio.shield(dl.task), 10)


async def settle(proxy: Proxy) -> None:
    await proxy.idle()
    await asyncio.sleep(0.05)
    await proxy.idle()


@pytest.fixture
async def json_only(upstream: FakeUpstream, channel: Channel, tmp_path: Path) -> Path:
    root = channel.json_only_copy(tmp_path / "jsononly")
    upstream.mount("jsononly", root)
    return root


async def test_zst_derived_when_upstream_has_only_json(
    proxy: Proxy, upstream: FakeUpstream, json_only: Path
) -> None:
    want = (json_only / "noarch" / "repodata.json").read_bytes()
    zst = await proxy.get("/jsononly/noarch/repodata.json.zst")
    assert zst.status == 200 and unzstd(zst.body) == want
    bz = await proxy.get("/jsononly/noarch/repodata.json.bz2")
    assert bz.status == 200 and bz2.decompress(bz.body) == want
    await settle(proxy)
    again = await proxy.get("/jsononly/noarch/repodata.json.zst")
    assert again.xcache == "HIT" and again.body == zst.body
    assert upstream.count("/jsononly/noarch/repodata.json") == 1
    assert upstream.count("/jsononly/noarch/repodata.json.zst") == 1  # asked once, 404, derived
    check_invariants(proxy.config.cache.directory)


async def test_json_derived_from_zst_and_current_repodata_from_repodata(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    root = tmp_path / "zstonly"
    for subdir in ("noarch", "linux-64"):
        (root / subdir).mkdir(parents=True)
        (root / subdir / "repodata.json.zst").write_bytes(
            (channel.path / subdir / "repodata.json.zst").read_bytes()
        )
    upstream.mount("zstonly", root)
    want = (channel.path / "noarch" / "repodata.json").read_bytes()
    plain = await proxy.get("/zstonly/noarch/repodata.json")
    assert plain.status == 200 and json.loads(plain.body) == json.loads(want)
    current = await proxy.get("/zstonly/noarch/current_repodata.json")
    assert current.status == 200 and json.loads(current.body) == json.loads(want)


async def test_no_variant_upstream_is_404(proxy: Proxy) -> None:
    for name in ("repodata.json", "repodata.json.zst", "repodata.json.bz2", "current_repodata.json"):
        assert (await proxy.get(f"/testchan/win-64/{name}")).status == 404


async def test_fresh_json_never_beside_stale_zst(
    proxy_factory, upstream: FakeUpstream, channel: Channel
) -> None:
    proxy = await proxy_factory(repodata_ttl=30)
    v1 = (channel.path / "noarch" / "repodata.json").read_bytes()
    old = await proxy.get("/testchan/noarch/repodata.json.zst")
    assert unzstd(old.body) == v1
    await settle(proxy)
    # Upstream publishes a new version of both variants.
    doc = json.loads(v1)
    doc["info"]["changed"] = True
    v2 = json.dumps(doc).encode()
    upstream.replace("/testchan/noarch/repodata.json", v2, "application/json")
    upstream.replace(
        "/testchan/noarch/repodata.json.zst", zstandard.ZstdCompressor().compress(v2), "application/zstd"
    )
    fresh_json = await proxy.get("/testchan/noarch/repodata.json")
    assert fresh_json.body == v2
    await settle(proxy)
    # The .zst is still within its TTL, but a newer .json was seen: it must not be served stale.
    zst = await proxy.get("/testchan/noarch/repodata.json.zst")
    assert unzstd(zst.body) == v2


async def test_derived_variant_follows_its_source(
    proxy_factory, upstream: FakeUpstream, json_only: Path
) -> None:
    proxy = await proxy_factory(repodata_ttl=1)
    v1 = (json_only / "noarch" / "repodata.json").read_bytes()
    assert unzstd((await proxy.get("/jsononly/noarch/repodata.json.zst")).body) == v1
    await settle(proxy)
    v2 = v1.replace(b'"subdir":"noarch"', b'"subdir":"noarch","v":2', 1)
    assert v2 != v1
    upstream.replace("/jsononly/noarch/repodata.json", v2, "application/json")
    await asyncio.sleep(1.2)
    zst = await proxy.get("/jsononly/noarch/repodata.json.zst")
    assert unzstd(zst.body) == v2
    await settle(proxy)
    check_invariants(proxy.config.cache.directory)


@pytest.mark.parametrize("coding", ["gzip", "zstd"])
async def test_repodata_json_honours_accept_encoding(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel, coding: str
) -> None:
    path = "/testchan/linux-64/repodata.json"
    want = (channel.path / "linux-64" / "repodata.json").read_bytes()
    first = await proxy.get(path, headers={"Accept-Encoding": f"{coding}, deflate"})
    assert first.body == want and "Content-Encoding" not in first.headers
    assert first.headers["Vary"] == "Accept-Encoding"
    await settle(proxy)
    deadline = time.monotonic() + 10
    while True:
        coded = await proxy.get(path, headers={"Accept-Encoding": coding})
        if coded.headers.get("Content-Encoding") == coding or time.monotonic() > deadline:
            break
        await settle(proxy)
    assert coded.headers.get("Content-Encoding") == coding
    decoded = gzip.decompress(coded.body) if coding == "gzip" else unzstd(coded.body)
    assert decoded == want
    assert coded.headers["Vary"] == "Accept-Encoding" and coded.headers["ETag"] != first.headers["ETag"]
    plain = await proxy.get(path, headers={"Accept-Encoding": "identity"})
    assert plain.body == want and "Content-Encoding" not in plain.headers
    refused = await proxy.get(path, headers={"Accept-Encoding": f"{coding};q=0"})
    assert "Content-Encoding" not in refused.headers
    assert upstream.count(path) == 1


async def test_stale_while_revalidate_answers_at_once(proxy_factory, upstream: FakeUpstream) -> None:
    proxy = await proxy_factory(repodata_ttl=1, repodata_stale_while_revalidate=30)
    path = "/testchan/noarch/repodata.json"
    body = (await proxy.get(path)).body
    await settle(proxy)
    await asyncio.sleep(1.2)
    upstream.delay_headers(path, 3, times=1)  # a slow upstream
    started = time.monotonic()
    stale = await proxy.get(path)
    assert time.monotonic() - started < 2.0
    assert stale.status == 200 and stale.xcache == "STALE" and stale.body == body
    assert int(stale.headers["Age"]) >= 1
    await upstream.wait_for(path, 2)
    await settle(proxy)
    assert (await proxy.get(path)).xcache == "HIT"
    assert upstream.count(path) == 2  # exactly one background revalidation


async def test_swr_off_revalidates_synchronously(proxy_factory, upstream: FakeUpstream) -> None:
    proxy = await proxy_factory(repodata_ttl=1)
    path = "/testchan/noarch/repodata.json"
    await proxy.get(path)
    await settle(proxy)
    await asyncio.sleep(1.2)
    assert (await proxy.get(path)).xcache == "REVALIDATED"


@pytest.fixture
async def foreign_shards(upstream: FakeUpstream, channel: Channel, tmp_path: Path) -> FakeUpstream:
    """A copy of the channel whose shard indexes say the shards live on a second host."""
    cdn = FakeUpstream()
    await cdn.start()
    root = channel.shardless_copy(tmp_path / "cdnchan")
    for subdir in ("noarch", "linux-64"):
        cdn.mount(f"shardhost/{subdir}", channel.path / subdir / "shards")
        raw = (channel.path / subdir / "repodata_shards.msgpack.zst").read_bytes()
        index = msgpack.unpackb(unzstd(raw), raw=False)
        index["info"]["shards_base_url"] = f"{cdn.url}/shardhost/{subdir}/"
        packed = zstandard.ZstdCompressor().compress(msgpack.packb(index, use_bin_type=True))
        (root / subdir / "repodata_shards.msgpack.zst").write_bytes(packed)
    upstream.mount("cdnchan", root)
    yield cdn
    await cdn.close()


async def test_absolute_shards_base_url_is_rewritten_and_mapped(
    proxy_factory, upstream: FakeUpstream, foreign_shards: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    # The second host is plain http on 127.0.0.1: the channel's section says it is trusted.
    proxy = await proxy_factory(trusted={"cdnchan": (foreign_shards.url,)})
    index = await proxy.get("/cdnchan/noarch/repodata_shards.msgpack.zst")
    served = msgpack.unpackb(unzstd(index.body), raw=False)
    assert served["info"]["shards_base_url"] == "./shards/"
    names = await solve_and_install(
        f"{proxy.url}/cdnchan", tmp_path / "env", tmp_path / "client", sharded=True
    )
    assert any(n.startswith("cp-extra-") for n in names)
    # Every shard came through the proxy (whose User-Agent is condaproxy's), none straight from the CDN.
    assert foreign_shards.requests, "shards were fetched from the second host"
    assert all(r.headers.get("User-Agent", "").startswith("condaproxy/") for r in foreign_shards.requests)
    await settle(proxy)
    rows = check_invariants(proxy.config.cache.directory)
    assert {f for _, _, f in rows} >= set(names)


async def test_a_shard_asked_for_after_its_index_was_evicted_still_comes_from_its_host(
    proxy_factory, foreign_shards: FakeUpstream, tmp_path: Path
) -> None:
    # A client keeps its index for up to an hour; the proxy may evict it meanwhile and restart,
    # and the start forgets the bases of subdirs with no metadata left.
    cache = tmp_path / "shared-cache"
    # The second host is plain http on 127.0.0.1: the channel's section says it is trusted.
    trusted = {"cdnchan": (foreign_shards.url,)}
    first: Proxy = await proxy_factory(cache_dir=cache, trusted=trusted)
    index = await first.get("/cdnchan/noarch/repodata_shards.msgpack.zst")
    await settle(first)
    digest = next(iter(msgpack.unpackb(unzstd(index.body), raw=False)["shards"].values())).hex()
    catalog = first.services.catalog
    [unit] = [u for u in await catalog.all_units() if u.key.filename == "repodata_shards.msgpack.zst"]
    assert await remove_unit(catalog, first.services.store, unit.key, unit.blob_key)
    await first.close()
    second: Proxy = await proxy_factory(cache_dir=cache, trusted=trusted)
    assert await second.services.catalog.shard_base("cdnchan", "noarch") is None
    shard = await second.get(f"/cdnchan/noarch/shards/{digest}.msgpack.zst")
    assert shard.status == 200 and hashlib.sha256(shard.body).hexdigest() == digest
    await settle(second)
    check_invariants(cache)


async def test_rewritten_index_revalidates_with_upstream_validators(
    proxy_factory, upstream: FakeUpstream, foreign_shards: FakeUpstream
) -> None:
    proxy = await proxy_factory(repodata_ttl=1)
    path = "/cdnchan/linux-64/repodata_shards.msgpack.zst"
    first = await proxy.get(path)
    await settle(proxy)
    await asyncio.sleep(1.2)
    again = await proxy.get(path)
    assert again.xcache == "REVALIDATED" and again.body == first.body
    assert again.headers["ETag"] == first.headers["ETag"]
    assert "If-None-Match" in upstream.requests_for(path)[-1].headers
    mine = await proxy.get(path, headers={"If-None-Match": first.headers["ETag"]})
    assert mine.status == 304


async def test_channel_level_files(
    proxy_factory, upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    root = channel.shardless_copy(tmp_path / "full")
    (root / "channeldata.json").write_text('{"channeldata_version": 1, "packages": {}}')
    (root / "noarch" / "index.html").write_text("<html>noarch</html>")
    (root / "linux-64" / "run_exports.json").write_text("{}")
    (root / "noarch" / "repodata.jlap").write_text("0" * 64 + "\n")
    upstream.mount("full", root)
    proxy = await proxy_factory(repodata_ttl=7)
    for path in (
        "/full/channeldata.json",
        "/full/noarch/index.html",
        "/full/linux-64/run_exports.json",
        "/full/noarch/repodata.jlap",
    ):
        resp = await proxy.get(path)
        assert resp.status == 200 and resp.body == (root / path.removeprefix("/full/")).read_bytes()
        # Not a package: mutable, so it gets the repodata lifetime, not the immutable one.
        assert resp.headers["Cache-Control"] == "public, max-age=7"
    await settle(proxy)
    assert (await proxy.get("/full/channeldata.json")).xcache == "HIT"


async def test_index_naming_its_own_shards_by_absolute_url_is_still_rewritten(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    """An absolute URL to the very same place upstream still sends clients past the proxy."""
    root = channel.shardless_copy(tmp_path / "selfabs")
    for subdir in ("noarch", "linux-64"):
        (root / subdir / "shards").mkdir()
        for shard in (channel.path / subdir / "shards").iterdir():
            (root / subdir / "shards" / shard.name).write_bytes(shard.read_bytes())
        index = msgpack.unpackb(
            unzstd((channel.path / subdir / "repodata_shards.msgpack.zst").read_bytes()), raw=False
        )
        index["info"]["shards_base_url"] = f"{upstream.url}/selfabs/{subdir}/shards/"
        (root / subdir / "repodata_shards.msgpack.zst").write_bytes(
            zstandard.ZstdCompressor().compress(msgpack.packb(index, use_bin_type=True))
        )
    upstream.mount("selfabs", root)
    served = msgpack.unpackb(
        unzstd((await proxy.get("/selfabs/noarch/repodata_shards.msgpack.zst")).body), raw=False
    )
    assert served["info"]["shards_base_url"] == "./shards/"
    names = await solve_and_install(
        f"{proxy.url}/selfabs", tmp_path / "env", tmp_path / "client", sharded=True
    )
    assert any(n.startswith("cp-extra-") for n in names)


async def test_index_naming_a_foreign_package_base_is_rewritten_and_mapped(
    proxy_factory, upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    """A shard-only client learns package locations from the index's info.base_url (CEP-15)."""
    pkghost = FakeUpstream()
    await pkghost.start()
    try:
        # The package host is plain http on 127.0.0.1: the channel's section says it is trusted.
        proxy = await proxy_factory(trusted={"pkgbase": (pkghost.url,)})
        root = tmp_path / "pkgbase"
        for subdir in ("noarch", "linux-64"):
            pkghost.mount(f"pkgs/{subdir}", channel.path / subdir)
            (root / subdir / "shards").mkdir(parents=True)
            for shard in (channel.path / subdir / "shards").iterdir():
                (root / subdir / "shards" / shard.name).write_bytes(shard.read_bytes())
            raw = (channel.path / subdir / "repodata_shards.msgpack.zst").read_bytes()
            index = msgpack.unpackb(unzstd(raw), raw=False)
            index["info"]["base_url"] = f"{pkghost.url}/pkgs/{subdir}/"
            (root / subdir / "repodata_shards.msgpack.zst").write_bytes(
                zstandard.ZstdCompressor().compress(msgpack.packb(index, use_bin_type=True))
            )
        upstream.mount("pkgbase", root)  # no packages here: they live on pkghost only
        served = msgpack.unpackb(
            unzstd((await proxy.get("/pkgbase/linux-64/repodata_shards.msgpack.zst")).body), raw=False
        )
        assert served["info"]["base_url"] == ""
        names = await solve_and_install(
            f"{proxy.url}/pkgbase", tmp_path / "env", tmp_path / "client", sharded=True
        )
        assert any(n.startswith("cp-extra-") for n in names)
        assert pkghost.requests and all(
            r.headers.get("User-Agent", "").startswith("condaproxy/") for r in pkghost.requests
        )
        await settle(proxy)
        rows = check_invariants(proxy.config.cache.directory)
        assert set(names) <= {f for _, _, f in rows}
    finally:
        await pkghost.close()


async def test_undecodable_source_fails_cleanly(proxy: Proxy, upstream: FakeUpstream, tmp_path: Path) -> None:
    root = tmp_path / "brokenzst"
    (root / "noarch").mkdir(parents=True)
    (root / "noarch" / "repodata.json.zst").write_bytes(b"\x28\xb5\x2f\xfd this is not zstd at all")
    upstream.mount("brokenzst", root)
    resp = await proxy.get("/brokenzst/noarch/repodata.json")
    assert resp.status == 404  # nothing it could be made from: as missing as it is upstream
    await settle(proxy)
    check_invariants(proxy.config.cache.directory)


async def test_real_client_on_a_json_only_channel(
    proxy: Proxy, upstream: FakeUpstream, json_only: Path, tmp_path: Path
) -> None:
    """rattler probes .zst first: it gets one made from .json, and installs."""
    names = await solve_and_install(
        f"{proxy.url}/jsononly", tmp_path / "env", tmp_path / "client", sharded=False
    )
    assert any(n.startswith("cp-extra-") for n in names)
    asked = [r for r in upstream.requests if r.path.endswith("repodata.json.zst")]
    assert asked, "the client's .zst request reached the upstream once, as a probe"
    assert upstream.count("/jsononly/noarch/repodata.json") == 1
    await settle(proxy)
    check_invariants(proxy.config.cache.directory)


@pytest.mark.parametrize("name", ["repodata.json.zst", "current_repodata.json"])
async def test_a_source_failing_makes_the_derived_variant_5xx_never_404(
    proxy: Proxy, upstream: FakeUpstream, json_only: Path, name: str
) -> None:
    # Upstream lacks every variant but repodata.json, which answers 503 just now: conda would
    # remember a 404 ("no .zst", "no current_repodata") for days, so the answer must be a 5xx.
    upstream.status("/jsononly/noarch/repodata.json", 503, times=1)
    failed = await proxy.get(f"/jsononly/noarch/{name}")
    assert failed.status == 502, (failed.status, failed.body)
    await settle(proxy)
    # Nothing negative was remembered: the next request derives it.
    again = await proxy.get(f"/jsononly/noarch/{name}")
    assert again.status == 200
    await settle(proxy)
    check_invariants(proxy.config.cache.directory)


async def test_a_revalidation_answered_after_a_sibling_changed_does_not_refresh_the_row(
    proxy_factory, upstream: FakeUpstream, channel: Channel
) -> None:
    proxy = await proxy_factory(repodata_ttl=300)
    catalog = proxy.services.catalog
    json_path, zst_path = "/testchan/noarch/repodata.json", "/testchan/noarch/repodata.json.zst"
    v1 = (channel.path / "noarch" / "repodata.json").read_bytes()
    assert (await proxy.get(json_path)).body == v1
    await settle(proxy)
    old_zst = await proxy.get(zst_path)
    await settle(proxy)
    # Both are due for revalidation (as when their TTL runs out).
    await catalog.expire("testchan", "noarch", ["repodata.json", "repodata.json.zst"])
    # The .zst revalidation goes out and is answered late, with a 304 made before the change.
    late = upstream.hold_headers(zst_path, times=1)
    upstream.status(zst_path, 304, headers={"ETag": old_zst.headers["ETag"]}, times=1)
    zst_request = asyncio.ensure_future(proxy.get(zst_path))
    await asyncio.wait_for(late.reached.wait(), 10)
    # Meanwhile upstream publishes new content, and the proxy sees it through the .json.
    doc = json.loads(v1)
    doc["info"]["changed"] = True
    v2 = json.dumps(doc).encode()
    upstream.replace(json_path, v2, "application/json")
    upstream.replace(zst_path, zstandard.ZstdCompressor().compress(v2), "application/zstd")
    assert (await proxy.get(json_path)).body == v2
    await finished(proxy, json_path)
    late.release()
    answered = await zst_request
    assert unzstd(answered.body) == v2, "a 304 sent before the sibling changed revived the old .zst"
    await settle(proxy)
    assert unzstd((await proxy.get(zst_path)).body) == v2
    check_invariants(proxy.config.cache.directory)


async def test_siblings_expire_as_soon_as_new_content_is_downloaded(
    proxy_factory, upstream: FakeUpstream, channel: Channel
) -> None:
    proxy = await proxy_factory(repodata_ttl=300, parts=GATED)
    store = proxy.services.store
    assert isinstance(store, GatedStore)
    json_path, zst_path = "/testchan/noarch/repodata.json", "/testchan/noarch/repodata.json.zst"
    v1 = (channel.path / "noarch" / "repodata.json").read_bytes()
    assert (await proxy.get(json_path)).body == v1
    await settle(proxy)
    assert unzstd((await proxy.get(zst_path)).body) == v1
    await settle(proxy)
    await proxy.services.catalog.expire("testchan", "noarch", ["repodata.json"])
    doc = json.loads(v1)
    doc["info"]["changed"] = True
    v2 = json.dumps(doc).encode()
    upstream.replace(json_path, v2, "application/json")
    upstream.replace(zst_path, zstandard.ZstdCompressor().compress(v2), "application/zstd")
    # The new .json reaches its client whole, while its persist is still held.
    persisting = store.hold_put()
    assert (await proxy.get(json_path)).body == v2
    await asyncio.wait_for(persisting.reached.wait(), 10)
    zst = await proxy.get(zst_path)
    persisting.release()
    assert unzstd(zst.body) == v2, "a client saw the new .json and then the old .zst"
    await settle(proxy)
    check_invariants(proxy.config.cache.directory)
