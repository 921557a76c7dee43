"""Alternate content sources: a local channel tree serves packages that verify, and only those."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from channel import Channel, PackageInfo
from proxy import Proxy, check_invariants, make_config
from test_rattler_client import solve_and_install
from upstream import FakeUpstream

from condaproxy.cache.altsource import local_path
from condaproxy.conda.paths import Kind, UnitKey
from condaproxy.config.load import load_config
from condaproxy.config.model import ChannelConfig
from condaproxy.errors import ConfigError


def acs_tree(channel: Channel, root: Path, keep: Callable[[PackageInfo], bool] = lambda p: True) -> Path:
    """A local tree holding (some of) the channel's packages, laid out <subdir>/<file>."""
    for pkg in channel.packages.values():
        if keep(pkg):
            (root / pkg.subdir).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(pkg.path, root / pkg.url_path)
    return root


@asynccontextmanager
async def acs_proxy(upstream: FakeUpstream, tmp_path: Path, acs: Path) -> AsyncIterator[Proxy]:
    """A proxy whose testchan section names acs as its alternate source."""
    base = make_config(tmp_path / "cache", upstream.url)
    chan = ChannelConfig(
        name="testchan",
        url=f"{upstream.url}/testchan",
        connect_timeout=5.0,
        read_timeout=5.0,
        alternate_source=acs,
    )
    proxy = Proxy(replace(base, channels={"testchan": chan}))
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


def package_requests(upstream: FakeUpstream) -> list[str]:
    return [r.path for r in upstream.requests if r.path.endswith((".conda", ".tar.bz2"))]


async def test_verified_local_copy_is_served_and_cached_without_upstream(
    upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    pkg = channel.by_name("cp-data")
    acs = acs_tree(channel, tmp_path / "acs")
    async with acs_proxy(upstream, tmp_path, acs) as proxy:
        first = await proxy.get(f"/testchan/{pkg.url_path}")
        assert first.status == 200 and first.error is None
        assert first.body == pkg.read_bytes()
        assert first.xcache == "MISS"
        await proxy.idle()
        again = await proxy.get(f"/testchan/{pkg.url_path}")
        assert (again.status, again.xcache, again.body) == (200, "HIT", pkg.read_bytes())
        # The digest came from the channel's own metadata (fetched through the proxy), the bytes not.
        assert upstream.count(f"/testchan/{pkg.url_path}") == 0
        assert upstream.requests, "the channel's metadata should have been fetched to verify"
        rows = check_invariants(proxy.config.cache.directory)
        assert ("testchan", pkg.subdir, pkg.filename) in rows


async def test_concurrent_requests_share_one_local_copy(
    upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    pkg = channel.by_name("cp-big")
    acs = acs_tree(channel, tmp_path / "acs")
    async with acs_proxy(upstream, tmp_path, acs) as proxy:
        answers = await asyncio.gather(*(proxy.get(f"/testchan/{pkg.url_path}") for _ in range(5)))
        assert all(a.status == 200 and a.body == pkg.read_bytes() for a in answers)
        assert sorted(a.xcache or "" for a in answers).count("MISS") == 1
        assert package_requests(upstream) == []
        await proxy.idle()
        check_invariants(proxy.config.cache.directory)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "longer"])
async def test_a_file_that_does_not_match_is_ignored(
    upstream: FakeUpstream, channel: Channel, tmp_path: Path, damage: str
) -> None:
    pkg = channel.by_name("cp-tools")
    acs = acs_tree(channel, tmp_path / "acs")
    data = bytearray(pkg.read_bytes())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncated":
        del data[-10:]
    else:
        data += b"\0"
    (acs / pkg.url_path).write_bytes(bytes(data))
    async with acs_proxy(upstream, tmp_path, acs) as proxy:
        resp = await proxy.get(f"/testchan/{pkg.url_path}")
        assert (resp.status, resp.xcache, resp.body) == (200, "MISS", pkg.read_bytes())
        assert upstream.count(f"/testchan/{pkg.url_path}") == 1
        await proxy.idle()
        assert (await proxy.get(f"/testchan/{pkg.url_path}")).xcache == "HIT"
        check_invariants(proxy.config.cache.directory)


async def test_a_package_missing_locally_comes_from_upstream(
    upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    pkg = channel.by_name("cp-base")
    acs = acs_tree(channel, tmp_path / "acs", keep=lambda p: p.name != "cp-base")
    async with acs_proxy(upstream, tmp_path, acs) as proxy:
        resp = await proxy.get(f"/testchan/{pkg.url_path}")
        assert (resp.status, resp.body) == (200, pkg.read_bytes())
        assert upstream.count(f"/testchan/{pkg.url_path}") == 1
        await proxy.idle()
        check_invariants(proxy.config.cache.directory)


async def test_a_file_the_channel_does_not_list_is_never_trusted(
    upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    acs = tmp_path / "acs"
    (acs / "noarch").mkdir(parents=True)
    (acs / "noarch" / "cp-ghost-1.0-0.conda").write_bytes(b"not in any repodata")
    async with acs_proxy(upstream, tmp_path, acs) as proxy:
        resp = await proxy.get("/testchan/noarch/cp-ghost-1.0-0.conda")
        assert resp.status == 404  # asked upstream, which has no such file
        assert upstream.count("/testchan/noarch/cp-ghost-1.0-0.conda") == 1
        await proxy.idle()
        assert ("testchan", "noarch", "cp-ghost-1.0-0.conda") not in check_invariants(
            proxy.config.cache.directory
        )


async def test_rattler_installs_with_zero_upstream_package_requests(
    upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    acs = acs_tree(channel, tmp_path / "acs")
    async with acs_proxy(upstream, tmp_path, acs) as proxy:
        names = await solve_and_install(
            f"{proxy.url}/testchan", tmp_path / "env", tmp_path / "client", sharded=True
        )
        assert any(n.startswith("cp-extra-") for n in names)
        assert package_requests(upstream) == []
        await proxy.idle()
        rows = check_invariants(proxy.config.cache.directory)
        assert set(names) <= {f for _, _, f in rows}


def test_only_packages_in_a_subdir_are_looked_up(tmp_path: Path) -> None:
    assert local_path(tmp_path, UnitKey("c", "noarch", "a-1-0.conda", Kind.PACKAGE)) == (
        tmp_path / "noarch" / "a-1-0.conda"
    )
    assert local_path(tmp_path, UnitKey("c", "noarch", "repodata.json", Kind.REPODATA)) is None
    assert (
        local_path(tmp_path, UnitKey("c", "noarch", "shards/" + "0" * 64 + ".msgpack.zst", Kind.SHARD))
        is None
    )


def test_config_alternate_source(tmp_path: Path) -> None:
    (tmp_path / "etc" / "mirror").mkdir(parents=True)
    ini = tmp_path / "etc" / "proxy.ini"
    ini.write_text("[channel:conda-forge]\nurl = https://conda.example/cf\nalternate_source = mirror\n")
    chan = load_config(ini).channels["conda-forge"]
    assert chan.alternate_source == tmp_path / "etc" / "mirror"  # relative to the config file
    ini.write_text("[channel:conda-forge]\nurl = https://conda.example/cf\nalternate_source = nowhere\n")
    with pytest.raises(ConfigError) as err:
        load_config(ini)
    assert (err.value.section, err.value.key) == ("channel:conda-forge", "alternate_source")
