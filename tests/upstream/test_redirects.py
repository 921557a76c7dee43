"""Upstream redirects: same origin or https, at most five, never into private networks."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import trustme
from aiohttp.abc import AbstractResolver, ResolveResult
from channel import Channel
from proxy import Proxy, check_invariants
from upstream import FakeUpstream
from yarl import URL

from condaproxy.conda.urls import redacted_url
from condaproxy.config.model import CacheConfig, ChannelConfig, Config, LazyConfig, UpstreamConfig
from condaproxy.errors import UpstreamError
from condaproxy.upstream.client import Upstream
from condaproxy.upstream.redirects import (
    MAX_REDIRECTS,
    DisallowedAddress,
    PublicResolver,
    is_public,
    refusal,
    same_origin,
)

CH = "/testchan"
REPODATA = f"{CH}/noarch/repodata.json"
SECRET_HEADER = ("X-Channel-Key", "hv-redirect-secret")


def config_for(cache_dir: Path, url: str, **channel: object) -> Config:
    """Only testchan served, from url."""
    ch = ChannelConfig("testchan", url, 5.0, 5.0, **channel)  # type: ignore[arg-type]
    return Config(
        LazyConfig(streamer_interface=("127.0.0.1",)),
        CacheConfig(directory=cache_dir),
        UpstreamConfig(default="http://127.0.0.1:9", allow_unlisted=False),
        {"testchan": ch},
    )


@pytest.fixture
async def start() -> AsyncIterator[object]:
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


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    """A test CA and its PEM file."""
    authority = trustme.CA()
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    authority.cert_pem.write_to_path(path)
    return authority, path


async def https_server(ca: tuple[trustme.CA, Path], channel: Channel) -> FakeUpstream:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca[0].issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    server = FakeUpstream()
    server.mount("testchan", channel.path)
    await server.start(ssl_context=ctx)
    return server


@pytest.fixture
async def elsewhere(ca: tuple[trustme.CA, Path], channel: Channel) -> AsyncIterator[FakeUpstream]:
    """Another origin: an https server on 127.0.0.1 (also reachable as localhost)."""
    server = await https_server(ca, channel)
    try:
        yield server
    finally:
        await server.close()


async def test_same_origin_redirect_is_followed_with_credentials(
    start, tmp_path: Path, upstream: FakeUpstream, channel: Channel
) -> None:
    upstream.mount("moved", channel.path)
    upstream.status(REPODATA, 302, headers={"Location": "/moved/noarch/repodata.json"})
    proxy = await start(config_for(tmp_path / "c", f"{upstream.url}/testchan", header=SECRET_HEADER))
    resp = await proxy.get(REPODATA)
    assert resp.status == 200 and resp.body == (channel.path / "noarch/repodata.json").read_bytes()
    [moved] = upstream.requests_for("/moved/noarch/repodata.json")
    assert moved.headers.get(SECRET_HEADER[0]) == SECRET_HEADER[1]  # same origin: still ours
    await proxy.idle()
    check_invariants(tmp_path / "c")


@pytest.mark.parametrize("hops", [MAX_REDIRECTS, MAX_REDIRECTS + 1])
async def test_at_most_five_redirects(
    start, tmp_path: Path, upstream: FakeUpstream, channel: Channel, hops: int
) -> None:
    upstream.mount("final", channel.path)
    chain = [REPODATA] + [f"/hop{i}/noarch/repodata.json" for i in range(1, hops)]
    for here, there in zip(chain, [*chain[1:], "/final/noarch/repodata.json"], strict=True):
        upstream.status(here, 301, headers={"Location": there})
    proxy = await start(config_for(tmp_path / "c", f"{upstream.url}/testchan"))
    resp = await proxy.get(REPODATA)
    if hops <= MAX_REDIRECTS:
        assert resp.status == 200
    else:
        assert resp.status == 502 and "more than 5 upstream redirects" in resp.body.decode()
        assert upstream.count("/final/noarch/repodata.json") == 0


async def test_redirect_loop_and_missing_location_are_502(
    start, tmp_path: Path, upstream: FakeUpstream
) -> None:
    upstream.status(REPODATA, 302, headers={"Location": REPODATA})
    other = f"{CH}/linux-64/repodata.json"
    upstream.status(other, 307)
    proxy = await start(config_for(tmp_path / "c", f"{upstream.url}/testchan"))
    loop = await proxy.get(REPODATA)
    assert loop.status == 502 and "redirects" in loop.body.decode()
    assert upstream.count(REPODATA) == MAX_REDIRECTS + 1
    missing = await proxy.get(other)
    assert missing.status == 502 and "without Location" in missing.body.decode()


async def test_redirect_to_http_on_another_origin_is_refused(
    start, tmp_path: Path, upstream: FakeUpstream, channel: Channel
) -> None:
    other = FakeUpstream()
    other.mount("testchan", channel.path)
    await other.start()
    try:
        upstream.status(REPODATA, 302, headers={"Location": f"{other.url}{REPODATA}"})
        proxy = await start(config_for(tmp_path / "c", f"{upstream.url}/testchan"))
        resp = await proxy.get(REPODATA)
        assert resp.status == 502 and "non-https" in resp.body.decode()
        assert other.requests == []
    finally:
        await other.close()


@pytest.mark.parametrize(
    ("host", "words"),
    [("127.0.0.1", "non-public address"), ("localhost", "resolves only to non-public addresses")],
)
async def test_redirect_into_private_addresses_is_refused(
    start,
    tmp_path: Path,
    ca: tuple[trustme.CA, Path],
    channel: Channel,
    elsewhere: FakeUpstream,
    host: str,
    words: str,
) -> None:
    # The configured upstream is itself on 127.0.0.1, over https with a CA the channel trusts,
    # so the only thing wrong with the redirect target (same CA, other port) is its address.
    configured = await https_server(ca, channel)
    try:
        configured.mount("moved", channel.path)
        proxy = await start(config_for(tmp_path / "c", f"{configured.url}/testchan", ca_bundle=ca[1]))
        configured.status(
            f"{CH}/linux-64/repodata.json", 302, headers={"Location": "/moved/linux-64/repodata.json"}
        )
        assert (await proxy.get(f"{CH}/linux-64/repodata.json")).status == 200  # same origin: fine

        target = f"https://{host}:{elsewhere.port}{REPODATA}"
        configured.status(REPODATA, 302, headers={"Location": target})
        resp = await proxy.get(REPODATA)
        assert resp.status == 502
        assert words in resp.body.decode()
        assert elsewhere.requests == []
    finally:
        await configured.close()


# IPv6 spellings of 127.0.0.1: NAT64 (RFC 6052), 6to4 (RFC 3056), IPv4-compatible (RFC 4291).
LOOPBACK_IN_IPV6 = ["64:ff9b::7f00:1", "2002:7f00:1::1", "::7f00:1", "64:ff9b:1::7f00:1"]


@pytest.mark.parametrize("literal", LOOPBACK_IN_IPV6)
async def test_redirect_to_an_ipv6_form_of_a_private_address_is_refused(
    start,
    tmp_path: Path,
    ca: tuple[trustme.CA, Path],
    channel: Channel,
    elsewhere: FakeUpstream,
    literal: str,
) -> None:
    configured = await https_server(ca, channel)
    try:
        proxy = await start(config_for(tmp_path / "c", f"{configured.url}/testchan", ca_bundle=ca[1]))
        configured.status(
            REPODATA, 302, headers={"Location": f"https://[{literal}]:{elsewhere.port}{REPODATA}"}
        )
        resp = await proxy.get(REPODATA)
        # Was let through as a public address (and reached 127.0.0.1 wherever NAT64 or 6to4 routes).
        assert resp.status == 502 and "non-public address" in resp.body.decode(), resp.body
        assert elsewhere.requests == []
    finally:
        await configured.close()


async def named(up: Upstream, ch: ChannelConfig, url: str) -> str:
    """Open a URL as the channel's metadata names it; the redacted URL served, or the refusal."""
    try:
        resp, served = await up.open(ch, url)
    except UpstreamError as exc:
        return exc.reason
    resp.release()
    return served


async def test_a_host_named_by_metadata_obeys_the_redirect_rules(
    upstream: FakeUpstream, elsewhere: FakeUpstream, ca: tuple[trustme.CA, Path], channel: Channel
) -> None:
    """Only the channel's own origins and those its section trusts escape https-and-public-only."""
    other = FakeUpstream()
    other.mount("testchan", channel.path)
    await other.start()
    up = Upstream()
    plain = ChannelConfig("testchan", f"{upstream.url}/testchan", 5.0, 5.0, ca_bundle=ca[1])
    trusting = replace(plain, trusted_origins=(other.url, f"https://localhost:{elsewhere.port}"))
    try:
        http = f"{other.url}{REPODATA}"
        https = f"{elsewhere.url}{REPODATA}"
        by_name = f"https://localhost:{elsewhere.port}{REPODATA}"
        assert "non-https URL on another origin" in await named(up, plain, http)
        assert "non-public address" in await named(up, plain, https)
        assert "resolves only to non-public addresses" in await named(up, plain, by_name)
        assert other.requests == [] and elsewhere.requests == []
        # Trusted: exactly those origins (scheme, host and port), and nothing else.
        assert await named(up, trusting, http) == http
        assert await named(up, trusting, by_name) == by_name
        assert "non-public address" in await named(up, trusting, https)  # 127.0.0.1 is not localhost
        # Each hop is judged on its own: a trusted host cannot redirect into an untrusted one.
        other.status(REPODATA, 302, headers={"Location": https})
        assert "upstream redirect to a non-public address" in await named(up, trusting, http)
        # The channel's own origin, named in full, is the channel: allowed as it always was.
        assert await named(up, plain, f"{upstream.url}{REPODATA}") == f"{upstream.url}{REPODATA}"
    finally:
        await up.close()
        await other.close()


class Rebinding(AbstractResolver):
    """A name whose every answer is an IPv6 form of the cloud metadata address."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        metadata = ["64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1", "::169.254.169.254", "::ffff:169.254.169.254"]
        return [
            ResolveResult(hostname=host, host=a, port=port, family=socket.AF_INET6, proto=0, flags=0)
            for a in metadata
        ]

    async def close(self) -> None:
        pass


async def test_the_resolver_refuses_ipv6_forms_of_private_addresses() -> None:
    resolver = PublicResolver(Rebinding())
    with pytest.raises(DisallowedAddress, match="only to non-public addresses"):
        await resolver.resolve("metadata.example", 443, socket.AF_UNSPEC)


# --- the pure parts -----------------------------------------------------------------


def test_refusal() -> None:
    assert refusal(URL("https://conda.example/x")) is None  # a name: checked when resolved
    assert refusal(URL("https://8.8.8.8/x")) is None
    assert refusal(URL("http://conda.example/x")) == "a non-https URL on another origin"
    for literal in (
        "127.0.0.1",
        "10.1.2.3",
        "169.254.169.254",
        "192.168.0.1",
        "[::1]",
        "[fe80::1]",
        "[::ffff:127.0.0.1]",
        "0.0.0.0",
        "100.64.0.1",
        "[fd00::1]",
    ):
        assert refusal(URL(f"https://{literal}/x")) == "a non-public address", literal


def test_is_public() -> None:
    assert is_public("8.8.8.8") and is_public("2606:4700::1111")
    assert not any(
        map(is_public, ["127.0.0.1", "::1", "10.0.0.1", "172.16.0.1", "224.0.0.1", "fe80::1%eth0"])
    )


@pytest.mark.parametrize(
    "v4", ["127.0.0.1", "10.1.2.3", "169.254.169.254", "192.168.1.1", "100.64.0.1", "0.0.0.0"]
)
def test_is_public_judges_ipv6_forms_by_the_ipv4_address_they_reach(v4: str) -> None:
    a, b, c, d = (int(x) for x in v4.split("."))
    hi, lo = f"{a << 8 | b:x}", f"{c << 8 | d:x}"
    forms = [
        f"::ffff:{v4}",
        f"64:ff9b::{v4}",
        f"64:ff9b::{hi}:{lo}",
        f"2002:{hi}:{lo}::1",
        f"::{v4}",
        f"::{hi}:{lo}",
    ]
    assert not any(map(is_public, forms)), [f for f in forms if is_public(f)]
    # The same forms of a public address are public; local-use NAT64 never is.
    assert all(map(is_public, ["64:ff9b::8.8.8.8", "2002:808:808::1", "::ffff:8.8.8.8"]))
    assert not is_public("64:ff9b:1::808:808")
    for form in forms:
        assert refusal(URL(f"https://[{form}]/x")) == "a non-public address", form


def test_same_origin() -> None:
    a = URL("https://h.example/x")
    assert same_origin(a, URL("https://H.example:443/y"))
    assert not same_origin(a, URL("http://h.example/x"))
    assert not same_origin(a, URL("https://h.example:8443/x"))
    assert not same_origin(a, URL("https://other.example/x"))


def test_redacted_url() -> None:
    assert redacted_url("https://u:p@h.example/t/tk-123/private/noarch/x.conda") == (
        "https://h.example/t/<redacted>/private/noarch/x.conda"
    )
    assert redacted_url(URL("https://cdn.example/blob?X-Amz-Signature=abc")) == (
        "https://cdn.example/blob?<redacted>"
    )
    assert redacted_url("http://127.0.0.1:80/testchan/noarch/repodata.json") == (
        "http://127.0.0.1:80/testchan/noarch/repodata.json"
    )
    # A channel whose path merely contains a "t" segment is left alone.
    assert redacted_url("https://h.example/conda-forge/t/noarch/x.conda") == (
        "https://h.example/conda-forge/t/noarch/x.conda"
    )
