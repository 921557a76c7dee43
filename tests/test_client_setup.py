"""The /_setup page's snippets, used as a client would: the served .condarc's channel alias, and
pixi's [mirrors] (through py-rattler's mirror middleware, which is what pixi uses), each drive a
real py-rattler install that goes through the proxy."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import rattler
import yaml
from channel import Channel
from proxy import Proxy
from upstream import FakeUpstream

WANTED = {"cp-app", "cp-lib", "cp-base", "cp-data", "cp-tools"}


async def install(sources: list[str], prefix: Path, cache: Path, client: rattler.Client | None = None) -> set[str]:
    gateway = rattler.Gateway(cache_dir=cache / "repodata", client=client)
    records = await rattler.solve(
        sources=sources, specs=["cp-app"], gateway=gateway, platforms=["linux-64", "noarch"], virtual_packages=[]
    )
    await rattler.install(records, target_prefix=prefix, cache_dir=cache / "pkgs", show_progress=False, client=client)
    return {json.loads(m.read_text())["name"] for m in (prefix / "conda-meta").glob("*.json")}


def through_proxy(upstream: FakeUpstream) -> None:
    """Every request the upstream saw came from condaproxy, none from the client itself."""
    agents = {r.headers.get("User-Agent", "") for r in upstream.requests}
    assert agents and all(a.startswith("condaproxy/") for a in agents), agents


async def test_served_condarc_drives_an_install(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    page = await proxy.get("/_setup")
    assert page.status == 200 and b"channel_alias" in page.body
    served = await proxy.get("/_setup/condarc")
    condarc = tmp_path / ".condarc"
    condarc.write_bytes(served.body)
    doc = yaml.safe_load(condarc.read_text())
    alias = doc["channel_alias"]
    assert alias == proxy.url
    # conda resolves `-c testchan` as <channel_alias>/testchan; mamba the same through mirrored_channels.
    assert doc["mirrored_channels"]["conda-forge"] == [f"{alias}/conda-forge"]
    assert await install([f"{alias}/testchan"], tmp_path / "env", tmp_path / "client") == WANTED
    through_proxy(upstream)


async def test_served_pixi_mirrors_drive_an_install(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    served = await proxy.get("/_setup/pixi")
    config = tmp_path / "config.toml"
    config.write_bytes(served.body)
    mirrors = tomllib.loads(config.read_text())["mirrors"]
    assert mirrors == {upstream.url: [proxy.url]}
    # The original channel URL, as a lock file keeps it; the mirror sends it to the proxy.
    client = rattler.Client([rattler.networking.MirrorMiddleware(mirrors)])
    installed = await install([f"{upstream.url}/testchan"], tmp_path / "env", tmp_path / "client", client)
    assert installed == WANTED
    through_proxy(upstream)
    await proxy.idle()
    snap = json.loads((await proxy.get("/_status.json")).body)
    assert snap["traffic"]["since_start"]["misses"] >= len(WANTED)
