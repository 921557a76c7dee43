"""Mirrors: fail over on connect errors, timeouts before headers and 5xx; remember what worked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from channel import Channel
from proxy import Proxy, check_invariants, free_port
from upstream import FakeUpstream
from yarl import URL

from condaproxy.conda.paths import Request, parse_path
from condaproxy.conda.urls import unit_url
from condaproxy.config.model import CacheConfig, ChannelConfig, Config, LazyConfig, UpstreamConfig
from condaproxy.upstream.client import Upstream
from condaproxy.upstream.mirrors import MirrorMemory, locate

CH = "/testchan"
REPODATA = f"{CH}/noarch/repodata.json"


def mirrored(cache_dir: Path, *bases: str, connect_timeout: float = 5.0) -> Config:
    """A config serving only testchan, from the given mirrors in order."""
    urls = tuple(f"{b}/testchan" for b in bases)
    ch = ChannelConfig("testchan", urls[0], connect_timeout, 5.0, urls=urls)
    return Config(
        LazyConfig(streamer_interface=("127.0.0.1",)),
        CacheConfig(directory=cache_dir),
        UpstreamConfig(default="http://127.0.0.1:9", allow_unlisted=False),
        {"testchan": ch},
    )


@pytest.fixture
async def second(channel: Channel) -> AsyncIterator[FakeUpstream]:
    """Another upstream serving the same channel at /testchan."""
    server = FakeUpstream()
    server.mount("testchan", channel.path)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[object]:
    """Start in-process proxies for configs; closed at the end of the test."""
    proxies: list[Proxy] = []

    async def run(config: Config) -> Proxy:
        proxy = await Proxy(config).start()
        proxies.append(proxy)
        return proxy

    try:
        yield run
    finally:
        for proxy in proxies:
            await proxy.close()


async def served_from(proxy: Proxy, path: str) -> str:
    parsed = parse_path(path)
    assert isinstance(parsed, Request)
    await proxy.idle()
    unit = await proxy.services.catalog.get(parsed.key)
    assert unit is not None
    return unit.upstream_url


# --- failover -----------------------------------------------------------------------


async def test_first_mirror_refusing_connections_fails_over(
    start, tmp_path: Path, second: FakeUpstream, channel: Channel
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = await start(mirrored(tmp_path / "c", dead, second.url))
    pkg = channel.by_name("cp-data")
    resp = await proxy.get(f"{CH}/{pkg.url_path}")
    assert resp.status == 200 and resp.error is None and resp.body == pkg.read_bytes()
    assert (await served_from(proxy, f"{CH}/{pkg.url_path}")).startswith(second.url)
    check_invariants(tmp_path / "c")


async def test_first_mirror_503_fails_over(
    start, tmp_path: Path, upstream: FakeUpstream, second: FakeUpstream, channel: Channel
) -> None:
    proxy = await start(mirrored(tmp_path / "c", upstream.url, second.url))
    upstream.status(REPODATA, 503)
    resp = await proxy.get(REPODATA)
    assert resp.status == 200 and resp.body == (channel.path / "noarch/repodata.json").read_bytes()
    assert upstream.count(REPODATA) == 1 and second.count(REPODATA) == 1
    assert await served_from(proxy, REPODATA) == f"{second.url}{REPODATA}"


async def test_first_mirror_hanging_before_headers_fails_over(
    start, tmp_path: Path, upstream: FakeUpstream, second: FakeUpstream
) -> None:
    proxy = await start(mirrored(tmp_path / "c", upstream.url, second.url, connect_timeout=1.0))
    upstream.delay_headers(REPODATA, 10)
    began = time.monotonic()
    resp = await proxy.get(REPODATA)
    assert resp.status == 200 and resp.xcache == "MISS"
    assert time.monotonic() - began < 4
    assert second.count(REPODATA) == 1


@pytest.mark.parametrize(
    ("faults", "status", "words"),
    [
        (("503", "500"), 502, ["all 2 mirrors failed", "503", "500"]),
        (("hang", "hang"), 504, ["all 2 mirrors failed", "did not answer in time"]),
        (("dead", "hang"), 502, ["unreachable", "did not answer in time"]),
    ],
)
async def test_all_mirrors_down(
    start,
    tmp_path: Path,
    upstream: FakeUpstream,
    second: FakeUpstream,
    faults: tuple[str, str],
    status: int,
    words: list[str],
) -> None:
    bases = []
    for server, fault in zip((upstream, second), faults, strict=True):
        if fault == "dead":
            bases.append(f"http://127.0.0.1:{free_port()}")
            continue
        bases.append(server.url)
        if fault == "hang":
            server.delay_headers(REPODATA, 10)
        else:
            server.status(REPODATA, int(fault))
    proxy = await start(mirrored(tmp_path / "c", *bases, connect_timeout=1.0))
    resp = await proxy.get(REPODATA)
    assert resp.status == status
    text = resp.body.decode()
    assert all(w in text for w in words), text


@pytest.mark.parametrize("code", [404, 403, 401])
async def test_4xx_does_not_fail_over(
    start, tmp_path: Path, upstream: FakeUpstream, second: FakeUpstream, channel: Channel, code: int
) -> None:
    proxy = await start(mirrored(tmp_path / "c", upstream.url, second.url))
    path = f"{CH}/{channel.by_name('cp-base').url_path}"
    upstream.status(path, code)
    resp = await proxy.get(path)
    assert resp.status == code
    assert upstream.count(path) == 1
    assert second.requests == []


async def test_no_failover_once_bytes_went_out(
    start, tmp_path: Path, upstream: FakeUpstream, second: FakeUpstream, channel: Channel
) -> None:
    proxy = await start(mirrored(tmp_path / "c", upstream.url, second.url))
    pkg = channel.by_name("cp-big")
    path = f"{CH}/{pkg.url_path}"
    upstream.truncate(path, 0.5, times=1)
    resp = await proxy.get(path)
    assert resp.status == 200 and resp.error is not None and len(resp.body) < pkg.size
    assert second.count(path) == 0
    await proxy.idle()
    check_invariants(tmp_path / "c")


# --- remembering the mirror that worked ---------------------------------------------


async def test_the_mirror_that_worked_is_tried_first(
    start, tmp_path: Path, upstream: FakeUpstream, second: FakeUpstream
) -> None:
    proxy = await start(mirrored(tmp_path / "c", upstream.url, second.url))
    upstream.status(REPODATA, 503, times=1)
    assert (await proxy.get(REPODATA)).status == 200
    other = f"{CH}/linux-64/repodata.json"
    assert (await proxy.get(other)).status == 200
    assert upstream.count(other) == 0 and second.count(other) == 1


async def test_the_memory_fades(upstream: FakeUpstream, second: FakeUpstream) -> None:
    config = mirrored(Path("/nonexistent"), upstream.url, second.url)
    ch = config.channels["testchan"]
    up = Upstream(mirror_ttl=0.3)
    try:
        upstream.status(REPODATA, 503, times=1)
        resp, url = await up.open(ch, "noarch/repodata.json")
        resp.release()
        assert url == f"{second.url}{REPODATA}"
        await asyncio.sleep(0.4)
        resp, url = await up.open(ch, "linux-64/repodata.json")
        resp.release()
        assert url == f"{upstream.url}{CH}/linux-64/repodata.json"
    finally:
        await up.close()


def test_mirror_order() -> None:
    ch = ChannelConfig("c", "https://a/c", 1, 1, urls=("https://a/c", "https://b/c", "https://c/c"))
    memory = MirrorMemory()
    assert memory.order(ch) == ch.urls
    memory.remember(ch, "https://b/c")
    assert memory.order(ch) == ("https://b/c", "https://a/c", "https://c/c")
    # A mirror no longer configured (after a reload) is not tried.
    moved = ChannelConfig("c", "https://a/c", 1, 1, urls=("https://a/c", "https://c/c"))
    assert memory.order(moved) == moved.urls


def test_channel_config_urls_default_to_url() -> None:
    ch = ChannelConfig("c", "https://a/c", 1, 1)
    assert ch.urls == ("https://a/c",)
    with pytest.raises(ValueError):
        ChannelConfig("c", "https://a/c", 1, 1, urls=("https://b/c",))


# --- where a unit is fetched from ---------------------------------------------------


def test_unit_url_puts_the_token_after_the_host() -> None:
    assert unit_url("https://h/private", "noarch/x.conda", None) == "https://h/private/noarch/x.conda"
    assert unit_url("https://h/private", "noarch/x.conda", "tk") == "https://h/t/tk/private/noarch/x.conda"
    assert unit_url("https://h:8443", "noarch/x.conda", "tk") == "https://h:8443/t/tk/noarch/x.conda"


def test_locate_maps_urls_back_onto_the_channel() -> None:
    ch = ChannelConfig(
        "private",
        "https://a.example/private",
        1,
        1,
        urls=("https://a.example/private", "https://b.example/mirror/private"),
        token="tk",
    )
    assert locate(ch, "noarch/x.conda") == "noarch/x.conda"
    # Under a base (as the catalog records it, redacted): a path again, so mirrors and token apply.
    assert locate(ch, "https://a.example/t/<redacted>/private/linux-64/shards/ab.msgpack.zst") == (
        "linux-64/shards/ab.msgpack.zst"
    )
    assert locate(ch, "https://b.example/mirror/private/linux-64/shards/x") == "linux-64/shards/x"
    # Same origin, outside the channel: the token goes back in.
    assert locate(ch, "https://a.example/t/%3Credacted%3E/other/x") == URL("https://a.example/t/tk/other/x")
    # Another origin keeps whatever it was given: never our token.
    foreign = locate(ch, "https://cdn.example/t/<redacted>/private/x")
    assert isinstance(foreign, URL) and "tk" not in str(foreign)


async def test_real_client_installs_with_the_first_mirror_down(
    start, tmp_path: Path, second: FakeUpstream, channel: Channel
) -> None:
    from test_rattler_client import solve_and_install

    dead = f"http://127.0.0.1:{free_port()}"
    proxy = await start(mirrored(tmp_path / "c", dead, second.url))
    names = await solve_and_install(f"{proxy.url}{CH}", tmp_path / "env", tmp_path / "client", sharded=True)
    assert any(n.startswith("cp-extra-") for n in names)
    assert second.requests  # everything came from the mirror that answered
    await proxy.idle()
    assert set(names) <= {f for _, _, f in check_invariants(tmp_path / "c")}
