"""CEP-6 notices: the upstream's passed through, and the proxy's own (admin, stale, mirror)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from channel import Channel
from proxy import Proxy, free_port, make_config
from upstream import FakeUpstream

UPSTREAM_NOTICE = {
    "id": "00000000-0000-0000-0000-000000000001",
    "message": "upstream says hello",
    "level": "info",
    "created_at": "2026-01-01T00:00:00Z",
}


def notices(resp: Any) -> list[dict[str, Any]]:
    assert resp.status == 200, resp.body
    assert resp.headers["Content-Type"].startswith("application/json")
    found = json.loads(resp.body)["notices"]
    assert isinstance(found, list)
    return found


async def test_upstream_and_admin_notices(upstream: FakeUpstream, channel: Channel, tmp_path: Path) -> None:
    root = channel.shardless_copy(tmp_path / "nchan")
    (root / "notices.json").write_text(json.dumps({"notices": [UPSTREAM_NOTICE]}))
    upstream.mount("nchan", root)
    config = make_config(tmp_path / "cache", upstream.url)
    chan = replace(
        config.channel("nchan"),  # type: ignore[type-var]
        notice="mirror maintenance on Sunday",
        notice_level="warning",
    )
    proxy = await Proxy(replace(config, channels={"nchan": chan})).start()
    try:
        got = notices(await proxy.get("/nchan/notices.json"))
        assert got[0] == UPSTREAM_NOTICE
        admin = got[1]
        assert admin["message"] == "mirror maintenance on Sunday" and admin["level"] == "warning"
        assert {"id", "created_at", "interval"} <= set(admin)
        again = notices(await proxy.get("/nchan/notices.json"))
        assert again[1]["id"] == admin["id"]  # stable: clients show it once per interval
    finally:
        await proxy.close()


async def test_no_upstream_notices_none_of_ours(proxy: Proxy) -> None:
    assert notices(await proxy.get("/testchan/notices.json")) == []


async def test_stale_channel_says_so(
    proxy_factory: Callable[..., Awaitable[Proxy]], upstream: FakeUpstream
) -> None:
    proxy = await proxy_factory(repodata_ttl=0, max_stale=3600)
    assert (await proxy.get("/testchan/noarch/repodata.json")).status == 200
    await proxy.idle()
    upstream.status("testchan/noarch/repodata.json", 503)
    stale = await proxy.get("/testchan/noarch/repodata.json")
    assert stale.status == 200 and stale.xcache == "STALE"
    got = notices(await proxy.get("/testchan/notices.json"))
    assert [n["level"] for n in got] == ["warning"]
    assert "failing" in got[0]["message"] and "out of date" in got[0]["message"]


async def test_failed_over_channel_says_so(upstream: FakeUpstream, tmp_path: Path) -> None:
    config = make_config(tmp_path / "cache", upstream.url)
    dead = f"http://127.0.0.1:{free_port()}/testchan"
    chan = replace(
        config.channel("testchan"),  # type: ignore[type-var]
        url=dead,
        urls=(dead, f"{upstream.url}/testchan"),
    )
    proxy = await Proxy(replace(config, channels={"testchan": chan})).start()
    try:
        assert (await proxy.get("/testchan/noarch/repodata.json")).status == 200
        got = notices(await proxy.get("/testchan/notices.json"))
        assert any("mirror" in n["message"] for n in got)
    finally:
        await proxy.close()
