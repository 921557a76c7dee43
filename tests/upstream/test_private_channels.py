"""Private channels: cached bytes only for tokens the upstream accepts; public ones share a cache."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from channel import Channel
from proxy import Proxy, check_invariants, make_config
from test_rattler_client import solve_and_install
from upstream import FakeUpstream

from condaproxy.config.load import load_config
from condaproxy.config.model import Config, UpstreamConfig
from condaproxy.errors import ConfigError
from condaproxy.upstream.admission import judged

TOKEN = "pv-0123456789abcdef-SECRET"


def private_config(tmp_path: Path, url: str, **channel: Any) -> Config:
    """Only the channel "private" served, from url; channel: more ChannelConfig fields."""
    config = make_config(tmp_path / "cache", url, repodata_ttl=60)
    chan = replace(
        config.channel("private"),  # type: ignore[type-var]
        url=f"{url}/private",
        urls=(f"{url}/private",),
        private=True,
        **channel,
    )
    return replace(config, channels={"private": chan})


@pytest.fixture
async def private(upstream: FakeUpstream, channel: Channel, tmp_path: Path) -> AsyncIterator[Proxy]:
    """A proxy whose channel "private" exists upstream only under /t/<TOKEN>/private."""
    upstream.mount(f"t/{TOKEN}/private", channel.path)
    proxy = await Proxy(private_config(tmp_path, upstream.url)).start()
    yield proxy
    await proxy.close()


async def test_token_accepted_upstream_gets_bytes_others_never(
    private: Proxy, upstream: FakeUpstream, channel: Channel
) -> None:
    pkg = channel.by_name("cp-app")
    good = await private.get(f"/t/{TOKEN}/private/{pkg.url_path}")
    assert good.status == 200 and good.body == pkg.read_bytes()
    await private.idle()
    hit = await private.get(f"/t/{TOKEN}/private/{pkg.url_path}")
    assert hit.xcache == "HIT" and hit.body == pkg.read_bytes()
    # The package is cached now; still nobody else gets it.
    anonymous = await private.get(f"/private/{pkg.url_path}")
    assert anonymous.status == 401 and pkg.read_bytes()[:64] not in anonymous.body
    wrong = await private.get(f"/t/not-the-token/private/{pkg.url_path}")
    assert wrong.status == 403 and pkg.read_bytes()[:64] not in wrong.body
    for resp in (anonymous, wrong):
        assert len(json.loads(resp.body)["detail"]) < 200  # a one-line reason, nothing more


async def test_acceptance_is_remembered_not_asked_per_request(
    private: Proxy, upstream: FakeUpstream, channel: Channel
) -> None:
    for pkg in channel.packages.values():
        assert (await private.get(f"/t/{TOKEN}/private/{pkg.url_path}")).status == 200
    assert upstream.count(f"/t/{TOKEN}/private/noarch/repodata.json", "HEAD") == 1  # the one check


async def test_refused_tokens_are_remembered_too(private: Proxy, upstream: FakeUpstream) -> None:
    for _ in range(3):
        assert (await private.get("/t/bad-token/private/noarch/repodata.json")).status == 403
    assert upstream.count("/t/bad-token/private/noarch/repodata.json", None) == 1


async def test_upstream_down_during_check_is_502_and_not_remembered(
    private: Proxy, upstream: FakeUpstream
) -> None:
    path = f"/t/{TOKEN}/private/noarch/repodata.json"
    upstream.status(path, 503, times=1)
    assert (await private.get(path)).status == 502
    assert (await private.get(path)).status == 200


async def test_install_from_private_channel_with_token(
    private: Proxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    names = await solve_and_install(
        f"{private.url}/t/{TOKEN}/private", tmp_path / "env", tmp_path / "client", sharded=True
    )
    assert any(n.startswith("cp-extra-") for n in names)
    await private.idle()
    check_invariants(private.config.cache.directory)
    assert TOKEN not in caplog.text
    for path in private.config.cache.directory.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


async def test_public_channel_ignores_client_tokens_and_shares_one_cache(
    proxy: Proxy, upstream: FakeUpstream, channel: Channel
) -> None:
    pkg = channel.by_name("cp-tools")
    first = await proxy.get(f"/t/someones-token/testchan/{pkg.url_path}")
    assert first.status == 200 and first.body == pkg.read_bytes()
    await proxy.idle()
    for path in (f"/testchan/{pkg.url_path}", f"/t/another-token/testchan/{pkg.url_path}"):
        again = await proxy.get(path)
        assert again.xcache == "HIT" and again.body == pkg.read_bytes()
    assert all("/t/" not in r.path for r in upstream.requests)


# -- the token check itself: the client's token alone, no redirects, rate-limited ----------------

CHANNEL_KEY = ("X-Channel-Key", "ck-proxy-owns-this")


@pytest.fixture
async def gateway(channel: Channel) -> AsyncIterator[tuple[str, list[web.Request]]]:
    """An upstream that serves /t/<token>/private/... to TOKEN, or to anybody with CHANNEL_KEY."""
    seen: list[web.Request] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        token, tail = request.match_info["token"], request.match_info["tail"]
        if token != TOKEN and request.headers.get(CHANNEL_KEY[0]) != CHANNEL_KEY[1]:
            return web.Response(status=403, text="bad token")
        file = channel.path / tail
        if not file.is_file():
            return web.Response(status=404)
        return web.FileResponse(file)

    app = web.Application()
    app.router.add_route("*", "/t/{token}/private/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", seen
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("key", ["token", "header", "client_cert"])
def test_a_private_channel_with_credentials_of_its_own_is_refused_by_check_config(
    tmp_path: Path, key: str
) -> None:
    (tmp_path / "client.pem").write_text("not read: refused before")
    value = {"token": "tk-own", "header": "Authorization: Bearer own", "client_cert": "client.pem"}[key]
    path = tmp_path / "proxy.ini"
    path.write_text(f"[channel:team]\nurl = https://conda.example/team\nprivate = yes\n{key} = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.section, info.value.key) == ("channel:team", key)
    assert "own /t/<token>/ alone" in info.value.message and "drop 'private'" in info.value.message
    check = subprocess.run(
        [sys.executable, "-m", "condaproxy", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 2 and f"[channel:team] {key}: a private channel" in check.stderr
    assert "Bearer own" not in check.stderr and "tk-own" not in check.stderr


async def test_the_token_check_carries_the_clients_token_alone(
    gateway: tuple[str, list[web.Request]], channel: Channel, tmp_path: Path
) -> None:
    """Even a channel built past the configuration check never lends the check its own key."""
    url, seen = gateway
    proxy = await Proxy(private_config(tmp_path, url, header=CHANNEL_KEY)).start()
    try:
        pkg = channel.by_name("cp-app")
        good = await proxy.get(f"/t/{TOKEN}/private/{pkg.url_path}")
        assert good.status == 200 and good.body == pkg.read_bytes()
        # Was 200: the upstream accepted the proxy's own key, whatever the token.
        guess = await proxy.get(f"/t/ANY-RANDOM-GUESS/private/{pkg.url_path}")
        assert guess.status == 403 and pkg.read_bytes()[:64] not in guess.body
        checks = [r for r in seen if r.path.endswith("/noarch/repodata.json")]
        assert checks and all(CHANNEL_KEY[0] not in r.headers for r in checks)
    finally:
        await proxy.close()


async def test_a_redirect_to_a_login_page_admits_nobody(
    private: Proxy, upstream: FakeUpstream, channel: Channel
) -> None:
    pkg = channel.by_name("cp-app")
    assert (await private.get(f"/t/{TOKEN}/private/{pkg.url_path}")).status == 200
    await private.idle()
    login = b"<html><form>Sign in</form></html>"
    upstream.replace("/login", login)
    upstream.status("/t/GUESS/private/noarch/repodata.json", 302, headers={"Location": "/login"})
    # Was 200 (the login page's 200 taken for a yes), with the bytes cached for TOKEN.
    resp = await private.get(f"/t/GUESS/private/{pkg.url_path}")
    assert resp.status == 403 and pkg.read_bytes()[:64] not in resp.body and login not in resp.body
    assert upstream.count("/login", None) == 0  # not followed
    # The same page answered in the file's place is no yes either.
    upstream.replace("/t/OTHER/private/noarch/repodata.json", login)
    assert (await private.get(f"/t/OTHER/private/{pkg.url_path}")).status == 403


async def test_the_token_check_is_a_head_or_one_byte(
    private: Proxy, upstream: FakeUpstream, channel: Channel
) -> None:
    path = f"/t/{TOKEN}/private/noarch/repodata.json"
    upstream.status(path, 405, times=1)  # the first request, the HEAD, is not allowed
    pkg = channel.by_name("cp-lib")
    assert (await private.get(f"/t/{TOKEN}/private/{pkg.url_path}")).status == 200
    head, ranged = upstream.requests_for(path)[:2]
    assert head.method == "HEAD"
    assert ranged.method == "GET" and ranged.headers.get("Range") == "bytes=0-0"


def rated(config: Config, per_client: int, overall: int) -> Config:
    return replace(config, upstream=replace(config.upstream, auth_probe_rate=(per_client, overall)))


async def get_from(address: str, url: str) -> tuple[int, str | None]:
    """GET url from a client socket bound to address (127.0.0.0/8 is all loopback on Linux)."""
    connector = aiohttp.TCPConnector(local_addr=(address, 0))
    async with aiohttp.ClientSession(connector=connector) as session, session.get(url) as resp:
        await resp.read()
        return resp.status, resp.headers.get("Retry-After")


async def test_token_guessing_is_rate_limited_per_client(
    upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    upstream.mount(f"t/{TOKEN}/private", channel.path)
    proxy = await Proxy(rated(private_config(tmp_path, upstream.url), 5, 1000)).start()
    try:
        pkg = channel.by_name("cp-app")
        assert (await proxy.get(f"/t/{TOKEN}/private/{pkg.url_path}")).status == 200
        guesses = [f"/t/guess-{secrets.token_hex(8)}/private/noarch/repodata.json" for _ in range(200)]
        answers = await asyncio.gather(*(proxy.get(path) for path in guesses))
        statuses = sorted(a.status for a in answers)
        # Was 200 upstream requests in a blink. Now: what is left of the burst of 5, then 429.
        assert statuses == [403] * 4 + [429] * 196, statuses
        assert sum(1 for r in upstream.requests if "/guess-" in r.path) == 4
        limited = next(a for a in answers if a.status == 429)
        assert int(limited.headers["Retry-After"]) >= 1 and len(limited.body) < 200
        # A token already checked costs nothing, and is served; another client has its own budget.
        assert (await proxy.get(f"/t/{TOKEN}/private/{pkg.url_path}")).status == 200
        assert await get_from("127.0.0.2", f"{proxy.url}/t/guess-other/private/noarch/repodata.json") == (
            403,
            None,
        )
    finally:
        await proxy.close()


async def test_token_checks_are_rate_limited_overall(
    upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    upstream.mount(f"t/{TOKEN}/private", channel.path)
    proxy = await Proxy(rated(private_config(tmp_path, upstream.url), 100, 3)).start()
    try:
        answers = await asyncio.gather(
            *(
                get_from(f"127.0.0.{2 + i % 10}", f"{proxy.url}/t/guess-{i}/private/noarch/repodata.json")
                for i in range(30)
            )
        )
        assert sorted(status for status, _ in answers) == [403] * 3 + [429] * 27
        assert all(retry is not None and int(retry) >= 1 for status, retry in answers if status == 429)
        assert sum(1 for r in upstream.requests if "/guess-" in r.path) == 3
    finally:
        await proxy.close()


def test_the_default_probe_rate_is_configured() -> None:
    assert UpstreamConfig().auth_probe_rate == (20, 300)


@pytest.mark.parametrize(
    ("status", "content_type", "verdict"),
    [
        (200, "application/json", True),
        (206, "application/octet-stream", True),
        (200, "", True),
        (200, "text/html; charset=utf-8", False),  # a login page in the file's place
        (302, "", False),
        (401, "", False),
        (403, "", False),
        (404, "", False),
        (429, "", None),  # busy: nothing learned
        (503, "", None),
    ],
)
def test_what_an_answer_to_a_token_check_says(status: int, content_type: str, verdict: bool | None) -> None:
    assert judged(status, content_type) is verdict
