"""A real client, py-rattler, solves and installs environments through the proxy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import rattler
from channel import Channel
from proxy import Proxy, check_invariants
from upstream import FakeUpstream


async def solve_and_install(channel_url: str, prefix: Path, cache: Path, *, sharded: bool) -> list[str]:
    """Solve cp-extra for linux-64 through channel_url and install it; returns installed file names."""
    gateway = rattler.Gateway(
        cache_dir=cache / "repodata",
        default_config=rattler.SourceConfig(sharded_enabled=sharded),
    )
    records = await rattler.solve(
        sources=[channel_url],
        specs=["cp-extra"],
        gateway=gateway,
        platforms=["linux-64", "noarch"],
        virtual_packages=[],
    )
    await rattler.install(records, target_prefix=prefix, cache_dir=cache / "pkgs", show_progress=False)
    meta = sorted((prefix / "conda-meta").glob("*.json"))
    return [json.loads(m.read_text())["fn"] for m in meta]


def requested(upstream: FakeUpstream) -> set[str]:
    return {r.path.rsplit("/", 1)[-1] for r in upstream.requests}


@pytest.mark.parametrize("sharded", [True, False])
async def test_install_through_proxy_cold_then_warm(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel, tmp_path: Path, sharded: bool
) -> None:
    url = f"{proxy.url}/testchan"
    names = await solve_and_install(url, tmp_path / "env1", tmp_path / "client1", sharded=sharded)
    installed = {channel.packages[k].name for k in channel.packages if channel.packages[k].filename in names}
    assert installed == {"cp-extra", "cp-app", "cp-lib", "cp-base", "cp-big", "cp-tools", "cp-data"}
    if sharded:
        assert "repodata_shards.msgpack.zst" in requested(upstream)
    await proxy.idle()
    check_invariants(proxy.config.cache.directory)
    fetched = len(upstream.requests)
    upstream.reset_counts()
    # A second, fresh client: everything comes from the proxy's store, nothing from upstream.
    names2 = await solve_and_install(url, tmp_path / "env2", tmp_path / "client2", sharded=sharded)
    assert names2 == names
    assert upstream.requests == [], f"warm install still went upstream ({fetched} cold requests)"
    # The installed files are the channel's, byte for byte (rattler checks sha256 too).
    for pkg in channel.packages.values():
        if pkg.filename in names:
            extracted = tmp_path / "client2" / "pkgs" / pkg.filename.removesuffix(".conda")
            assert extracted.is_dir()


async def test_install_with_shards_absent_upstream(
    proxy_factory, upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    upstream.mount("noshards", channel.shardless_copy(tmp_path / "noshards"))
    proxy = await proxy_factory()
    names = await solve_and_install(f"{proxy.url}/noshards", tmp_path / "env", tmp_path / "client", sharded=True)
    assert any(n.startswith("cp-extra-") for n in names)
    seen = requested(upstream)
    assert "repodata_shards.msgpack.zst" in seen  # asked, 404, and the client fell back
    assert "repodata.json.zst" in seen or "repodata.json" in seen
    await proxy.idle()
    rows = check_invariants(proxy.config.cache.directory)
    cached = {f for _, _, f in rows}
    assert set(names) <= cached
