"""The operator's pages on an in-process proxy: /, /_status(.json), /_setup, /readyz, and the
admin API (token, invalidate, pin, prefetch, gc)."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from channel import Channel
from proxy import Proxy, check_invariants, make_config
from upstream import FakeUpstream

from condaproxy.config.model import AdminConfig, ChannelConfig, LazyConfig
from condaproxy.http.admin import split_target
from condaproxy.http.operations import OPERATIONS

TOKEN = "0123456789abcdef-admin-token"


async def start(tmp_path: Path, upstream: FakeUpstream, *, admin: bool = True, **lazy: object) -> Proxy:
    config = make_config(tmp_path / "cache", upstream.url)
    if admin:
        token_file = tmp_path / "admin.token"
        token_file.write_text(TOKEN + "\n")
        config = replace(config, admin=AdminConfig(token_file))
    if lazy:
        config = replace(config, lazy=replace(config.lazy, **lazy))
    return await Proxy(config).start()


@pytest.fixture
async def admin_proxy(tmp_path: Path, upstream: FakeUpstream):
    proxy = await start(tmp_path, upstream)
    try:
        yield proxy
    finally:
        await proxy.close()


async def post(proxy: Proxy, path: str, body: object, token: str | None = TOKEN) -> tuple[int, dict]:
    assert proxy.session is not None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with proxy.session.post(proxy.url + path, data=data, headers=headers) as resp:
        return resp.status, json.loads(await resp.read())


async def test_status_json_shows_traffic_channels_metadata_and_misses(
    admin_proxy: Proxy, channel: Channel
) -> None:
    proxy = admin_proxy
    pkg = channel.by_name("cp-app")
    assert (await proxy.get("/testchan/noarch/repodata.json")).status == 200
    assert (await proxy.get(f"/testchan/{pkg.url_path}")).status == 200
    await proxy.idle()
    assert (await proxy.get(f"/testchan/{pkg.url_path}")).xcache == "HIT"
    assert (await proxy.get("/testchan/noarch/nothere-1.0-0.conda")).status == 404
    snap = json.loads((await proxy.get("/_status.json")).body)
    since = snap["traffic"]["since_start"]
    assert since["hits"] == 1 and since["misses"] == 2 and since["errors"] == 1
    assert since["hit_ratio"] == pytest.approx(1 / 3)
    assert since["bytes_from_upstream"] >= pkg.size
    (chan,) = [c for c in snap["channels"] if c["name"] == "testchan"]
    assert chan["state"] == "ok" and chan["units"] >= 2
    assert chan["upstreams"] == [f"{proxy.config.upstream.default}/testchan"]
    files = {f["file"]: f for g in snap["metadata"] if g["subdir"] == "noarch" for f in g["files"]}
    assert files["repodata.json"]["etag"] and 0 < files["repodata.json"]["revalidate_in"] <= 60
    assert snap["top"][0] == {"package": f"testchan/{pkg.url_path}", "requests": 2, "bytes": 2 * pkg.size}
    reasons = {(e["path"], e["reason"]) for e in snap["recent"]}
    assert ("noarch/repodata.json", "cold") in reasons
    assert ("noarch/nothere-1.0-0.conda", "not found upstream") in reasons
    assert snap["store"]["units"] >= 2 and snap["admin_api"] is True


async def test_failing_upstream_is_shown_and_escaped(
    tmp_path: Path, upstream: FakeUpstream, channel: Channel
) -> None:
    proxy = await start(tmp_path, upstream, admin=False)
    try:
        upstream.status("/testchan/linux-64/repodata.json", 503)
        assert (await proxy.get("/testchan/linux-64/repodata.json")).status == 502
        # A token in the path never reaches the page; a name with markup is escaped.
        await proxy.get("/t/SECRETTOKEN1234/testchan/noarch/<b>x</b>-1-0.conda")
        page = (await proxy.get("/_status")).body.decode()
        assert "failing" in page and "upstream answered 503" in page
        assert "SECRETTOKEN1234" not in page and "<b>x</b>" not in page
        snap = json.loads((await proxy.get("/_status.json")).body)
        (chan,) = [c for c in snap["channels"] if c["name"] == "testchan"]
        assert chan["state"] == "failing" and "503" in chan["last_error"]
        assert any(e["reason"] == "upstream error" for e in snap["recent"])
    finally:
        await proxy.close()


async def test_landing_and_setup_pages(tmp_path: Path, upstream: FakeUpstream) -> None:
    proxy = await start(tmp_path, upstream, admin=False)
    try:
        home = await proxy.get("/")
        assert home.status == 200 and home.headers["Content-Type"].startswith("text/html")
        text = home.body.decode()
        assert "/_status" in text and "/_setup" in text and "any other channel" in text
        assert "default-src 'none'" in home.headers["Content-Security-Policy"]
        setup = (await proxy.get("/_setup")).body.decode()
        assert "mirrored_channels" in setup and "[mirrors]" in setup
        condarc = await proxy.get("/_setup/condarc")
        assert condarc.headers["Content-Type"].startswith("text/yaml")
        doc = yaml.safe_load(condarc.body)
        assert doc["channel_alias"] == proxy.url
        assert doc["mirrored_channels"]["conda-forge"] == [f"{proxy.url}/conda-forge"]
        assert "default_channels" not in doc  # no pkgs/* channel configured
        # A Host that is not a host name is never echoed into a configuration.
        bad = await proxy.get("/_setup/condarc", headers={"Host": 'x"y'})
        assert yaml.safe_load(bad.body)["channel_alias"] == f"http://127.0.0.1:{proxy.config.lazy.streamer_port}"
    finally:
        await proxy.close()


async def test_setup_lists_default_channels_and_trusts_only_trusted_fronts(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    import ipaddress

    config = make_config(tmp_path / "cache", upstream.url)
    channels = {
        "pkgs/main": ChannelConfig("pkgs/main", f"{upstream.url}/pkgs/main", 5.0, 5.0),
        "pkgs/r": ChannelConfig("pkgs/r", f"{upstream.url}/pkgs/r", 5.0, 5.0),
    }
    lazy = LazyConfig(streamer_interface=("127.0.0.1",), trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),))
    proxy = await Proxy(replace(config, lazy=lazy, channels=channels)).start()
    try:
        fwd = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "conda.example.org"}
        doc = yaml.safe_load((await proxy.get("/_setup/condarc", headers=fwd)).body)
        assert doc["channel_alias"] == "https://conda.example.org"
        assert doc["default_channels"] == ["https://conda.example.org/pkgs/main", "https://conda.example.org/pkgs/r"]
        assert set(doc["mirrored_channels"]) == {"conda-forge", "pkgs/main", "pkgs/r"}
        pixi = (await proxy.get("/_setup/pixi")).body.decode()
        assert f'"{upstream.url}/pkgs/main" = ["{proxy.url}/pkgs/main"]' in pixi
    finally:
        await proxy.close()
    # The same headers from a peer that is not trusted are ignored.
    untrusted = LazyConfig(streamer_interface=("127.0.0.1",), trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),))
    proxy = await Proxy(replace(config, lazy=untrusted)).start()
    try:
        doc = yaml.safe_load((await proxy.get("/_setup/condarc", headers=fwd)).body)
        assert doc["channel_alias"] == proxy.url
    finally:
        await proxy.close()


async def test_readyz(tmp_path: Path, upstream: FakeUpstream) -> None:
    proxy = await start(tmp_path, upstream, admin=False)
    try:
        ready = await proxy.get("/readyz")
        assert ready.status == 200 and ready.body == b"ready\n"
        blobs = proxy.config.cache.directory / "blobs"
        if os.geteuid() != 0:  # root writes anywhere: make the store unusable another way
            blobs.chmod(0o500)
            try:
                down = await proxy.get("/readyz")
            finally:
                blobs.chmod(0o755)
        else:
            blobs.rename(blobs.with_name("moved"))
            blobs.write_text("not a directory")
            try:
                down = await proxy.get("/readyz")
            finally:
                blobs.unlink()
                blobs.with_name("moved").rename(blobs)
        assert down.status == 503 and down.body.startswith(b"store not writable")
        await proxy.services.catalog.close()
        closed = await proxy.get("/readyz")
        assert closed.status == 503 and closed.body.startswith(b"catalog not answering")
    finally:
        await proxy.close()


async def test_admin_api_absent_without_token_file(tmp_path: Path, upstream: FakeUpstream) -> None:
    proxy = await start(tmp_path, upstream, admin=False)
    try:
        assert proxy.session is not None
        for path in ("/_admin/invalidate", "/_admin/nothing"):
            async with proxy.session.post(proxy.url + path, data=b"{}") as resp:
                assert resp.status == 404
        assert (await proxy.get("/_admin/invalidate")).status == 404
        # Writes elsewhere are still refused as before.
        async with proxy.session.post(proxy.url + "/testchan/noarch/repodata.json", data=b"x") as resp:
            assert resp.status == 405
    finally:
        await proxy.close()


async def test_admin_token_is_required_and_never_logged(
    admin_proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    status, body = await post(admin_proxy, "/_admin/invalidate", {"target": "testchan"}, token="wrong-token-123456789")
    assert status == 401 and body["status"] == 401
    status, _ = await post(admin_proxy, "/_admin/invalidate", {"target": "testchan"}, token=None)
    assert status == 401
    assert "refused admin request" in caplog.text and "wrong-token-123456789" not in caplog.text
    assert (await admin_proxy.get("/_admin/invalidate")).status == 404  # GET is no admin verb
    status, body = await post(admin_proxy, "/_admin/pin", b"x" * (70 * 1024))
    assert status == 413


async def test_admin_invalidate_channel_subdir_and_file(admin_proxy: Proxy, upstream: FakeUpstream, channel: Channel) -> None:
    proxy = admin_proxy
    pkg = channel.by_name("cp-base")
    for path in ("/testchan/noarch/repodata.json", "/testchan/linux-64/repodata.json", f"/testchan/{pkg.url_path}"):
        assert (await proxy.get(path)).status == 200
    await proxy.idle()
    assert (await proxy.get("/testchan/noarch/repodata.json")).xcache == "HIT"
    status, body = await post(proxy, "/_admin/invalidate", {"target": "testchan/noarch"})
    noarch = body["invalidated"]
    rows = await proxy.services.catalog.metadata_rows()
    assert status == 200 and noarch == sum(r.subdir == "noarch" for r in rows) >= 1, rows
    assert (await proxy.get("/testchan/noarch/repodata.json")).xcache == "REVALIDATED"
    assert (await proxy.get("/testchan/linux-64/repodata.json")).xcache == "HIT"
    status, body = await post(proxy, "/_admin/invalidate", {"target": "testchan"})
    assert body["invalidated"] == len(rows)
    status, body = await post(proxy, "/_admin/invalidate", {"target": f"testchan/{pkg.url_path}"})
    assert (status, body["dropped"]) == (200, True)
    before = upstream.count(f"/testchan/{pkg.url_path}")
    assert (await proxy.get(f"/testchan/{pkg.url_path}")).xcache == "MISS"
    assert upstream.count(f"/testchan/{pkg.url_path}") == before + 1
    await proxy.idle()
    check_invariants(proxy.config.cache.directory)
    status, body = await post(proxy, "/_admin/invalidate", {"target": "Bad Name"})
    assert status == 400 and "channel name" in body["detail"]


def test_split_target() -> None:
    assert split_target("conda-forge") == ("conda-forge", None, None)
    assert split_target("pkgs/main/linux-64") == ("pkgs/main", "linux-64", None)
    assert split_target("conda-forge/label/dev/noarch/x-1-0.conda") == ("conda-forge/label/dev", "noarch", "x-1-0.conda")
    assert isinstance(split_target("conda-forge/noarch/../x"), str)


async def test_admin_pin_survives_restart_and_protects_from_gc(
    tmp_path: Path, upstream: FakeUpstream, channel: Channel
) -> None:
    proxy = await start(tmp_path, upstream)
    big = channel.by_name("cp-big")
    try:
        status, body = await post(proxy, "/_admin/pin", {"packages": [big.filename, "cp-tools"]})
        assert status == 200 and body["pinned"] == 2
        status, body = await post(proxy, "/_admin/pin", {"packages": ["../etc/passwd"]})
        assert status == 400
        status, body = await post(proxy, "/_admin/gc", {"dry_run": True})
        assert status == 409  # max_size is not set
    finally:
        await proxy.close()
    config = make_config(tmp_path / "cache", upstream.url, max_size=big.size + 1024 * 1024)
    config = replace(config, admin=AdminConfig(tmp_path / "admin.token"))
    proxy = await Proxy(config).start()
    try:
        for name in ("cp-big", "cp-data"):
            assert (await proxy.get(f"/testchan/{channel.by_name(name).url_path}")).status == 200
            await proxy.idle()
        status, body = await post(proxy, "/_admin/gc", {"dry_run": True})
        assert status == 200
        status, body = await post(proxy, "/_admin/gc", {})
        assert status == 200 and body["max_size"] == big.size + 1024 * 1024
        await proxy.services.catalog.flush_touches()
        cached = {f for _, _, f in check_invariants(proxy.config.cache.directory)}
        assert big.filename in cached  # pinned: kept over max_size
        assert channel.by_name("cp-data").filename not in cached
        snap = json.loads((await proxy.get("/_status.json")).body)
        assert sorted(snap["store"]["pins"]["runtime"]) == sorted([big.filename, "cp-tools"])
        status, body = await post(proxy, "/_admin/unpin", {"packages": ["cp-tools"]})
        assert body["pins"] == [big.filename]
    finally:
        await proxy.close()


async def test_admin_prefetch_of_a_posted_lockfile(admin_proxy: Proxy, upstream: FakeUpstream, channel: Channel) -> None:
    proxy = admin_proxy
    pkgs = [channel.by_name(n) for n in ("cp-base", "cp-lib", "cp-data")]
    # Comment lines make the body arrive in many chunks.
    lines = ["# platform: linux-64", *(["# " + "x" * 1000] * 400), "@EXPLICIT"]
    lines += [f"https://conda.anaconda.org/testchan/{p.url_path}#sha256:{p.sha256}" for p in pkgs]
    lines.append("https://conda.anaconda.org/testchan/noarch/cp-missing-1.0-0.conda")
    status, body = await post(proxy, "/_admin/prefetch?pin=yes", "\n".join(lines).encode())
    assert status == 202 and body["total"] == 4
    job = proxy.app[OPERATIONS].prefetcher.jobs[-1]
    assert job.task is not None
    await asyncio.wait_for(asyncio.shield(job.task), 30)
    snap = json.loads((await proxy.get("/_status.json")).body)
    (shown,) = snap["prefetch"]
    assert (shown["state"], shown["fetched"], shown["cached"], shown["failed_count"]) == ("done", 3, 0, 1)
    assert shown["failed"][0]["file"] == "cp-missing-1.0-0.conda"
    assert sorted(snap["store"]["pins"]["runtime"]) == sorted(p.filename for p in pkgs)
    for p in pkgs:
        assert (await proxy.get(f"/testchan/{p.url_path}")).xcache == "HIT"
    page = (await proxy.get("/_status")).body.decode()
    assert "Prefetch" in page and "cp-missing-1.0-0.conda" in page
