"""The blob store is content-addressed: the same bytes through two channels are stored once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from channel import Channel
from proxy import Proxy, check_invariants
from upstream import FakeUpstream

from condaproxy.cache.removal import remove_unit
from condaproxy.conda.paths import Kind, UnitKey


def blob_files(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "blobs").glob("??/*") if not p.name.startswith("."))


async def two_channels(
    proxy_factory: Callable[..., Awaitable[Proxy]], upstream: FakeUpstream, channel: Channel
) -> Proxy:
    # The same channel tree behind two names, as a mirror or a re-published channel would be.
    upstream.mount("chan-a", channel.path)
    upstream.mount("chan-b", channel.path)
    return await proxy_factory()


async def test_same_package_through_two_channels_is_one_blob(
    proxy_factory: Callable[..., Awaitable[Proxy]], upstream: FakeUpstream, channel: Channel
) -> None:
    proxy = await two_channels(proxy_factory, upstream, channel)
    pkg = channel.by_name("cp-big")
    for name in ("chan-a", "chan-b"):
        resp = await proxy.get(f"/{name}/{pkg.url_path}")
        assert (resp.status, resp.body) == (200, pkg.read_bytes())
        await proxy.idle()
    cache = proxy.config.cache.directory
    rows = check_invariants(cache)
    assert ("chan-a", pkg.subdir, pkg.filename) in rows
    assert ("chan-b", pkg.subdir, pkg.filename) in rows
    units = [u for u in await proxy.services.catalog.all_units() if u.key.filename == pkg.filename]
    assert {u.blob_key for u in units} == {pkg.sha256}
    assert [p for p in blob_files(cache) if p.name == pkg.sha256] == [
        cache / "blobs" / pkg.sha256[:2] / pkg.sha256
    ]
    # Every row of every channel: fewer blob files than rows, each blob once.
    all_units = await proxy.services.catalog.all_units()
    assert len(blob_files(cache)) == len({u.blob_key for u in all_units}) < len(all_units)


async def test_removing_one_row_keeps_the_blob_for_the_other(
    proxy_factory: Callable[..., Awaitable[Proxy]], upstream: FakeUpstream, channel: Channel
) -> None:
    proxy = await two_channels(proxy_factory, upstream, channel)
    pkg = channel.by_name("cp-data")
    for name in ("chan-a", "chan-b"):
        assert (await proxy.get(f"/{name}/{pkg.url_path}")).status == 200
        await proxy.idle()
    catalog = proxy.services.catalog
    key_a = UnitKey("chan-a", pkg.subdir, pkg.filename, Kind.PACKAGE)
    [cand] = [c for c in await catalog.eviction_candidates(1000) if c.key == key_a]
    # Evicted as the evictor would: the row goes, the blob stays (chan-b still references it).
    dropped = await catalog.evict(cand.key, cand.blob_key, cand.accessed_at)
    assert (dropped.removed, dropped.orphan) == (True, None)
    blob = proxy.config.cache.directory / "blobs" / pkg.sha256[:2] / pkg.sha256
    assert blob.is_file()
    hit = await proxy.get(f"/chan-b/{pkg.url_path}")
    assert (hit.status, hit.xcache, hit.body) == (200, "HIT", pkg.read_bytes())
    check_invariants(proxy.config.cache.directory)
    # Removing the last row frees the blob.
    key_b = UnitKey("chan-b", pkg.subdir, pkg.filename, Kind.PACKAGE)
    assert await remove_unit(catalog, proxy.services.store, key_b, pkg.sha256)
    assert not blob.exists()
    check_invariants(proxy.config.cache.directory)
    # chan-a fetches it again (a miss), and the blob is back.
    again = await proxy.get(f"/chan-a/{pkg.url_path}")
    assert (again.status, again.xcache, again.body) == (200, "MISS", pkg.read_bytes())
    await proxy.idle()
    assert blob.is_file()
    check_invariants(proxy.config.cache.directory)
