"""Channel credentials (token, header): sent upstream for their channel only, never shown anywhere."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from channel import Channel
from proxy import Proxy, ProxyProcess, check_invariants, free_port
from upstream import FakeUpstream

from condaproxy.config.load import load_config
from condaproxy.config.model import ChannelConfig
from condaproxy.errors import ConfigError
from condaproxy.upstream.client import Upstream

TOKEN = "tk-SECRET-5f1e2d3c4b5a"
HEADER = ("X-Channel-Auth", "hv-SECRET-a1b2c3d4")


@pytest.fixture
async def private(channel: Channel) -> AsyncIterator[FakeUpstream]:
    """The test channel served only under /t/<TOKEN>/private, and openly under /testchan."""
    server = FakeUpstream()
    server.mount(f"t/{TOKEN}/private", channel.path)
    server.mount("testchan", channel.path)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def write_ini(tmp_path: Path, upstream_url: str, port: int = 8751) -> Path:
    path = tmp_path / "proxy.ini"
    path.write_text(
        "[lazy]\n"
        f"streamer_port = {port}\n"
        "streamer_interface = 127.0.0.1\n"
        "[cache]\n"
        f"directory = {tmp_path / 'cache'}\n"
        "[upstream]\n"
        f"default = {upstream_url}\n"
        "connect_timeout = 5\n"
        "read_timeout = 5\n"
        "[channel:private]\n"
        f"url = {upstream_url}/private\n"
        f"token = {TOKEN}\n"
        f"header = {HEADER[0]}: {HEADER[1]}\n"
    )
    return path


def assert_no_secrets(*places: Path | str | bytes) -> None:
    """Neither the token nor the header value occurs in any of the files (recursively) or texts."""
    for place in places:
        if isinstance(place, Path):
            files = [place] if place.is_file() else [p for p in place.rglob("*") if p.is_file()]
            for f in files:
                data = f.read_bytes()
                assert TOKEN.encode() not in data and HEADER[1].encode() not in data, f
        else:
            data = place.encode() if isinstance(place, str) else place
            assert TOKEN.encode() not in data and HEADER[1].encode() not in data, data[:200]


async def test_token_and_header_are_used_upstream_and_never_recorded(
    tmp_path: Path, private: FakeUpstream, channel: Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    config = load_config(write_ini(tmp_path, private.url))
    proxy = await Proxy(config).start()
    pkg = channel.by_name("cp-app")
    bodies: list[bytes] = []
    try:
        # A client with no token at all: the proxy holds the channel's credentials.
        for path in (
            f"/private/{pkg.url_path}",
            "/private/noarch/repodata.json",
            f"/testchan/{pkg.url_path}",
        ):
            resp = await proxy.get(path)
            assert resp.status == 200 and resp.error is None, resp.body
            bodies.append(resp.body)
        assert bodies[0] == pkg.read_bytes()
        # Errors (upstream 503, 404) say what happened without the secrets.
        private.status(f"/t/{TOKEN}/private/linux-64/repodata.json", 503)
        failed = await proxy.get("/private/linux-64/repodata.json")
        assert failed.status == 502
        missing = await proxy.get("/private/noarch/absent-1.0-0.conda")
        assert missing.status == 404
        bodies += [failed.body, missing.body, (await proxy.get("/metrics")).body]
        await proxy.idle()
        units = check_invariants(config.cache.directory)
        assert ("private", "noarch", pkg.filename) in units
    finally:
        await proxy.close()

    private_requests = [r for r in private.requests if not r.path.startswith("/testchan/")]
    assert private_requests and all(r.path.startswith(f"/t/{TOKEN}/private/") for r in private_requests)
    assert all(r.headers.get(HEADER[0]) == HEADER[1] for r in private_requests)
    # The other channel, on the same upstream, gets neither.
    others = [r for r in private.requests if r.path.startswith("/testchan/")]
    assert others and all(HEADER[0] not in r.headers for r in others)

    db = sqlite3.connect(config.cache.directory / "catalog.sqlite3")
    try:
        urls = [u for (u,) in db.execute("SELECT upstream_url FROM units WHERE channel = 'private'")]
    finally:
        db.close()
    assert urls and all(f"{private.url}/t/<redacted>/private/" in u for u in urls)

    assert_no_secrets(
        config.cache.directory,  # catalog (with its WAL), blobs, temp files
        caplog.text,
        "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records),
        *bodies[3:],
    )


async def test_serve_process_never_logs_or_stores_secrets(
    tmp_path: Path, private: FakeUpstream, channel: Channel
) -> None:
    port = free_port()
    ini = write_ini(tmp_path, private.url, port)
    proc = await ProxyProcess(ini, port).start()
    pkg = channel.by_name("cp-lib")
    try:
        async with aiohttp.ClientSession() as session:
            for path in (f"/private/{pkg.url_path}", "/private/noarch/missing-0-0.conda"):
                async with session.get(proc.url + path) as resp:
                    body = await resp.read()
                    assert_no_secrets(body)
            await asyncio.sleep(0.3)  # let the persist finish before stopping
    finally:
        proc.stop()
    assert "/private/" in proc.log.read_text()  # the log is there, and says something
    assert_no_secrets(proc.log, tmp_path / "cache")


def test_secrets_are_not_in_repr() -> None:
    ch = ChannelConfig("p", "https://h/p", 1, 1, token=TOKEN, header=HEADER)
    assert TOKEN not in repr(ch) and HEADER[1] not in repr(ch)


@pytest.mark.parametrize(
    ("keys", "key", "words"),
    [
        (f"token = {TOKEN}/x\n", "token", "letters, digits"),
        (f"token = {TOKEN} x\n", "token", "letters, digits"),
        (f"token = {TOKEN}\n  continued\n", "token", "spans several lines"),
        (f"header = {HEADER[1]}\n", "header", "'Name: value'"),
        (f"header = Bad Name: {HEADER[1]}\n", "header", "'Name: value'"),
        (f"header = Host: {HEADER[1]}\n", "header", "set by the proxy itself"),
        ("header = X-Key:\n", "header", "non-empty value"),
        (f"url = https://user:{HEADER[1]}@h.example/p\n", "url", "without user or password"),
    ],
)
def test_bad_credentials_are_refused_without_echo(tmp_path: Path, keys: str, key: str, words: str) -> None:
    text = "[channel:p]\n" + ("" if keys.startswith("url") else "url = https://h.example/p\n") + keys
    path = tmp_path / "proxy.ini"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key and words in info.value.message
    assert_no_secrets(str(info.value))


def test_credentials_parse(tmp_path: Path) -> None:
    path = tmp_path / "proxy.ini"
    path.write_text(
        f"[channel:p]\nurl = https://h.example/p\ntoken = {TOKEN}\nheader = Authorization: Bearer abc def\n"
    )
    ch = load_config(path).channels["p"]
    assert ch.token == TOKEN
    assert ch.header == ("Authorization", "Bearer abc def")


async def test_other_origins_never_get_the_credentials(private: FakeUpstream, channel: Channel) -> None:
    other = FakeUpstream()
    other.mount("testchan", channel.path)
    await other.start()
    # The other host is plain http on 127.0.0.1: the channel's section says it is trusted.
    ch = ChannelConfig(
        "private",
        f"{private.url}/private",
        5.0,
        5.0,
        token=TOKEN,
        header=HEADER,
        trusted_origins=(other.url,),
    )
    up = Upstream()
    try:
        # A URL the channel's metadata names on another host (a CEP-16 shards_base_url, say).
        resp, url = await up.open(ch, f"{other.url}/testchan/noarch/repodata.json")
        resp.release()
        [seen] = other.requests
        assert HEADER[0] not in seen.headers and TOKEN not in seen.path
        # The catalog's redacted record of the channel's own URL: the token goes back in.
        resp, url = await up.open(ch, f"{private.url}/t/<redacted>/private/noarch/repodata.json")
        resp.release()
        assert url == f"{private.url}/t/<redacted>/private/noarch/repodata.json"
        [own] = private.requests
        assert own.path == f"/t/{TOKEN}/private/noarch/repodata.json"
        assert own.headers.get(HEADER[0]) == HEADER[1]
    finally:
        await up.close()
        await other.close()
