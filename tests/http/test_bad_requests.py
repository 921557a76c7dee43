"""Bad and hostile requests: a short 4xx, no upstream call, no file outside the store, no entry."""

from __future__ import annotations

import asyncio

import pytest
from proxy import Proxy, check_invariants, make_config
from upstream import FakeUpstream

HOSTILE = [
    "/testchan/noarch/../noarch/repodata.json",
    "/testchan/noarch/%2e%2e/%2e%2e/etc/passwd",
    "/testchan/noarch/%252e%252e/repodata.json",
    "/testchan/noarch/..%2frepodata.json",
    "/testchan%2fnoarch/repodata.json",
    "/testchan/noarch/%5c..%5crepodata.json",
    "/testchan/noarch\\repodata.json",
    "/testchan//noarch/repodata.json",
    "/testchan/./noarch/repodata.json",
    "/testchan/noarch/repodata.json;x=1",
    "/testchan/noarch/repodata.json%00",
    "/testchan/noarch/%c0%ae%c0%ae",
    "/TestChan/noarch/repodata.json",
    "/testchan/noarch/repodata.json?x=1",
    "/testchan/noarch/shards/nothex.msgpack.zst",
    "/testchan",  # ("/" is the landing page now: tests/http/test_operator_pages.py)
    "/t/tok/",
]


async def raw_request(proxy: Proxy, request: bytes) -> bytes:
    """Send bytes as they are (no client normalisation) and read the answer."""
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    return data


@pytest.mark.parametrize("target", HOSTILE)
async def test_hostile_paths_rejected_without_upstream_calls(
    proxy: Proxy, upstream: FakeUpstream, target: str
) -> None:
    answer = await raw_request(proxy, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    status = int(answer.split(b" ", 2)[1])
    assert status in (400, 404), answer[:200]
    assert b"X-Cache: MISS" in answer
    assert upstream.requests == []
    await proxy.idle()
    assert check_invariants(proxy.config.cache.directory) == []


async def test_absolute_form_target_never_contacts_named_host(proxy: Proxy, upstream: FakeUpstream) -> None:
    # Another listener stands in for "other-host": it must never be contacted.
    other = FakeUpstream()
    other.mount("testchan", upstream._mounts["testchan"])
    await other.start()
    try:
        target = f"{other.url}/testchan/noarch/repodata.json"
        answer = await raw_request(proxy, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert other.requests == []
        status = int(answer.split(b" ", 2)[1])
        # Either refused, or answered as its path alone from the configured upstream.
        assert status in (200, 400, 404)
        if status == 200:
            assert upstream.count("/testchan/noarch/repodata.json") == 1
    finally:
        await other.close()


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_other_methods_refused(proxy: Proxy, upstream: FakeUpstream, method: str) -> None:
    resp = await proxy.get("/testchan/noarch/repodata.json", method=method)
    assert resp.status in (400, 405)
    assert upstream.requests == []


async def test_connect_refused(proxy: Proxy, upstream: FakeUpstream) -> None:
    answer = await raw_request(proxy, b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n")
    assert int(answer.split(b" ", 2)[1]) in (400, 405)
    assert upstream.requests == []


async def test_unlisted_channel_refused_when_not_allowed(upstream: FakeUpstream, tmp_path) -> None:
    from dataclasses import replace

    config = make_config(tmp_path / "c", upstream.url)
    config = replace(config, upstream=replace(config.upstream, allow_unlisted=False))
    proxy = await Proxy(config).start()
    try:
        resp = await proxy.get("/testchan/noarch/repodata.json")
        assert resp.status == 404 and b"not served" in resp.body
        assert upstream.requests == []
    finally:
        await proxy.close()


async def test_rejection_reason_is_one_line(proxy: Proxy) -> None:
    resp = await proxy.get("/testchan/noarch/repodata.json%3Bx", headers={"Accept": "text/plain"})
    assert resp.status == 400
    assert resp.body.decode().count("\n") == 1
