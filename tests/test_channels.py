"""Multi-segment channels: labels and defaults-style names route as channels of their own."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from channel import Channel
from proxy import Proxy, check_invariants, make_config
from test_rattler_client import solve_and_install
from upstream import FakeUpstream

from condaproxy.config.load import load_config
from condaproxy.config.model import ChannelConfig, Config

DEV_BASE = b"the dev label's own cp-base build\n" * 100


@pytest.fixture
def dev_tree(channel: Channel, tmp_path: Path) -> Path:
    """The channel as a "dev" label publishes it: cp-base is a different build, other bytes."""
    root = channel.json_only_copy(tmp_path / "dev")
    pkg = channel.by_name("cp-base")
    (root / pkg.url_path).write_bytes(DEV_BASE)
    repodata_path = root / pkg.subdir / "repodata.json"
    repodata = json.loads(repodata_path.read_bytes())
    records = repodata.get("packages.conda", {}) if pkg.filename.endswith(".conda") else repodata["packages"]
    records[pkg.filename] |= {"sha256": hashlib.sha256(DEV_BASE).hexdigest(), "size": len(DEV_BASE)}
    repodata_path.write_text(json.dumps(repodata))
    return root


def channel_config(name: str, url: str) -> ChannelConfig:
    return ChannelConfig(name=name, url=url, connect_timeout=5.0, read_timeout=5.0)


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[Proxy]:
    proxy = Proxy(config)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


def config_for(upstream: FakeUpstream, tmp_path: Path, *, unlisted: bool, **channels: str) -> Config:
    """A test config with [channel:NAME] sections (NAME="/"-joined, keyword "__" for "/")."""
    base = make_config(tmp_path / "cache", upstream.url)
    sections = {
        n.replace("__", "/"): channel_config(n.replace("__", "/"), f"{upstream.url}/{p}")
        for n, p in channels.items()
    }
    return replace(base, upstream=replace(base.upstream, allow_unlisted=unlisted), channels=sections)


# --- end to end -------------------------------------------------------------------------


async def test_rattler_installs_from_a_defaults_style_channel(
    upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    # Like [channel:pkgs/main] url = https://repo.anaconda.com/pkgs/main: not under the default upstream.
    upstream.mount("repo/pkgs/main", channel.path)
    config = config_for(upstream, tmp_path, unlisted=False, pkgs__main="repo/pkgs/main")
    async with running(config) as proxy:
        names = await solve_and_install(
            f"{proxy.url}/pkgs/main", tmp_path / "env", tmp_path / "client", sharded=True
        )
        assert any(n.startswith("cp-extra-") for n in names)
        assert upstream.requests and all(r.path.startswith("/repo/pkgs/main/") for r in upstream.requests)
        await proxy.idle()
        rows = check_invariants(proxy.config.cache.directory)
        assert {c for c, _, _ in rows} == {"pkgs/main"}
        assert set(names) <= {f for _, _, f in rows}
        # Only configured channels are served here.
        assert (await proxy.get(f"/testchan/{channel.by_name('cp-base').url_path}")).status == 404
        assert (await proxy.get(f"/pkgs/{channel.by_name('cp-base').url_path}")).status == 404


async def test_a_label_is_isolated_from_its_channel(
    upstream: FakeUpstream, channel: Channel, dev_tree: Path, tmp_path: Path
) -> None:
    upstream.mount("testchan/label/dev", dev_tree)
    pkg = channel.by_name("cp-base")
    async with running(make_config(tmp_path / "cache", upstream.url)) as proxy:
        dev = await proxy.get(f"/testchan/label/dev/{pkg.url_path}")
        assert (dev.status, dev.xcache, dev.body) == (200, "MISS", DEV_BASE)
        await proxy.idle()
        assert (await proxy.get(f"/testchan/label/dev/{pkg.url_path}")).xcache == "HIT"
        # The main channel's unit is another unit: fetched from its own upstream path, its own bytes.
        main = await proxy.get(f"/testchan/{pkg.url_path}")
        assert (main.status, main.xcache, main.body) == (200, "MISS", pkg.read_bytes())
        assert upstream.count(f"/testchan/{pkg.url_path}") == 1
        assert upstream.count(f"/testchan/label/dev/{pkg.url_path}") == 1
        await proxy.idle()
        for path, body in (
            (f"/testchan/label/dev/{pkg.url_path}", DEV_BASE),
            (f"/testchan/{pkg.url_path}", pkg.read_bytes()),
        ):
            again = await proxy.get(path)
            assert (again.xcache, again.body) == ("HIT", body)
        rows = check_invariants(proxy.config.cache.directory)
        assert ("testchan/label/dev", pkg.subdir, pkg.filename) in rows
        assert ("testchan", pkg.subdir, pkg.filename) in rows
        meta_dev = await proxy.get(f"/testchan/label/dev/{pkg.subdir}/repodata.json")
        meta_main = await proxy.get(f"/testchan/{pkg.subdir}/repodata.json")
        assert meta_dev.body != meta_main.body


async def test_an_unlisted_label_maps_under_the_default_upstream(
    upstream: FakeUpstream, channel: Channel, dev_tree: Path, tmp_path: Path
) -> None:
    upstream.mount("testchan/label/dev", dev_tree)
    async with running(make_config(tmp_path / "cache", upstream.url)) as proxy:
        resp = await proxy.get("/testchan/label/dev/noarch/repodata.json")
        assert resp.status == 200
        assert resp.body == (dev_tree / "noarch" / "repodata.json").read_bytes()
        assert upstream.count("/testchan/label/dev/noarch/repodata.json") == 1


async def test_a_label_follows_its_configured_parent_channel(
    upstream: FakeUpstream, channel: Channel, dev_tree: Path, tmp_path: Path
) -> None:
    # [channel:testchan] points at a mirror; its labels are fetched from that mirror too.
    upstream.mount("mirror/testchan", channel.path)
    upstream.mount("mirror/testchan/label/dev", dev_tree)
    config = config_for(upstream, tmp_path, unlisted=True, testchan="mirror/testchan")
    pkg = channel.by_name("cp-base")
    async with running(config) as proxy:
        resp = await proxy.get(f"/testchan/label/dev/{pkg.url_path}")
        assert (resp.status, resp.body) == (200, DEV_BASE)
        assert upstream.count(f"/mirror/testchan/label/dev/{pkg.url_path}") == 1
        assert not [r for r in upstream.requests if not r.path.startswith("/mirror/testchan/")]
        await proxy.idle()
        check_invariants(proxy.config.cache.directory)


# --- Config.channel ---------------------------------------------------------------------


def test_label_lookup_falls_back_to_the_configured_parent(tmp_path: Path) -> None:
    ini = tmp_path / "proxy.ini"
    (tmp_path / "acs").mkdir()
    ini.write_text(
        "[upstream]\ndefault = https://default.example\n"
        "[channel:conda-forge]\nurl = https://a.example/cf, https://b.example/cf\nread_timeout = 7\n"
        "alternate_source = acs\n"
        "[channel:conda-forge/label/rc]\nurl = https://rc.example/cf-rc\n"
        "[channel:pkgs/main]\nurl = https://repo.example/pkgs/main\n"
    )
    config = load_config(ini)
    dev = config.channel("conda-forge/label/dev")
    assert dev is not None
    assert dev.name == "conda-forge/label/dev"
    assert dev.urls == ("https://a.example/cf/label/dev", "https://b.example/cf/label/dev")
    assert dev.url == dev.urls[0]
    assert dev.read_timeout == 7.0
    assert dev.alternate_source is None  # the parent's local tree holds the parent's packages only
    assert config.channel("conda-forge/label/rc") is config.channels["conda-forge/label/rc"]  # exact wins
    other = config.channel("bioconda/label/dev")
    assert other is not None and other.url == "https://default.example/bioconda/label/dev"
    # Only <parent>/label/<label> follows the parent; other sub-paths are channels of their own.
    sub = config.channel("conda-forge/extra")
    assert sub is not None and sub.url == "https://default.example/conda-forge/extra"
    deep = config.channel("conda-forge/label/dev/x")
    assert deep is not None and deep.url == "https://default.example/conda-forge/label/dev/x"
    lab = config.channel("pkgs/main/label/x")
    assert lab is not None and lab.url == "https://repo.example/pkgs/main/label/x"


def test_label_fallback_respects_allow_unlisted(tmp_path: Path) -> None:
    ini = tmp_path / "proxy.ini"
    ini.write_text(
        "[upstream]\nallow_unlisted = no\n[channel:conda-forge]\nurl = https://a.example/cf\n"
        "[channel:conda-forge/label/ok]\nurl = https://a.example/cf/label/ok\n"
    )
    config = load_config(ini)
    # Closed proxies serve exactly the listed channels: a label must be listed on its own.
    assert config.channel("conda-forge/label/dev") is None
    assert config.channel("conda-forge/label/ok") is not None
