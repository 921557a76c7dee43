"""Small hits from memory: the same answers as from the store, coherent with removals."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from channel import Channel
from proxy import Proxy, make_config
from upstream import FakeUpstream

from condaproxy.cache.removal import remove_unit
from condaproxy.http.hot import HotBlobs

CH = "/testchan"
# Headers that differ between any two responses, whatever they carry.
PER_RESPONSE = {"Date", "Server", "Connection", "Keep-Alive"}


async def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll a test-side condition (the proxy's own code never polls)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.02)


def test_hot_blobs_are_bounded_by_bytes_and_checked_by_size() -> None:
    assert not HotBlobs(budget=0).fits(1)  # hot_cache = 0: nothing from memory
    hot = HotBlobs(budget=100, max_blob=40)
    assert not hot.fits(0) and hot.fits(40) and not hot.fits(41)
    hot.put("big", b"x" * 41)
    assert hot.get("big", 41) is None
    for name in "abc":
        hot.put(name, name.encode() * 40)
    assert hot.size <= 100 and hot.get("a", 40) is None  # least recently used went first
    assert hot.get("c", 40) == b"c" * 40
    assert hot.get("c", 39) is None  # a row of another size is never answered from memory
    hot.discard("c")
    assert hot.get("c", 40) is None


async def _served(
    proxy: Proxy, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    resp = await proxy.get(path, headers=headers)
    assert resp.error is None
    kept = {k: v for k, v in resp.headers.items() if k not in PER_RESPONSE}
    return resp.status, kept, resp.body


@pytest.mark.parametrize(
    "request_headers",
    [None, {"Range": "bytes=3-40"}, {"Range": "bytes=-5"}, {"Range": "bytes=999999999-"}],
)
async def test_memory_hits_answer_as_the_store_does(
    proxy: Proxy, channel: Channel, request_headers: dict[str, str] | None
) -> None:
    pkg = channel.by_name("cp-base")
    path = f"{CH}/{pkg.url_path}"
    assert (await proxy.get(path)).status == 200
    await proxy.idle()
    hot = proxy.services.hot
    assert hot.fits(pkg.size)

    proxy.services.hot = HotBlobs(budget=0)  # nothing in memory: sendfile from the store
    from_store = await _served(proxy, path, request_headers)
    proxy.services.hot = hot
    first = await _served(proxy, path, request_headers)  # read whole from the store
    assert len(hot) == 1
    from_memory = await _served(proxy, path, request_headers)
    assert from_store == first == from_memory
    assert from_memory[1]["X-Cache"] == "HIT"
    head = await proxy.get(path, method="HEAD", headers=request_headers)
    assert head.body == b"" and head.headers.get("Content-Length") == from_memory[1].get("Content-Length")


async def test_memory_hits_answer_conditionals(proxy: Proxy, channel: Channel) -> None:
    pkg = channel.by_name("cp-app")
    path = f"{CH}/{pkg.url_path}"
    assert (await proxy.get(path)).status == 200
    await proxy.idle()
    status, headers, body = await _served(proxy, path)
    assert (status, body) == (200, pkg.read_bytes())
    again = await proxy.get(path)
    assert again.body == pkg.read_bytes()
    if "ETag" in headers:
        cond = await proxy.get(path, headers={"If-None-Match": headers["ETag"]})
        assert cond.status == 304 and cond.body == b""
        stale_range = await proxy.get(path, headers={"Range": "bytes=0-3", "If-Range": '"other"'})
        assert stale_range.status == 200 and stale_range.body == pkg.read_bytes()


async def test_a_removed_unit_is_not_served_from_memory(proxy: Proxy, channel: Channel) -> None:
    pkg = channel.by_name("cp-lib")
    path = f"{CH}/{pkg.url_path}"
    assert (await proxy.get(path)).status == 200
    await proxy.idle()
    assert (await proxy.get(path)).xcache == "HIT"
    (unit,) = [u for u in await proxy.services.catalog.all_units() if u.key.filename == pkg.filename]
    assert proxy.services.hot.get(unit.blob_key, unit.size) is not None

    await remove_unit(proxy.services.catalog, proxy.services.store, unit.key, unit.blob_key)
    assert proxy.services.hot.get(unit.blob_key, unit.size) is None  # dropped with its blob
    again = await proxy.get(path)
    assert again.xcache == "MISS" and again.body == pkg.read_bytes()
    await proxy.idle()


async def test_a_client_not_reading_memory_hits_is_cut_off_after_send_timeout(
    upstream: FakeUpstream, channel: Channel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bodies from memory are bounded by send_timeout too: pipelined GETs, nothing read."""
    caplog.set_level(logging.WARNING, logger="condaproxy.http")
    config = make_config(tmp_path / "cache", upstream.url)
    proxy = await Proxy(replace(config, lazy=replace(config.lazy, send_timeout=1.0))).start()
    try:
        pkg = channel.by_name("cp-base")
        path = f"{CH}/{pkg.url_path}"
        assert (await proxy.get(path)).status == 200
        await proxy.idle()
        assert (await proxy.get(path)).xcache == "HIT"  # now in memory
        host, port = proxy.url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_connect(sock, (host, int(port)))
            request = f"GET {path} HTTP/1.1\r\nHost: proxy\r\n\r\n".encode()
            sending = asyncio.ensure_future(loop.sock_sendall(sock, request * 20000))
            await wait_until(lambda: "aborting response" in caplog.text, 30, "the stalled response to be cut")
            assert "accepted no bytes for 1 s" in caplog.text
            sending.cancel()
        finally:
            sock.close()
        whole = await proxy.get(path)
        assert whole.xcache == "HIT" and whole.body == pkg.read_bytes()
    finally:
        await proxy.close()
