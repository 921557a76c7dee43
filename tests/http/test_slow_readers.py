"""Clients that never read: their responses are cut off after send_timeout."""

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
from proxy import (
    Proxy,
    RawAnswer,
    check_invariants,
    make_config,
    parse_answer,
)
from upstream import FakeUpstream

CH = "/testchan"
TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8  # Linux TCP_INFO tcpi_state values


def get_request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: proxy\r\n\r\n".encode()


async def never_reading(url: str, path: str) -> socket.socket:
    """A connection that asks for path and then reads nothing, through a tiny receive window."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, (host, int(port)))
        await loop.sock_sendall(sock, get_request(path))
    except BaseException:
        sock.close()
        raise
    return sock


def let_go(sock: socket.socket) -> bool:
    """Whether the proxy has closed (FIN) or aborted (RST) its end: read nothing to find out."""
    state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    return state in (TCP_CLOSE, TCP_CLOSE_WAIT)


async def read_out(sock: socket.socket, timeout: float = 10.0) -> RawAnswer:
    """Whatever the proxy sent, read until it closed the connection (or timeout)."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    closed = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), deadline - time.monotonic())
            except TimeoutError:
                break
            except ConnectionError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
    finally:
        sock.close()
    return parse_answer(bytes(data), closed)


async def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Poll a test-side condition (the proxy's own code never polls)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what or "condition not reached")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("source", ["hit", "streaming"])
async def test_a_client_that_stops_reading_is_cut_off_after_send_timeout(
    upstream: FakeUpstream, channel: Channel, tmp_path: Path, caplog: pytest.LogCaptureFixture, source: str
) -> None:
    """No timeout covered a response body: a GET never read held its connection for ever."""
    caplog.set_level(logging.WARNING, logger="condaproxy.http")
    config = make_config(tmp_path / "cache", upstream.url)
    proxy = await Proxy(replace(config, lazy=replace(config.lazy, send_timeout=1.0))).start()
    try:
        pkg = channel.by_name("cp-big")
        path = f"{CH}/{pkg.url_path}"
        hold = None
        if source == "hit":
            assert (await proxy.get(path)).status == 200
            await proxy.idle()
        else:
            hold = upstream.hold(path, 0.9)  # most of it is there to send, the rest still coming
        sock = await never_reading(proxy.url, path)
        await wait_until(lambda: "aborting response" in caplog.text, 20, "the stalled response to be cut")
        answer = await read_out(sock)
        assert answer.status == 200 and answer.headers.get("x-cache") == ("HIT" if hold is None else "MISS")
        assert answer.closed and not answer.complete  # cut off: never a body that looks whole
        assert "accepted no bytes for 1 s" in caplog.text
        if hold is not None:
            hold.release()
            await proxy.idle()  # the download itself went on (rule 3) and was cached
        whole = await proxy.get(path)
        assert whole.xcache == "HIT" and whole.body == pkg.read_bytes()
        assert upstream.count(path) == 1
        check_invariants(proxy.config.cache.directory)
    finally:
        await proxy.close()
