"""Clients that never read: their responses are cut off after send_timeout, and however many
there are they cannot take the descriptors the proxy needs (listener, catalog, downloads)."""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from channel import Channel
from proxy import (
    Proxy,
    ProxyProcess,
    RawAnswer,
    check_invariants,
    free_port,
    make_config,
    parse_answer,
    write_config,
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


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


async def _fetch(session: aiohttp.ClientSession, url: str, deadline: float) -> tuple[int, bytes, int]:
    """GET url until it is answered 200 (or deadline): status, body, and the 503s met on the way."""
    refused = 0
    while True:
        try:
            async with session.get(url) as resp:
                body = await resp.read()
                if resp.status != 503 or time.monotonic() > deadline:
                    return resp.status, body, refused
                refused += 1
                await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
        except aiohttp.ClientError:
            if time.monotonic() > deadline:
                raise
            refused += 1
            await asyncio.sleep(0.5)


async def test_never_reading_clients_cannot_exhaust_descriptors(
    upstream: FakeUpstream, channel: Channel, tmp_path: Path
) -> None:
    """360 GETs never read once used up a 256-descriptor limit: accept failed ("Too many open
    files") and nobody else was served. Now the stalled ones are cut after send_timeout, those
    past the reserve are turned away with 503, and the proxy serves on."""
    port = free_port()
    ini = write_config(
        tmp_path / "proxy.ini", tmp_path / "cache", upstream.url, port, lazy={"send_timeout": "2"}
    )
    proc = await ProxyProcess(ini, port, preexec_fn=_low_fd_limit).start()
    pkg = channel.by_name("cp-big")
    url = f"{proc.url}{CH}/{pkg.url_path}"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as resp:
                assert resp.status == 200 and await resp.read() == pkg.read_bytes()
            await wait_until(lambda: (tmp_path / "cache" / "blobs" / pkg.sha256[:2] / pkg.sha256).exists())
            before = proc.open_fds()

            stalled = [await never_reading(proc.url, f"{CH}/{pkg.url_path}") for _ in range(360)]
            # A client coming after them gets its file (once the stalled ones are cut off).
            status, body, refused = await _fetch(session, url, time.monotonic() + 30)
            assert status == 200 and body == pkg.read_bytes()
            async with session.get(f"{proc.url}/healthz") as health:
                assert health.status == 200
            # Unread to the end, every one of them is let go by the proxy: cut off or turned away.
            await wait_until(lambda: all(map(let_go, stalled)), 60, "the proxy to let go of them all")
            await wait_until(lambda: proc.open_fds() <= before + 8, 30, "descriptors to come back")

        answers = await asyncio.gather(*(read_out(s, 5.0) for s in stalled))
        cut = sum(a.status == 200 and not a.complete for a in answers)
        turned_away = sum(a.status == 503 or a.status == 0 for a in answers)  # a 503 may be lost to a reset
        assert all(a.closed for a in answers)
        assert cut + turned_away == len(stalled), [a for a in answers if a.status not in (0, 200, 503)]
        assert cut > 0 and turned_away > 0
        print(
            f"360 never-reading clients: {cut} cut off after send_timeout, {turned_away} turned away;"
            f" the normal client met {refused} refusals first"
        )
        assert proc.stop() == 0
    finally:
        proc.kill()
    log = proc.log.read_text()
    assert "Too many open files" not in log and "Traceback" not in log
